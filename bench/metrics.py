"""What the operators' metrics cost: an intake with metrics against the same intake without, and a scrape.

    python -m bench metrics [--quick] [--experts N] [--repeats K] [--width W]

Two real in-process ``IntakeServer`` s (gRPC over localhost, their own stores, the same seeded tiny
base) take the same N experts, pushed one after another by the client library, each waited on until
merged; the two are measured interleaved (off, on, off, on, …) and the best of K is kept for each, so
machine noise hits both alike. Printed: seconds per expert without and with metrics and their ratio
(1.00 = no cost), then the best-of-K time of one full scrape of the endpoint (HTTP GET of ``/metrics``,
which also walks the store for ``fedmerge_store_size_bytes`` and counts the queue) and the store's
file count at that moment.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from safetensors.torch import save_file

from fedmerge.metrics import FedmergeMetrics, start_metrics_server
from fedmerge.service.client import ClientOptions, submit_expert, wait_merged
from fedmerge.service.config import ServiceConfig
from fedmerge.service.server import IntakeServer
from fedmerge.store import ModelStore
from fedmerge_testing.hostile import tiny_base

TOKEN = "bench-metrics-token-0123456789"


def _experts(folder: Path, base: dict[str, torch.Tensor], n: int, seed: int) -> list[Path]:
    """``n`` fine-tuned checkpoints of ``base`` (seeded noise on its floating tensors)."""
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(1000 * seed + i)
        tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                 for k, v in base.items()}  # fmt: skip
        path = folder / f"expert-{seed}-{i:03d}.safetensors"
        save_file(tuned, str(path))
        paths.append(path)
    return paths


def _server(root: Path, base: dict[str, torch.Tensor], metrics: FedmergeMetrics | None) -> IntakeServer:
    store = root / "store"
    with ModelStore.open(store) as s:
        s.commit_base(base, name="bench")
    config = ServiceConfig(store=store, listen="127.0.0.1:0", method="running_average",
                           tokens={TOKEN: "bench"}, max_workers=8)  # fmt: skip
    server = IntakeServer(config, metrics=metrics)
    server.start()
    return server


def _push_all(server: IntakeServer, experts: list[Path]) -> float:
    """Seconds to submit every expert and see each merged (one after another)."""
    opts = ClientOptions(f"127.0.0.1:{server.port}", token=TOKEN)
    t0 = time.perf_counter()
    for path in experts:
        sub = wait_merged(opts, submit_expert(opts, path).submission_id, timeout=120, poll=0.01)
        assert sub.version, sub.reason
    return time.perf_counter() - t0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench metrics", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="6 experts, 3 repeats")
    parser.add_argument("--experts", type=int, default=0, help="experts per measurement (default 16)")
    parser.add_argument("--repeats", type=int, default=0, help="interleaved repeats, best kept (default 5)")
    parser.add_argument("--width", type=int, default=64, help="width of the tiny base model")
    args = parser.parse_args(argv)
    n = args.experts or (6 if args.quick else 16)
    k = args.repeats or (3 if args.quick else 5)
    base = tiny_base(0, args.width)
    best = {"off": float("inf"), "on": float("inf")}
    scrape_best = float("inf")
    files = 0
    with tempfile.TemporaryDirectory(prefix="fedmerge-bench-metrics-") as tmp:
        root = Path(tmp)
        experts_dir = root / "experts"
        experts_dir.mkdir()
        for rep in range(k):
            for mode in ("off", "on"):
                metrics = FedmergeMetrics() if mode == "on" else None
                # fresh experts per repeat: the same bytes again would be duplicates, not merges
                batch = _experts(experts_dir, base, n, seed=1 + 2 * rep + (mode == "on"))
                server = _server(root / f"{mode}-{rep}", base, metrics)
                try:
                    best[mode] = min(best[mode], _push_all(server, batch) / n)
                    if metrics is not None:
                        endpoint = start_metrics_server(metrics.registry)
                        try:
                            t0 = time.perf_counter()
                            with urllib.request.urlopen(endpoint.url, timeout=30) as resp:
                                resp.read()
                            scrape_best = min(scrape_best, time.perf_counter() - t0)
                        finally:
                            endpoint.stop()
                        files = sum(1 for p in Path(server.config.store).rglob("*") if p.is_file())
                finally:
                    server.stop(grace=0.5)
    print(f"experts: {n} per measurement, best of {k} interleaved repeats, base width {args.width}")
    print(f"without metrics: {best['off'] * 1e3:8.2f} ms per expert (submit + merge + commit)")
    print(f"with metrics:    {best['on'] * 1e3:8.2f} ms per expert")
    print(f"ratio on/off:    {best['on'] / best['off']:8.3f}")
    print(f"one scrape:      {scrape_best * 1e3:8.2f} ms (store of {files} files)")
    return 0
