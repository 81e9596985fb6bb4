"""Helpers for the service tests: a tiny seeded base model in a real store, expert files, server processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from fedmerge.service.config import ServiceConfig
from fedmerge.service.server import IntakeServer
from fedmerge.store import ModelStore
from fedmerge_testing.hostile import tiny_base

TOKENS = {f"token-for-client-{i:02d}-xxxxxxxx": f"client-{i:02d}" for i in range(64)}
TOKEN = "token-for-client-00-xxxxxxxx"


def base_weights(seed: int = 0, width: int = 16) -> dict[str, torch.Tensor]:
    return tiny_base(seed, width)


def finetuned(base: dict[str, torch.Tensor], seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return {
        k: (v + scale * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v.clone()
        for k, v in base.items()
    }


def write_expert(directory: Path, base: dict[str, torch.Tensor], seed: int) -> Path:
    path = directory / f"expert-{seed:03d}.safetensors"
    save_file(finetuned(base, seed), str(path))
    return path


def make_store(root: Path, width: int = 16) -> Path:
    store = root / "store"
    with ModelStore.open(store) as s:
        s.commit_base(base_weights(width=width), name="tiny")
    return store


def server_config(store: Path, **overrides: object) -> ServiceConfig:
    kw: dict[str, object] = {
        "store": store,
        "listen": "127.0.0.1:0",
        "method": "opcm",
        "tokens": dict(TOKENS),
        "max_workers": 64,
    }
    kw.update(overrides)
    return ServiceConfig(**kw)  # type: ignore[arg-type]


def target(srv: IntakeServer) -> str:
    return f"127.0.0.1:{srv.port}"


class ServerProcess:
    """``python -m fedmerge.service.cli serve-continual`` in a subprocess on a free port."""

    def __init__(self, store: Path, tokens_file: Path, log: Path, *extra: str) -> None:
        self.store, self.tokens_file, self.log, self.extra = store, tokens_file, log, extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, timeout: float = 60.0) -> int:
        port_file = self.store.parent / "port"
        port_file.unlink(missing_ok=True)
        cmd = [
            sys.executable, "-m", "fedmerge.service.cli", "serve-continual",
            "--store", str(self.store), "--listen", "127.0.0.1:0", "--tokens", str(self.tokens_file),
            "--port-file", str(port_file), *self.extra,
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        return self.port

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


def write_tokens(path: Path) -> Path:
    path.write_text("".join(f"{client} {token}\n" for token, client in TOKENS.items()))
    return path
