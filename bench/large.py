"""Large payloads in rounds: one round of N SuperNodes, fedmerge's round engine (packages through the
bulk channel) against Flower's FedAvg over Flower's own transport, same nodes and model, same run.

    python -m bench large [--quick] [--clients N] [--params P] [--tensors T]

Full: N = 8 and a model of 2^30 ≈ 1.07 B parameters in bf16 (2 GiB); quick: N = 3 and 250 M
parameters. The base is committed to a fresh store (bf16); a localhost ``flower-superlink --insecure``
and N ``flower-supernode --insecure`` run the apps of ``bench/_flower_large`` (see ``large_app.py``):
each node generates its delta (seeded), fedmerge nodes encode it as a dense bf16 package and upload it
through the ServerApp's bulk endpoint (threshold 0), Flower nodes reply with fp16 weights. Both runs
measure the uplink only (fedmerge's nodes are declared holders of the base; Flower's initial arrays are
one element).

Figures (last line, one JSON object):

* ``server_peak_rss_over_model``: (ServerApp ``VmHWM`` during the round − its ``VmRSS`` just before)
  / model bytes (2 per parameter), fedmerge's ServerApp;
* ``round_time_over_disk_read``: fedmerge's round wall time / the time to read N files of the
  packages' size once from the spool's disk (written, fsynced, evicted from the page cache with
  ``posix_fadvise(DONTNEED)`` first), measured in the same run;
* ``round_time_vs_flower``: fedmerge's round time / FedAvg's round time at the same size, when
  Flower completed it; ``flower_largest_ok_bytes``: the largest uplink (N × model bytes) Flower
  completed in this run (full mode halves the model until it does, at most 3 sizes).

One run each (k = 1: a round at this size takes minutes); every process started is ended by its pid.
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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

APP = Path(__file__).resolve().parent / "_flower_large"
BIN = Path(sys.executable).parent


class LargeBenchError(RuntimeError):
    """A run of the benchmark failed (the tail of the processes' logs is attached)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class _Deployment:
    work: Path
    nodes: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.work / f"{name}.log").open("wb")
        proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.work)
        self.procs.append(proc)
        return proc

    def up(self) -> None:
        home = self.work / "flwr-home"
        home.mkdir(exist_ok=True)
        self.env = {
            **os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }  # fmt: skip
        port = _free_port()
        link = self.start(
            "superlink",
            [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
             "--disable-runtime-dependency-installation"],
        )  # fmt: skip
        end = time.monotonic() + 120
        while True:
            if link.poll() is not None or time.monotonic() > end:
                raise LargeBenchError("the SuperLink did not start\n" + self.tail())
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                break
            time.sleep(0.2)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "bench-large"\n\n[superlink.bench-large]\naddress = "127.0.0.1:{port}"\n'
            "insecure = true\n"
        )
        for i in range(self.nodes):
            self.start(
                f"supernode{i}",
                [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                 "--port", str(_free_port()),
                 "--node-config", f"partition-id={i} num-partitions={self.nodes}"],
            )  # fmt: skip

    def run(self, config: dict[str, Any], timeout_s: float) -> tuple[dict[str, Any], float]:
        """``flwr run`` of the benchmark app; (the ServerApp's result file, the whole run's seconds)."""
        out = Path(str(config["out-dir"])) / f"{config['bench-mode']}-result.json"
        out.unlink(missing_ok=True)
        text = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in config.items())
        t0 = time.perf_counter()
        with (self.work / f"flwr-run-{config['bench-mode']}.log").open("wb") as log:
            proc = subprocess.Popen(
                [str(BIN / "flwr"), "run", str(APP), "bench-large", "--stream", "--run-config", text],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.work,
            )  # fmt: skip
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_tree(proc.pid)
                return {"ok": False, "error": f"flwr run did not finish in {timeout_s:g} s"}, timeout_s
        wall = time.perf_counter() - t0
        if not out.is_file():
            return {
                "ok": False,
                "error": f"no result (flwr run exited {proc.returncode})\n{self.tail()}",
            }, wall
        return json.loads(out.read_text()), wall

    def stop(self) -> None:
        for proc in reversed(self.procs):
            _kill_tree(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    def tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.work.glob("*.log")))


def _kill_tree(pid: int) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


def make_store(root: Path, tensors: int, numel: int) -> int:
    """A store whose base is ``tensors`` bf16 zero tensors of ``numel`` entries; returns model bytes."""
    from fedmerge.store import ModelStore

    weights = {f"layer{i:03d}.weight": torch.zeros(numel, dtype=torch.bfloat16) for i in range(tensors)}
    with ModelStore.open(root) as store:
        store.commit_base(weights, name="bench-large")
    return 2 * tensors * numel


def disk_read_s(folder: Path, files: int, size: int) -> float:
    """Seconds to read ``files`` files of ``size`` bytes once from ``folder``'s disk, page cache evicted."""
    folder.mkdir(parents=True, exist_ok=True)
    block = os.urandom(1 << 20)
    paths = []
    for i in range(files):
        path = folder / f"read-{i}.bin"
        with path.open("wb") as fh:
            left = size
            while left > 0:
                left -= fh.write(block[: min(left, len(block))])
            fh.flush()
            os.fsync(fh.fileno())
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        paths.append(path)
    t0 = time.perf_counter()
    for path in paths:
        with path.open("rb", buffering=0) as fh:
            while fh.read(8 << 20):
                pass
    elapsed = time.perf_counter() - t0
    for path in paths:
        path.unlink()
    return elapsed


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench large", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 3, 250 M parameters")
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument("--params", type=int, default=None, help="model parameters (bf16)")
    parser.add_argument("--tensors", type=int, default=None, help="tensors the parameters are split into")
    parser.add_argument("--timeout-s", type=float, default=None, help="per flwr run")
    args = parser.parse_args(argv)
    clients = args.clients or (3 if args.quick else 8)
    params = args.params or (250_000_000 if args.quick else 1 << 30)
    tensors = args.tensors or (64 if args.quick else 256)
    timeout_s = args.timeout_s or (240.0 if args.quick else 1800.0)
    if clients < 1 or params < tensors or tensors < 1:
        print("--clients, --tensors ≥ 1 and --params ≥ --tensors", file=sys.stderr)
        return 2
    numel = -(-params // tensors)
    with tempfile.TemporaryDirectory(prefix="bench-large-") as tmp:
        work = Path(tmp)
        model_bytes = make_store(work / "store", tensors, numel)
        dep = _Deployment(work, clients)
        common = {"out-dir": str(work), "num-clients": clients, "seed": 0, "timeout-s": timeout_s}
        try:
            dep.up()
            fed, fed_wall = dep.run(
                {**common, "bench-mode": "fedmerge", "store": str(work / "store"),
                 "spool": str(work / "spool"), "tensors": tensors, "tensor-numel": numel},
                timeout_s + 120,
            )  # fmt: skip
            flower_runs: list[tuple[int, dict[str, Any]]] = []
            sizes = [numel] if args.quick else [numel, numel // 2, numel // 4]
            for n in sizes:
                result, _ = dep.run(
                    {**common, "bench-mode": "flower", "tensors": tensors, "tensor-numel": n}, timeout_s + 120
                )
                flower_runs.append((n, result))
                if result.get("ok"):
                    break
        finally:
            dep.stop()
        if not fed.get("ok"):
            print(
                f"fedmerge round failed: {str(fed.get('error') or fed.get('rejected'))[:2000]}",
                file=sys.stderr,
            )
            return 1
        package_bytes = int(fed["uplink_bytes"]) // clients
        read_s = disk_read_s(work / "spool" / "disk-read", clients, package_bytes)
    flower_ok = [(n, r) for n, r in flower_runs if r.get("ok")]
    same_size = flower_ok[0][1] if flower_ok and flower_ok[0][0] == numel else None
    growth = int(fed["rss_peak"]) - int(fed["rss_base"])
    out: dict[str, Any] = {
        "clients": clients,
        "params": tensors * numel,
        "model_bytes": model_bytes,
        "package_bytes": package_bytes,
        "fedmerge_round_s": round(float(fed["round_s"]), 3),
        "fedmerge_run_wall_s": round(fed_wall, 3),
        "server_rss_base_bytes": int(fed["rss_base"]),
        "server_rss_peak_bytes": int(fed["rss_peak"]),
        "server_warm_up_rss_bytes": int(fed["rss_warm_up"]),
        "fedmerge_merge_s": round(float(fed["merge_s"]), 3),
        "merge_time_over_disk_read": round(float(fed["merge_s"]) / read_s, 2),
        "disk_read_s": round(read_s, 3),
        "flower_round_s": None if same_size is None else round(float(same_size["round_s"]), 3),
        "flower_server_rss_over_model": None
        if same_size is None
        else round((int(same_size["rss_peak"]) - int(same_size["rss_base"])) / model_bytes, 3),
        "flower_failures": [
            f"{2 * tensors * n * clients} B: {str(r.get('error'))[:300]}"
            for n, r in flower_runs
            if not r.get("ok")
        ],
        "server_peak_rss_over_model": round(growth / model_bytes, 3),
        "round_time_over_disk_read": round(float(fed["round_s"]) / read_s, 2),
        "round_time_vs_flower": None
        if same_size is None
        else round(float(fed["round_s"]) / float(same_size["round_s"]), 3),
        "flower_largest_ok_bytes": 2 * tensors * flower_ok[0][0] * clients if flower_ok else 0,
        "command": "python -m bench large" + (" --quick" if args.quick else ""),
    }
    for key in ("fedmerge_round_s", "fedmerge_merge_s", "disk_read_s", "merge_time_over_disk_read",
                "flower_round_s", "server_peak_rss_over_model",
                "round_time_over_disk_read", "round_time_vs_flower", "flower_largest_ok_bytes"):  # fmt: skip
        print(f"{key:>28}: {out[key]}")
    print(json.dumps(out))
    return 0
