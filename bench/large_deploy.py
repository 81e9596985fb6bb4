"""The deployment of ``python -m bench large``: a localhost SuperLink and N SuperNodes running the apps
of ``bench/_flower_large``, each node behind its own simulated wide-area link (``bench/wan_link.py``)
for all its traffic to the SuperLink and to fedmerge's bulk endpoint; the benchmark's store and the
disk-read reference."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.wan_link import NodeLink
from fedmerge_testing.processes import end_tree

APP = Path(__file__).resolve().parent / "_flower_large"
BIN = Path(sys.executable).parent


class LargeBenchError(RuntimeError):
    """A run of the benchmark failed (the tail of the processes' logs is attached)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Deployment:
    """The SuperLink and ``nodes`` SuperNodes; with ``link_bps`` > 0 node i reaches the SuperLink and
    the bulk endpoint (``bulk_port``) only through ``links[i]``, a link of that rate each way."""

    work: Path
    nodes: int
    link_bps: float = 0.0
    bulk_port: int = 0
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    links: list[NodeLink] = field(default_factory=list)

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
        port = free_port()
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
            superlink, node_config = f"127.0.0.1:{port}", f"partition-id={i} num-partitions={self.nodes}"
            if self.link_bps > 0:
                node_link = NodeLink(self.link_bps)
                self.links.append(node_link)
                superlink = f"127.0.0.1:{node_link.forward(('127.0.0.1', port))}"
                if self.bulk_port:
                    via = node_link.forward(("127.0.0.1", self.bulk_port))
                    node_config += f" bench-bulk-via='127.0.0.1:{via}'"
            self.start(
                f"supernode{i}",
                [str(BIN / "flower-supernode"), "--insecure", "--superlink", superlink,
                 "--port", str(free_port()), "--node-config", node_config],
            )  # fmt: skip

    def run(self, config: dict[str, Any], timeout_s: float) -> tuple[dict[str, Any], float]:
        """``flwr run`` of the benchmark app; (the ServerApp's result file, the whole run's seconds)."""
        mode = "flower" if config["bench-mode"] == "flower" else f"fedmerge-{config['bench-codec']}"
        mode = f"{mode}-{config['bench-repeat']}"
        out = Path(str(config["out-dir"])) / f"{mode}-result.json"
        out.unlink(missing_ok=True)
        text = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in config.items())
        t0 = time.perf_counter()
        with (self.work / f"flwr-run-{mode}.log").open("wb") as log:
            proc = subprocess.Popen(
                [str(BIN / "flwr"), "run", str(APP), "bench-large", "--stream", "--run-config", text],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.work,
            )  # fmt: skip
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                end_tree(proc.pid, grace_s=10)
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
            end_tree(proc.pid, grace_s=10)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for link in self.links:
            link.close()

    def events(self) -> list[dict[str, Any]]:
        """The nodes' phase events (``large_app._event``), in the order written."""
        path = self.work / "events.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.work.glob("*.log")))


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
