"""Bulk channel benchmark: a large payload uploaded through the chunked, resumable bulk channel versus
one plain single-message gRPC unary upload, to a real server process on localhost, same run.

    python -m bench bulk [--quick] [--mib N] [--chunk-mib C]

Measures wall time until the server has the payload durably (fsynced, sha256 verified) and the
server process's peak RSS growth during each upload (``/proc/<pid>/clear_refs`` resets the peak
between phases), as a fraction of the payload. The reference is a single gRPC message, not Flower's
transport: Flower's own figure (1 GiB in ~67 s with ~13 GB of host memory, see the project notes) was
not re-measured here, so ``bulk_time_vs_flower`` is reported as null. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table


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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench bulk", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB instead of 1 GiB")
    parser.add_argument("--mib", type=int, default=None, help="payload size in MiB")
    parser.add_argument("--chunk-mib", type=int, default=1, help="bulk chunk size in MiB")
    args = parser.parse_args(argv)
    mib = args.mib or (256 if args.quick else 1024)
    from fedmerge.service.client import ClientOptions, upload_bulk, upload_unary

    console = Console(stderr=False)
    rows = []
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
            proc.terminate()
            proc.wait(30)
    rows.append(("unary gRPC (1 message)", unary_s, size / unary_s / 2**20, unary_growth / size))
    rows.append(
        (f"bulk channel ({args.chunk_mib} MiB chunks)", bulk_s, size / bulk_s / 2**20, bulk_growth / size)
    )
    table = Table(title=f"upload of {mib} MiB to a server process on localhost")
    for col in ("path", "seconds", "MiB/s", "server peak RSS growth / payload"):
        table.add_column(col)
    for name, secs, rate, frac in rows:
        table.add_row(name, f"{secs:.2f}", f"{rate:.0f}", f"{frac:.3f}")
    console.print(table)
    if not peak_ok:
        console.print("[yellow]could not reset the peak RSS counter; growth figures are upper bounds[/]")
    result = {
        "benchmark": "bulk",
        "payload_mib": mib,
        "chunk_mib": args.chunk_mib,
        "bulk_s": round(bulk_s, 3),
        "unary_grpc_s": round(unary_s, 3),
        "bulk_time_vs_unary_grpc": round(bulk_s / unary_s, 3),
        "bulk_time_vs_flower": None,
        "flower_reference": "not measured in this run (reference is a single-message gRPC upload)",
        "server_rss_over_payload": round(bulk_growth / size, 4),
        "unary_server_rss_over_payload": round(unary_growth / size, 4),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result))
    return 0
