"""Bulk channel benchmark: the same payload size uploaded to a server process on localhost three ways, in
one run, each until the server holds the bytes durably (sha256 verified, written, fsynced).

    python -m bench bulk [--quick] [--mib N] [--chunk-mib C] [--skip-flower]

1. fedmerge bulk channel (the figure under test): ``upload_bulk`` of an N MiB file in C MiB chunks
   (chunked, content-addressed, resumable) to a ``fedmerge serve-continual`` process.
2. single-message gRPC: the whole payload as one unary gRPC request to the same server process.
3. Flower's own transport (the reference of ``bulk_time_vs_flower``): a real localhost deployment, one
   ``flower-superlink --insecure`` with in-memory state and one ``flower-supernode --insecure``, and
   ``flwr run bench/_flower_bulk``. The ServerApp pushes one ``train`` message with the size and a seed;
   the ClientApp generates N MiB (PCG64, so nothing large travels down), hashes them and replies with
   them as one uint8 ``Array`` in an ``ArrayRecord``; the ServerApp pulls the reply (polling every 0.1 s),
   checks length and sha256, writes and fsyncs the bytes. ``flower_s`` is the ServerApp's own clock from
   pushing the message to the payload being durable. Nothing is subtracted from it; its parts are
   reported apart: ``flower_dispatch_s`` (push -> the ClientApp's ``train`` starts: the SuperNode's
   polling for work and the ClientApp process start-up) and ``flower_node_prepare_s`` (generating and
   hashing the payload on the node). ``flower_run_wall_s`` is the whole ``flwr run --stream`` (FAB
   build, ServerApp start, waiting for the node, shutdown). ``flower_upload_only_s`` = ``flower_s`` minus
   both parts (payload ready on the node -> durable on the server) gives a second, stricter ratio,
   ``bulk_time_vs_flower_upload_only``; the headline ratio uses ``flower_s``.

Memory: peak RSS growth over the payload size of the server process for (1) and (2), of the SuperLink
process and of the ServerApp process (``flwr-serverapp``, a child of the SuperLink) for (3). Peaks are
``VmHWM`` after resetting it with ``/proc/<pid>/clear_refs``; the ServerApp resets and reads its own
peak; a 20 Hz sampler of the ServerApp's ``VmRSS`` gives a cross-check (a lower bound).

``bulk_time_vs_flower`` = bulk channel seconds / ``flower_s``; ``server_rss_over_payload`` is the bulk
channel's. Every process started here is ended by its pid (and its children), pass or fail. The client
side (the uploading process, the SuperNode and ClientApp) is not measured for memory. Last line printed:
one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from rich.console import Console
from rich.table import Table

FLOWER_APP = Path(__file__).resolve().parent / "_flower_bulk"
BIN = Path(sys.executable).parent
FLOWER_SEED = 3


class FlowerReferenceError(RuntimeError):
    """The Flower reference deployment did not start, did not finish, or reported a failed exchange."""


def _rss(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _payload(path: Path, mib: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with path.open("wb") as fh:
        for _ in range(mib):
            fh.write(rng.integers(0, 256, size=1 << 20, dtype=np.uint8).tobytes())


def _start_server(work: Path, max_message: int) -> tuple[subprocess.Popen[bytes], int]:
    import torch
    from safetensors.torch import save_file

    base = work / "base.safetensors"
    save_file({"w": torch.zeros(4, 4)}, str(base))
    port_file = work / "port"
    cmd = [
        sys.executable, "-m", "fedmerge.service.cli", "serve-continual", "--store", str(work / "store"),
        "--base-weights", str(base), "--listen", "127.0.0.1:0", "--allow-insecure",
        "--port-file", str(port_file), "--max-message-bytes", str(max_message),
        "--max-submission-bytes", str(max_message),
    ]  # fmt: skip
    log = (work / "server.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((work / "server.log").read_text()[-2000:])
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise FlowerReferenceError(f"process {proc.pid} exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.2)
    raise FlowerReferenceError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """End each process (newest first) and all its descendants by pid: SIGTERM, then SIGKILL after 10 s."""
    for proc in reversed(procs):
        if proc.poll() is not None:  # already reaped: its pid may belong to another process by now
            continue
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(proc.pid)
            children = root.children(recursive=True)
            proc.terminate()
            for child in children:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.terminate()
            _, alive = psutil.wait_procs([root, *children], timeout=10)
            for p in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


@dataclass
class _ServerAppSampler:
    """Samples every ``period_s`` the RSS of the SuperLink's ``flwr-serverapp`` descendants (max per pid)."""

    superlink_pid: int
    period_s: float = 0.05
    peaks: dict[int, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _loop(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.superlink_pid)
            while not self._stop.is_set():
                for child in root.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        if any("flwr-serverapp" in part for part in child.cmdline()):
                            rss = int(child.memory_info().rss)
                            self.peaks[child.pid] = max(rss, self.peaks.get(child.pid, 0))
                self._stop.wait(self.period_s)

    def __enter__(self) -> _ServerAppSampler:
        self._thread = threading.Thread(target=self._loop, name="serverapp-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


@dataclass
class FlowerResult:
    """What the Flower reference measured (seconds and bytes)."""

    durable_s: float
    reply_s: float
    node_prepare_s: float
    dispatch_s: float
    run_wall_s: float
    superlink_growth: int
    serverapp_growth: int
    serverapp_sampled_growth: int | None
    peak_reset: bool


def _flower_reference(work: Path, n_bytes: int, timeout_s: float) -> FlowerResult:
    """Run the ``bench/_flower_bulk`` app on a fresh localhost SuperLink + SuperNode; see the module doc."""
    home, logs, out = work / "flwr-home", work / "flower-logs", work / "flower-out"
    for folder in (home, logs, out):
        folder.mkdir()
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    port = _free_port()
    address = f"127.0.0.1:{port}"
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "bench-bulk"\n\n'
        f'[superlink.bench-bulk]\naddress = "{address}"\ninsecure = true\n'
    )
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with (logs / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(argv, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    def tail() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(logs.glob("*.log")))

    try:
        superlink = start(
            "superlink",
            [
                str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
                "--disable-runtime-dependency-installation",
            ],
        )  # fmt: skip
        _wait_for_port(port, superlink, 60)
        start(
            "supernode",
            [
                str(BIN / "flower-supernode"), "--insecure", "--superlink", address,
                "--host", "127.0.0.1", "--port", str(_free_port()),
            ],
        )  # fmt: skip
        time.sleep(0.5)
        base = _rss(superlink.pid, "VmRSS")
        peak_reset = _reset_peak(superlink.pid)
        run_config = f"out-dir='{out}' payload-bytes={n_bytes} seed={FLOWER_SEED}"
        argv = [str(BIN / "flwr"), "run", str(FLOWER_APP), "bench-bulk", "--stream", "-c", run_config]
        with _ServerAppSampler(superlink.pid) as sampler, (logs / "flwr-run.log").open("wb") as log:
            t0 = time.perf_counter()
            run = subprocess.Popen(argv, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
            procs.append(run)
            try:
                code = run.wait(timeout_s)
            except subprocess.TimeoutExpired as exc:
                raise FlowerReferenceError(f"flwr run did not finish in {timeout_s} s\n{tail()}") from exc
            run_wall_s = time.perf_counter() - t0
            # the ServerApp may still be writing its result after the log stream closes
            result_file = out / "flower-result.json"
            deadline = time.monotonic() + 30
            while not result_file.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        superlink_growth = _rss(superlink.pid, "VmHWM") - base
        if code != 0 or not result_file.exists():
            found = result_file.exists()
            raise FlowerReferenceError(f"flwr run exited with {code}, result written: {found}\n{tail()}")
        result: dict[str, Any] = json.loads(result_file.read_text())
        if not result.get("ok"):
            raise FlowerReferenceError(f"Flower exchange failed: {result.get('error')}\n{tail()}")
    finally:
        _stop(procs)
        (out / "flower-payload.bin").unlink(missing_ok=True)
    sampled = sampler.peaks.get(int(result["pid"]))
    return FlowerResult(
        durable_s=float(result["durable_s"]),
        reply_s=float(result["reply_s"]),
        node_prepare_s=float(result["node_prepare_s"]),
        dispatch_s=float(result["dispatch_s"]),
        run_wall_s=run_wall_s,
        superlink_growth=superlink_growth,
        serverapp_growth=int(result["rss_peak"]) - int(result["rss_base"]),
        serverapp_sampled_growth=None if sampled is None else sampled - int(result["rss_base"]),
        peak_reset=peak_reset and bool(result["peak_reset"]),
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench bulk", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB instead of 1 GiB")
    parser.add_argument("--mib", type=int, default=None, help="payload size in MiB")
    parser.add_argument("--chunk-mib", type=int, default=1, help="bulk chunk size in MiB")
    parser.add_argument(
        "--skip-flower", action="store_true", help="local checks only: no Flower reference, ratio is null"
    )
    parser.add_argument("--flower-timeout-s", type=float, default=1800.0, help="limit for the Flower run")
    args = parser.parse_args(argv)
    mib = args.mib or (256 if args.quick else 1024)
    from fedmerge.service.client import ClientOptions, upload_bulk, upload_unary

    console = Console(stderr=False)
    rows = []
    flower: FlowerResult | None = None
    with tempfile.TemporaryDirectory(prefix="fedmerge-bench-bulk-") as tmp:
        work = Path(tmp)
        a, b = work / "a.bin", work / "b.bin"
        _payload(a, mib, 1)
        _payload(b, mib, 2)
        size = a.stat().st_size
        proc, port = _start_server(work, max_message=size + (16 << 20))
        try:
            opts = ClientOptions(f"127.0.0.1:{port}", max_message_bytes=size + (16 << 20))
            time.sleep(0.5)
            # reference: the whole payload as one unary gRPC message (client holds it in memory)
            data = a.read_bytes()
            base_rss = _rss(proc.pid, "VmRSS")
            peak_ok = _reset_peak(proc.pid)
            t0 = time.perf_counter()
            upload_unary(data, opts)
            unary_s = time.perf_counter() - t0
            unary_growth = _rss(proc.pid, "VmHWM") - base_rss
            del data
            # bulk channel: chunked, content-addressed, resumable, fsynced and hash-verified
            time.sleep(0.5)
            base_rss = _rss(proc.pid, "VmRSS")
            peak_ok = _reset_peak(proc.pid) and peak_ok
            t0 = time.perf_counter()
            upload_bulk(b, opts, chunk_size=args.chunk_mib << 20)
            bulk_s = time.perf_counter() - t0
            bulk_growth = _rss(proc.pid, "VmHWM") - base_rss
        finally:
            _stop([proc])
        a.unlink()
        b.unlink()
        if not args.skip_flower:
            flower = _flower_reference(work, size, args.flower_timeout_s)
            peak_ok = peak_ok and flower.peak_reset
    rows.append(("unary gRPC (1 message)", unary_s, size / unary_s / 2**20, f"{unary_growth / size:.3f}"))
    rows.append(
        (
            f"bulk channel ({args.chunk_mib} MiB chunks)",
            bulk_s,
            size / bulk_s / 2**20,
            f"{bulk_growth / size:.3f}",
        )
    )
    if flower is not None:
        rows.append(
            (
                "Flower (SuperNode -> SuperLink -> ServerApp)",
                flower.durable_s,
                size / flower.durable_s / 2**20,
                f"SuperLink {flower.superlink_growth / size:.3f}, "
                f"ServerApp {flower.serverapp_growth / size:.3f}",
            )
        )
    table = Table(title=f"upload of {mib} MiB on localhost until durable on the server")
    for col in ("path", "seconds", "MiB/s", "server peak RSS growth / payload"):
        table.add_column(col)
    for name, secs, rate, growth in rows:
        table.add_row(name, f"{secs:.2f}", f"{rate:.0f}", growth)
    console.print(table)
    upload_only = 0.0 if flower is None else flower.durable_s - flower.dispatch_s - flower.node_prepare_s
    if flower is not None:
        console.print(
            f"Flower: ClientApp started {flower.dispatch_s:.2f} s after the push, generated and hashed "
            f"the payload in {flower.node_prepare_s:.2f} s; reply pulled after {flower.reply_s:.2f} s, "
            f"durable after {flower.durable_s:.2f} s (all from the push, nothing subtracted); "
            f"whole `flwr run` {flower.run_wall_s:.2f} s"
        )
        console.print(
            f"bulk channel time / Flower time: {bulk_s / flower.durable_s:.3f} "
            f"(/ Flower time after the payload is ready on the node, {upload_only:.2f} s: "
            f"{bulk_s / upload_only:.3f})"
        )
    if not peak_ok:
        console.print("[yellow]could not reset a peak RSS counter; growth figures are upper bounds[/]")

    def frac(n: int | None) -> float | None:
        return None if n is None else round(n / size, 4)

    result = {
        "benchmark": "bulk",
        "payload_mib": mib,
        "chunk_mib": args.chunk_mib,
        "bulk_s": round(bulk_s, 3),
        "unary_grpc_s": round(unary_s, 3),
        "bulk_time_vs_unary_grpc": round(bulk_s / unary_s, 3),
        "bulk_time_vs_flower": None if flower is None else round(bulk_s / flower.durable_s, 4),
        "flower_s": None if flower is None else round(flower.durable_s, 3),
        "flower_reply_s": None if flower is None else round(flower.reply_s, 3),
        "flower_dispatch_s": None if flower is None else round(flower.dispatch_s, 3),
        "flower_node_prepare_s": None if flower is None else round(flower.node_prepare_s, 3),
        "flower_run_wall_s": None if flower is None else round(flower.run_wall_s, 3),
        "flower_upload_only_s": None if flower is None else round(upload_only, 3),
        "bulk_time_vs_flower_upload_only": None if flower is None else round(bulk_s / upload_only, 4),
        "flower_superlink_rss_over_payload": None if flower is None else frac(flower.superlink_growth),
        "flower_serverapp_rss_over_payload": None if flower is None else frac(flower.serverapp_growth),
        "flower_serverapp_sampled_rss_over_payload": (
            None if flower is None else frac(flower.serverapp_sampled_growth)
        ),
        "flower_reference": (
            "skipped (--skip-flower)"
            if flower is None
            else "flower-superlink + 1 flower-supernode on localhost, in-memory state, same run"
        ),
        "server_rss_over_payload": round(bulk_growth / size, 4),
        "unary_server_rss_over_payload": round(unary_growth / size, 4),
        "peak_reset_ok": peak_ok,
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result))
    return 0
