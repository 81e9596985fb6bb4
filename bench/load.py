"""Load: the gRPC intake under many concurrent clients, and one simulated Flower round with 200 clients.

    python -m bench load [--quick] [--clients N] [--duration S] [--round-clients N]

**Intake.** A real ``serve-continual`` process (bearer tokens on, one token per client; continual
merge worker on, ``opcm`` in batches of 16 by default, over a small base model of 61 696 fp32
parameters so an expert checkpoint is 247 KB) takes submissions from ``--clients`` concurrent clients
(default 100) for a bounded time (60 s; quick 20 s). The clients are threads spread over a few
OS processes (default 4), each submitting distinct experts (seeded fine-tuned checkpoints) one after
another through :func:`fedmerge.service.client.submit_expert`, and retrying only on errors the client
library marks retryable (``ServiceCallError.retryable``), with capped exponential back-off.

* ack latency: from the first attempt of a submission to its acknowledgement (retries included);
* time to merged: from the first attempt to the ``created_at`` of the version that merged it;
* after the time is up the queue is drained (every acknowledged id polled with ``GetSubmission``
  until merged or rejected), the server's peak RSS (``VmHWM``) is read, the server is stopped and
  the store verified: every acknowledged submission's sha256 must appear as a contributor of exactly
  one version, the one ``GetSubmission`` names (``lost`` counts the others, ``duplicated`` those
  merged more than once). A server exit before the stop counts as a crash; it is restarted on the
  same port so the verification still covers what was acknowledged before it.

The server runs with ``OMP_NUM_THREADS=1`` (``--server-threads``): on 2 shared cores torch's
intra-op threads make the merge many times slower.

**Round.** One round of the fedmerge ServerApp (FedAvg of top-10 % int8 task vectors, a committed
version) over ``--round-clients`` SuperNodes (default 200), all sampled, on Flower's simulation
engine, versus Flower's built-in ``FedAvg`` strategy with the quickstart-style dense ClientApp of
``bench/rounds.py`` over the same clients, task (digits), partitions and local training, each side
in its own process (its peak RSS is the ServerApp + simulation driver process). Reported: the round's
wall time (inside the ServerApp, evaluation included), replies accepted, and that the committed
version lists every client as accepted in its manifest.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from fedmerge_bench._load_round import run_round

ROOT = Path(__file__).resolve().parents[1]
# the base model: 61 696 fp32 parameters, so a full fine-tuned checkpoint is 247 080 bytes
BASE_SHAPES: dict[str, tuple[int, ...]] = {
    "l1.weight": (192, 256),
    "l1.bias": (192,),
    "l2.weight": (64, 192),
    "l2.bias": (64,),
}
EXPERT_SCALE = 0.01  # std of the fine-tuning noise added to the base in each expert


# ------------------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class LoadConfig:
    """Settings of the intake load: ``clients`` concurrent clients over ``processes`` OS processes,
    submitting for ``duration_s``; the server's merger (``method``, ``batch_size``), per-client queue
    quota (``max_queued``), gRPC handler threads (``max_workers``) and torch threads."""

    clients: int = 100
    duration_s: float = 60.0
    processes: int = 4
    method: str = "opcm"
    batch_size: int = 16
    max_queued: int = 64
    max_workers: int = 128
    server_threads: int = 1
    drain_timeout_s: float = 600.0
    give_up_s: float = 60.0
    startup_s: float = 5.0
    seed: int = 0


@dataclass
class IntakeResult:
    """Everything measured by :func:`run_intake_load` (times in seconds unless named ``_ms``)."""

    clients: int
    duration_s: float
    acknowledged: int
    duplicate_acks: int
    submissions_per_s: float
    ack_p50_ms: float
    ack_p95_ms: float
    ack_p99_ms: float
    attempt_p50_ms: float
    attempt_p99_ms: float
    merged_p50_s: float
    merged_p99_s: float
    drain_s: float
    peak_rss_mib: float
    retryable_errors: int
    retryable_by_code: dict[str, int]
    non_retryable_errors: int
    abandoned: int
    lost: int
    duplicated: int
    rejected: int
    merged_unacknowledged: int
    versions: int
    crashes: int
    server_exit_code: int | None
    worker_errors_logged: int
    store_ok: bool
    expert_bytes: int
    errors: list[str] = field(default_factory=list)
    acked_sha256: list[str] = field(default_factory=list, repr=False)


# ------------------------------------------------------------------------------------ helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_kib(pid: int, key: str) -> int:
    """A ``/proc/<pid>/status`` field in KiB (0 when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _token(seed: int, index: int) -> str:
    return hashlib.sha256(f"fedmerge-load/{seed}/{index}".encode()).hexdigest()[:40]


def _client_id(index: int) -> str:
    return f"load-client-{index:04d}"


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def write_base(path: Path, seed: int) -> dict[str, np.ndarray]:
    """The seeded base weights, saved as safetensors at ``path``."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in BASE_SHAPES.items()}
    save_file(base, str(path))
    return base


def expert_bytes(base: dict[str, np.ndarray], seed: int, client: int, k: int) -> bytes:
    """Expert ``k`` of ``client``: θ₀ + 0.01·N(0, 1), seeded by (seed, client, k), as safetensors bytes."""
    from safetensors.numpy import save

    rng = np.random.default_rng([seed, client, k])
    return save(
        {n: (w + EXPERT_SCALE * rng.standard_normal(w.shape).astype(np.float32)) for n, w in base.items()}
    )


# ------------------------------------------------------------------------------------ client side


class _Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acks: list[dict[str, Any]] = []
        self.retryable: dict[str, int] = {}
        self.non_retryable = 0
        self.abandoned = 0
        self.errors: list[str] = []


def _client_loop(spec: dict[str, Any], index: int, base: dict[str, np.ndarray], counters: _Counters) -> None:
    """One client: submit distinct experts until ``end_at``; retry only errors marked retryable."""
    from fedmerge.service.client import ClientOptions, ServiceCallError, submit_expert

    opts = ClientOptions(spec["target"], token=_token(spec["seed"], index))
    jitter = random.Random(hashlib.sha256(f"{spec['seed']}/{index}".encode()).digest())
    while time.time() < spec["start_at"]:
        time.sleep(min(0.05, max(0.0, spec["start_at"] - time.time())))
    k = 0
    while time.time() < spec["end_at"]:
        data = expert_bytes(base, spec["seed"], index, k)
        sha = hashlib.sha256(data).hexdigest()
        started_wall, started = time.time(), time.perf_counter()
        give_up = spec["end_at"] + spec["give_up_s"]
        delay, attempts = 0.05, 0
        while True:
            attempts += 1
            attempt_t0 = time.perf_counter()
            try:
                reply = submit_expert(opts, data, fmt="checkpoint", retries=0, timeout=120.0)
            except ServiceCallError as exc:
                code = exc.code.name if exc.code is not None else "NONE"
                if exc.retryable and time.time() < give_up:
                    with counters.lock:
                        counters.retryable[code] = counters.retryable.get(code, 0) + 1
                    time.sleep(delay * (0.5 + jitter.random()))
                    delay = min(2 * delay, 2.0)
                    continue
                with counters.lock:
                    if exc.retryable:
                        counters.abandoned += 1
                    else:
                        counters.non_retryable += 1
                    if len(counters.errors) < 20:
                        counters.errors.append(f"{_client_id(index)}: {exc}")
                break
            done = time.perf_counter()
            with counters.lock:
                counters.acks.append(
                    {
                        "id": reply.submission_id,
                        "sha256": sha,
                        "reply_sha256": reply.sha256,
                        "duplicate": bool(reply.duplicate),
                        "client": _client_id(index),
                        "started": started_wall,
                        "latency_s": done - started,
                        "attempt_s": done - attempt_t0,
                        "attempts": attempts,
                    }
                )
            break
        k += 1


def client_process(spec_path: Path) -> int:
    """Entry of one client OS process: run its client threads, write the results to ``spec['out']``."""
    from safetensors.numpy import load_file

    spec = json.loads(spec_path.read_text())
    base = load_file(spec["base"])
    counters = _Counters()
    threads = [
        threading.Thread(target=_client_loop, args=(spec, i, base, counters), daemon=True)
        for i in spec["clients"]
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = {
        "acks": counters.acks,
        "retryable": counters.retryable,
        "non_retryable": counters.non_retryable,
        "abandoned": counters.abandoned,
        "errors": counters.errors,
    }
    tmp = Path(spec["out"] + ".tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, spec["out"])
    return 0


# ------------------------------------------------------------------------------------ server side


class _Server:
    """``serve-continual`` in a subprocess on a fixed port; a monitor thread tracks peak RSS and
    restarts it (counting a crash) if it exits before :meth:`stop`."""

    def __init__(self, work: Path, cfg: LoadConfig) -> None:
        self.work, self.cfg = work, cfg
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.crashes = 0
        self.peak_kib = 0
        self.stopping = threading.Event()
        self._monitor: threading.Thread | None = None
        self.log = work / "server.log"

    def _cmd(self) -> list[str]:
        c = self.cfg
        return [
            sys.executable, "-m", "fedmerge.service.cli", "serve-continual",
            "--store", str(self.work / "store"), "--base-weights", str(self.work / "base.safetensors"),
            "--listen", f"127.0.0.1:{self.port}", "--tokens", str(self.work / "tokens.txt"),
            "--port-file", str(self.work / "port"), "--method", c.method, "--batch-size", str(c.batch_size),
            "--max-queued", str(c.max_queued), "--max-workers", str(c.max_workers),
        ]  # fmt: skip

    def _launch(self, timeout: float = 120.0) -> None:
        port_file = self.work / "port"
        port_file.unlink(missing_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.cfg.server_threads)}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self._cmd(), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"intake server did not start: {self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def start(self) -> None:
        self._launch()
        self._monitor = threading.Thread(target=self._watch, daemon=True)
        self._monitor.start()

    def _watch(self) -> None:
        while not self.stopping.is_set():
            proc = self.proc
            assert proc is not None
            self.peak_kib = max(self.peak_kib, _proc_kib(proc.pid, "VmHWM"))
            if proc.poll() is not None and not self.stopping.is_set():
                self.crashes += 1
                self._launch()
            self.stopping.wait(0.2)

    def peak_rss_kib(self) -> int:
        if self.proc is not None:
            self.peak_kib = max(self.peak_kib, _proc_kib(self.proc.pid, "VmHWM"))
        return self.peak_kib

    def stop(self) -> int | None:
        """SIGTERM (graceful); returns the exit code (None if it had to be killed)."""
        self.stopping.set()
        if self._monitor is not None:
            self._monitor.join(10)
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
                return None
        return self.proc.returncode


def _drain(target: str, token: str, acked_ids: list[str], timeout: float) -> tuple[dict[str, Any], float]:
    """Poll ``GetSubmission`` for every id (in arrival order) until merged/rejected/failed or the
    timeout; returns (id → Submission, seconds spent). ``token`` must be an operator's (it reads every
    client's submissions)."""
    import grpc

    from fedmerge.service.client import ClientOptions, connect
    from fedmerge.v1 import intake_pb2, intake_pb2_grpc

    opts = ClientOptions(target, token=token)
    final = {
        intake_pb2.SUBMISSION_STATE_MERGED,
        intake_pb2.SUBMISSION_STATE_REJECTED,
        intake_pb2.SUBMISSION_STATE_FAILED,
    }
    out: dict[str, Any] = {}
    t0 = time.monotonic()
    deadline = t0 + timeout
    with connect(opts) as channel:
        stub = intake_pb2_grpc.ExpertIntakeStub(channel)
        for sid in acked_ids:
            while True:
                try:
                    sub = stub.GetSubmission(
                        intake_pb2.GetSubmissionRequest(submission_id=sid),
                        metadata=opts.metadata(),
                        timeout=30,
                    )
                    out[sid] = sub
                    if sub.state in final:
                        break
                except grpc.RpcError as exc:
                    if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise
                if time.monotonic() > deadline:
                    return out, time.monotonic() - t0
                time.sleep(0.1)
    return out, time.monotonic() - t0


def _iso_seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def run_intake_load(cfg: LoadConfig, work: Path, console: Console | None = None) -> IntakeResult:
    """Run the intake load in ``work`` (see the module docstring) and verify nothing acknowledged
    was lost or merged twice."""
    from fedmerge.store import ModelStore
    from fedmerge.v1 import intake_pb2

    say = console.log if console is not None else (lambda *a, **k: None)
    work.mkdir(parents=True, exist_ok=True)
    base = write_base(work / "base.safetensors", cfg.seed)
    # client 0 is also the operator: _drain reads every client's submission with its token, and
    # GetSubmission answers NOT_FOUND to anyone but the submitter or an operator
    (work / "tokens.txt").write_text(
        "".join(
            f"{_client_id(i)} {_token(cfg.seed, i)}{' operator' if i == 0 else ''}\n"
            for i in range(cfg.clients)
        )
    )
    server = _Server(work, cfg)
    server.start()
    target = f"127.0.0.1:{server.port}"
    procs: list[subprocess.Popen[bytes]] = []
    nproc = max(1, min(cfg.processes, cfg.clients))
    exit_code: int | None = None
    try:
        start_at = time.time() + cfg.startup_s
        end_at = start_at + cfg.duration_s
        outs = []
        for p in range(nproc):
            out = work / f"clients-{p}.json"
            spec = {
                "target": target, "seed": cfg.seed, "base": str(work / "base.safetensors"),
                "clients": list(range(p, cfg.clients, nproc)), "start_at": start_at, "end_at": end_at,
                "give_up_s": cfg.give_up_s, "out": str(out),
            }  # fmt: skip
            spec_path = work / f"clients-{p}.spec.json"
            spec_path.write_text(json.dumps(spec))
            with (work / f"clients-{p}.log").open("wb") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "bench.load", "--client", str(spec_path)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        cwd=ROOT,
                    )
                )
            outs.append(out)
        say(f"{cfg.clients} clients in {nproc} processes submitting for {cfg.duration_s:.0f} s to {target}")
        for proc in procs:
            proc.wait(cfg.startup_s + cfg.duration_s + cfg.give_up_s + 300)
        failed = [p.args for p in procs if p.returncode != 0]
        if failed:
            logs = "".join((work / f"clients-{i}.log").read_text()[-2000:] for i in range(nproc))
            raise RuntimeError(f"client process(es) failed: {logs}")
        results = [json.loads(o.read_text()) for o in outs]
        acks = sorted((a for r in results for a in r["acks"]), key=lambda a: a["started"])
        say(f"{len(acks)} acknowledged; draining the queue")
        acked_ids = list(dict.fromkeys(a["id"] for a in acks))
        subs, drain_s = _drain(target, _token(cfg.seed, 0), acked_ids, cfg.drain_timeout_s)
        peak_kib = server.peak_rss_kib()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        exit_code = server.stop()

    # ------------------------------------------------------------------ verification from the store
    counts: dict[str, int] = {}
    version_of: dict[str, str] = {}
    created: dict[str, float] = {}
    with ModelStore.open(work / "store") as store:
        store_ok = store.verify().ok
        versions = [v for v in store.list() if v.method == cfg.method]
        for v in versions:
            created[v.id] = _iso_seconds(v.created_at)
            for c in v.contributors:
                counts[c.submission_hash] = counts.get(c.submission_hash, 0) + 1
                version_of[c.submission_hash] = v.id
        head_merged = int(store.get("continual").metadata["num_merged"]) if versions else 0
    errors: list[str] = [e for r in results for e in r["errors"]]
    lost = duplicated = rejected = 0
    merged_s: list[float] = []
    by_sha = {a["sha256"]: a for a in acks}
    for sha, a in by_sha.items():
        sub = subs.get(a["id"])
        n = counts.get(sha, 0)
        if a["reply_sha256"] != sha:
            errors.append(f"{a['id']}: acknowledged sha256 {a['reply_sha256'][:12]}… ≠ sent {sha[:12]}…")
        if sub is not None and sub.state in (
            intake_pb2.SUBMISSION_STATE_REJECTED,
            intake_pb2.SUBMISSION_STATE_FAILED,
        ):
            rejected += 1  # rejected or failed (dead letter): not merged, with its reason
            state = "failed" if sub.state == intake_pb2.SUBMISSION_STATE_FAILED else "rejected"
            errors.append(f"{a['id']} {state}: {sub.reason}")
            continue
        if n > 1:
            duplicated += 1
        if n == 0 or sub is None or sub.state != intake_pb2.SUBMISSION_STATE_MERGED:
            lost += 1
            continue
        if sub.version != version_of[sha]:
            lost += 1
            errors.append(f"{a['id']}: GetSubmission says {sub.version}, the store {version_of[sha]}")
            continue
        merged_s.append(created[sub.version] - a["started"])
    if head_merged != sum(counts.values()):
        errors.append(f"head num_merged={head_merged} but {sum(counts.values())} contributors committed")
    log_text = server.log.read_text(errors="replace")
    latencies = [a["latency_s"] * 1e3 for a in acks]
    attempts = [a["attempt_s"] * 1e3 for a in acks]
    retryable: dict[str, int] = {}
    for r in results:
        for code, n in r["retryable"].items():
            retryable[code] = retryable.get(code, 0) + n
    return IntakeResult(
        clients=cfg.clients,
        duration_s=cfg.duration_s,
        acknowledged=len(by_sha),
        duplicate_acks=sum(a["duplicate"] for a in acks),
        submissions_per_s=len(by_sha) / cfg.duration_s,
        ack_p50_ms=_percentile(latencies, 50),
        ack_p95_ms=_percentile(latencies, 95),
        ack_p99_ms=_percentile(latencies, 99),
        attempt_p50_ms=_percentile(attempts, 50),
        attempt_p99_ms=_percentile(attempts, 99),
        merged_p50_s=_percentile(merged_s, 50),
        merged_p99_s=_percentile(merged_s, 99),
        drain_s=drain_s,
        peak_rss_mib=peak_kib / 1024,
        retryable_errors=sum(retryable.values()),
        retryable_by_code=retryable,
        non_retryable_errors=sum(r["non_retryable"] for r in results),
        abandoned=sum(r["abandoned"] for r in results),
        lost=lost,
        duplicated=duplicated,
        rejected=rejected,
        merged_unacknowledged=len(set(counts) - set(by_sha)),
        versions=len(versions),
        crashes=server.crashes,
        server_exit_code=exit_code,
        worker_errors_logged=log_text.count("merge step failed"),
        store_ok=store_ok,
        expert_bytes=len(expert_bytes(base, cfg.seed, 0, 0)),
        errors=errors[:20],
        acked_sha256=sorted(by_sha),
    )


# ------------------------------------------------------------------------------------ report


def _tables(console: Console, intake: IntakeResult | None, rnd: dict[str, Any] | None) -> None:
    if intake is not None:
        t = Table(
            title=f"intake: {intake.clients} concurrent clients for {intake.duration_s:.0f} s, "
            f"{intake.expert_bytes / 1e3:.0f} KB experts, bearer auth, continual merge worker on"
        )
        t.add_column("measure")
        t.add_column("value", justify="right")
        rows = [
            ("acknowledged submissions", f"{intake.acknowledged}"),
            ("submissions / s", f"{intake.submissions_per_s:.1f}"),
            ("ack latency p50 / p95 / p99, ms (retries incl.)",
             f"{intake.ack_p50_ms:.0f} / {intake.ack_p95_ms:.0f} / {intake.ack_p99_ms:.0f}"),
            ("successful attempt p50 / p99, ms",
             f"{intake.attempt_p50_ms:.0f} / {intake.attempt_p99_ms:.0f}"),
            ("time to merged p50 / p99, s", f"{intake.merged_p50_s:.2f} / {intake.merged_p99_s:.2f}"),
            ("queue drain after the load, s", f"{intake.drain_s:.1f}"),
            ("versions committed", f"{intake.versions}"),
            ("server peak RSS (VmHWM), MiB", f"{intake.peak_rss_mib:.0f}"),
            ("retryable errors (retried)", f"{intake.retryable_errors} {intake.retryable_by_code or ''}"),
            ("non-retryable errors", f"{intake.non_retryable_errors}"),
            ("abandoned after retries", f"{intake.abandoned}"),
            ("duplicate acknowledgements (idempotent resend)", f"{intake.duplicate_acks}"),
            ("lost acknowledged", f"{intake.lost}"),
            ("merged more than once", f"{intake.duplicated}"),
            ("rejected by the merge worker", f"{intake.rejected}"),
            ("server crashes / exit code", f"{intake.crashes} / {intake.server_exit_code}"),
            ("merge-step failures logged", f"{intake.worker_errors_logged}"),
            ("store verify", "ok" if intake.store_ok else "FAILED"),
        ]  # fmt: skip
        for label, value in rows:
            t.add_row(label, value)
        console.print(t)
        for e in intake.errors:
            console.print(f"[red]{e}[/]")
    if rnd is not None:
        ours, ref = rnd["fedmerge"], rnd["flower"]
        t = Table(
            title=f"one simulated round, {ours['manifest_contributors']} SuperNodes all sampled, digits",
            caption="fedmerge: FedAvg of top-10 % int8 task vectors, version committed; "
            "Flower: built-in FedAvg, dense fp32 weights",
        )
        for col in ("", "fedmerge", "Flower FedAvg", "ratio"):
            t.add_column(col, justify="right")
        ref_round = ref["round_s"][0]
        t.add_row("round wall time, s", f"{ours['round_s']:.2f}", f"{ref_round:.2f}",
                  f"{ours['round_s'] / ref_round:.3f}")  # fmt: skip
        t.add_row("process wall time (Ray incl.), s", f"{ours['total_s']:.1f}", f"{ref['total_s']:.1f}",
                  f"{ours['total_s'] / ref['total_s']:.3f}")  # fmt: skip
        t.add_row("server peak RSS, MiB", f"{ours['peak_rss'] / 2**20:.0f}", f"{ref['peak_rss'] / 2**20:.0f}",
                  f"{ours['peak_rss'] / ref['peak_rss']:.3f}")  # fmt: skip
        t.add_row("replies accepted", f"{ours['accepted']}", "n/a", "")
        t.add_row("accepted in the manifest", f"{ours['manifest_accepted']}", "n/a", "")
        t.add_row("accuracy after round 1", f"{ours['accuracy']:.3f}", f"{ref['accuracy'][-1]:.3f}", "")
        console.print(t)
        for r in ours["rejected"]:
            console.print(f"[red]rejected: {r}[/]")


def summary(intake: IntakeResult | None, rnd: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON summary (keys named in the module's contract; None for a skipped part)."""
    out: dict[str, Any] = {"benchmark": "load"}
    if intake is not None:
        out.update(
            intake_clients=intake.clients,
            intake_duration_s=intake.duration_s,
            intake_acknowledged=intake.acknowledged,
            intake_submissions_per_s=round(intake.submissions_per_s, 2),
            intake_p50_ms=round(intake.ack_p50_ms, 1),
            intake_p95_ms=round(intake.ack_p95_ms, 1),
            intake_p99_ms=round(intake.ack_p99_ms, 1),
            intake_merged_p50_s=round(intake.merged_p50_s, 3),
            intake_merged_p99_s=round(intake.merged_p99_s, 3),
            intake_peak_rss_mib=round(intake.peak_rss_mib, 1),
            intake_retryable_errors=intake.retryable_errors,
            intake_non_retryable_errors=intake.non_retryable_errors,
            intake_lost_acknowledged=intake.lost,
            intake_duplicated=intake.duplicated,
            intake_crashes=intake.crashes,
        )
    if rnd is not None:
        ours, ref = rnd["fedmerge"], rnd["flower"]
        out.update(
            round_clients=ours["manifest_contributors"],
            round_time_s=round(ours["round_s"], 3),
            round_time_vs_flower_fedavg=round(ours["round_s"] / ref["round_s"][0], 4),
            round_server_peak_rss_mib=round(ours["peak_rss"] / 2**20, 1),
            round_server_peak_rss_vs_flower_fedavg=round(ours["peak_rss"] / ref["peak_rss"], 4),
            round_accepted=ours["accepted"],
            round_manifest_accepted=ours["manifest_accepted"],
        )
    out["cpu_count"] = os.cpu_count()
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench load", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="intake for 20 s instead of 60 s")
    ap.add_argument("--clients", type=int, default=100, help="concurrent intake clients")
    ap.add_argument("--processes", type=int, default=4, help="client OS processes")
    ap.add_argument("--duration", type=float, default=None, help="seconds of intake load")
    ap.add_argument("--method", default="opcm", help="continual merger of the server")
    ap.add_argument("--batch-size", type=int, default=16, help="experts merged per committed version")
    ap.add_argument("--max-queued", type=int, default=64, help="per-client queued experts limit")
    ap.add_argument("--server-threads", type=int, default=1, help="OMP_NUM_THREADS of the server")
    ap.add_argument("--round-clients", type=int, default=200, help="simulated SuperNodes in the round")
    ap.add_argument("--skip-intake", action="store_true")
    ap.add_argument("--skip-round", action="store_true")
    ap.add_argument("--client", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.client is not None:
        return client_process(args.client)
    console = Console()
    cfg = LoadConfig(
        clients=args.clients,
        duration_s=args.duration or (20.0 if args.quick else 60.0),
        processes=args.processes,
        method=args.method,
        batch_size=args.batch_size,
        max_queued=args.max_queued,
        server_threads=args.server_threads,
    )
    intake: IntakeResult | None = None
    rnd: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="fedmerge-bench-load-") as tmp:
        if not args.skip_intake:
            intake = run_intake_load(cfg, Path(tmp) / "intake", console)
            console.log(f"intake config: {asdict(cfg)}")
        if not args.skip_round:
            rnd = run_round(args.round_clients, Path(tmp), console)
    _tables(console, intake, rnd)
    print(json.dumps(summary(intake, rnd)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
