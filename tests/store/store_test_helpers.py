"""Helpers the store tests share: tiny seeded models and deltas, commit shorthands, a local TCP proxy."""

from __future__ import annotations

import socket
import threading

import torch

from fedmerge.store import Contributor, ModelStore, Version


def tiny_model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(10, 6, generator=g),
        "block.0.weight": torch.randn(6, 6, generator=g).to(torch.bfloat16),
        "block.0.bias": torch.randn(6, generator=g).to(torch.float16),
        "norm.num_batches_tracked": torch.tensor(3, dtype=torch.int64),
        "head.weight": torch.randn(2, 6, generator=g, dtype=torch.float64),
    }


def tiny_delta(base: dict[str, torch.Tensor], seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return {
        n: scale * torch.randn(t.shape, generator=g, dtype=torch.float32)
        for n, t in sorted(base.items())
        if t.is_floating_point()
    }


def contributor(i: int, accepted: bool = True) -> Contributor:
    return Contributor(
        client_id=f"client-{i}",
        num_examples=10 * (i + 1),
        submission_hash=f"{i:064x}",
        accepted=accepted,
        reason=None if accepted else "norm too large",
    )


def commit_delta(
    store: ModelStore, delta: dict[str, torch.Tensor], parent: str, round_: int, **kw: object
) -> Version:
    args: dict[str, object] = {
        "parents": [parent],
        "method": "fedavg",
        "params": {"server_lr": 1.0},
        "contributors": [contributor(0), contributor(1)],
        "round": round_,
        "metrics": {"loss": 0.25},
        "privacy": None,
    }
    args.update(kw)
    return store.commit(delta, **args)  # type: ignore[arg-type]


class LocalProxy:
    """A TCP listener on 127.0.0.1 in front of a real server's ``upstream_port``: each accepted
    connection is handed to :meth:`handle` on its own thread. Subclasses set their own attributes
    before calling ``super().__init__`` (connections may arrive at once)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()
