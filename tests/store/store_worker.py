"""A fork server for the crash and concurrency tests (run as ``python store_worker.py STORE``).

It imports torch and the store once, runs no tensor op itself (so forking it is safe), and forks
short-lived children on request, so each SIGKILL costs a fork rather than a fresh interpreter.
Protocol: one line per message on stdin/stdout (lines are shorter than PIPE_BUF, so the writes of
the server and its children never interleave inside a line).

    commit KILL_AT SEED N WORKERS  -> "pid P"; child P: "ready P", then "ack P VID ROUND" per commit
                                      (after commit() returned), "done P". KILL_AT >= 0 sets
                                      FEDMERGE_STORE_KILL_AT (SIGKILL at that write step).
    read SECONDS                   -> "pid P"; child P materialises "latest" in a loop, checking
                                      every tensor, then "reads P COUNT" or "error P MESSAGE".
    wait P                         -> "exit P STATUS" once P is gone (STATUS: -signal or exit code)
    quit
"""

from __future__ import annotations

import os
import sys
import time
import traceback

import torch

from fedmerge.store import ModelStore
from fedmerge.store.errors import StoreBusyError
from fedmerge.store.faults import KILL_AT_ENV

BASE_SHAPES: dict[str, tuple[int, ...]] = {
    "layer.weight": (16, 8),
    "layer.bias": (16,),
    "head.weight": (4, 16),
}


def base_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(12345)
    out = {n: torch.randn(s, generator=g) for n, s in BASE_SHAPES.items()}
    out["steps"] = torch.tensor(7, dtype=torch.int64)
    return out


def expected_delta(round_: int) -> dict[str, torch.Tensor]:
    """The delta a worker commits for ``round_``: fully determined by it."""
    g = torch.Generator().manual_seed(round_)
    return {n: torch.randn(s, generator=g) for n, s in BASE_SHAPES.items()}


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())


def committer(store_path: str, kill_at: int, seed: int, n: int, workers: int) -> None:
    if kill_at >= 0:
        os.environ[KILL_AT_ENV] = str(kill_at)
    torch.set_num_threads(1)
    pid = os.getpid()
    store = ModelStore.open(store_path, workers=workers)
    say(f"ready {pid}")
    for i in range(n):
        round_ = seed * 1000 + i
        while True:
            try:
                version = store.commit(
                    expected_delta(round_),
                    parents=["latest"],
                    method="fedavg",
                    params={"seed": seed},
                    contributors=[],
                    round=round_,
                    metrics={"i": i},
                    privacy=None,
                    state={"count": torch.tensor([i], dtype=torch.int64)},
                )
                break
            except StoreBusyError:
                time.sleep(0.01)
        say(f"ack {pid} {version.id} {round_}")
    say(f"done {pid}")


def reader(store_path: str, seconds: float) -> None:
    torch.set_num_threads(1)
    pid = os.getpid()
    store = ModelStore.open(store_path)
    base = base_weights()
    count = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        version = store.get("latest")
        weights = store.materialize(version)
        expected = {k: v.clone() for k, v in base.items()}
        for v in store.chain(version)[1:]:
            assert v.round is not None
            for name, t in expected_delta(v.round).items():
                expected[name] += t
        for name, t in expected.items():
            if not torch.allclose(weights[name], t, atol=1e-4):
                say(f"error {pid} version {version.id} tensor {name} differs from its deltas")
                return
        count += 1
    say(f"reads {pid} {count}")


def child(argv: list[str], store_path: str) -> None:
    try:
        if argv[0] == "commit":
            committer(store_path, int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4]))
        else:
            reader(store_path, float(argv[1]))
    except BaseException as exc:  # report, never fall back into the server loop
        say(f"error {os.getpid()} {type(exc).__name__}: {str(exc)[:200]!r}")
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def serve(store_path: str) -> None:
    say("server ready")
    for raw in sys.stdin:
        argv = raw.split()
        if not argv or argv[0] == "quit":
            break
        if argv[0] == "wait":
            pid = int(argv[1])
            _, status = os.waitpid(pid, 0)
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            say(f"exit {pid} {code}")
            continue
        pid = os.fork()
        if pid == 0:
            child(argv, store_path)
        say(f"pid {pid}")


if __name__ == "__main__":
    serve(sys.argv[1])
