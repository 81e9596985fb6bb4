"""The intake entry point: a real intake server process on localhost, one case after the other."""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedmerge.codec import CodecConfig, PackageMeta, encode_package

if TYPE_CHECKING:
    import grpc
from fedmerge_testing.hostile.corpus import cases_for
from fedmerge_testing.hostile.data import MIB, Attack, Auth, HostileCase, HostileRunError, Valid
from fedmerge_testing.hostile.mutations import synthetic_delta
from fedmerge_testing.hostile.outcomes import Outcome, store_snapshot, unchanged

# ------------------------------------------------------------------------------------------ intake


TOKENS: dict[str, str] = {f"hostile-token-{i:02d}-xxxxxxxxxxxx": f"client-{i:02d}" for i in range(8)}
TOKEN = next(iter(TOKENS))
WRONG_TOKEN = "not-a-token-of-this-server-xxxx"
INTAKE_LIMIT = MIB
INTAKE_MESSAGE_LIMIT = 2 * MIB
INTAKE_WORKERS = 8
# serve-continual options of the intake runs: stalled streams are dropped after 1 s of silence
INTAKE_SERVER_ARGS = ("--stream-idle-timeout-s", "1")


def tiny_base(seed: int = 0, width: int = 32) -> dict[str, torch.Tensor]:
    """A tiny seeded two-layer model (plus an integer buffer) as the intake's base version."""
    g = torch.Generator().manual_seed(seed)
    return {
        "l1.weight": torch.randn(width, 8, generator=g),
        "l1.bias": torch.randn(width, generator=g),
        "l2.weight": torch.randn(4, width, generator=g),
        "l2.bias": torch.randn(4, generator=g),
        "steps": torch.tensor([7], dtype=torch.int64),
    }


class IntakeProcess:
    """``python -m fedmerge.service.cli serve-continual`` on a fresh store under ``workdir``."""

    def __init__(
        self, workdir: str | os.PathLike[str], *extra: str, max_workers: int = INTAKE_WORKERS
    ) -> None:
        from fedmerge.store import ModelStore

        self.dir = Path(workdir)
        self.store = self.dir / "store"
        self.dir.mkdir(parents=True, exist_ok=True)
        with ModelStore.open(self.store) as s:
            if not s.list(limit=1):
                s.commit_base(tiny_base(), name="tiny")
        self.tokens = self.dir / "tokens.txt"
        self.tokens.write_text("".join(f"{c} {t}\n" for t, c in TOKENS.items()))
        self.log = self.dir / "server.log"
        self.extra = extra
        self.max_workers = max_workers
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> int:
        port_file = self.dir / "port"
        port_file.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "fedmerge.service.cli",
            "serve-continual",
            "--store",
            str(self.store),
            "--listen",
            "127.0.0.1:0",
            "--tokens",
            str(self.tokens),
            "--port-file",
            str(port_file),
            "--max-submission-bytes",
            str(INTAKE_LIMIT),
            "--max-message-bytes",
            str(INTAKE_MESSAGE_LIMIT),
            "--max-workers",
            str(self.max_workers),
            *self.extra,
        ]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise HostileRunError(f"intake server did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        return self.port

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)

    def __enter__(self) -> IntakeProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def channel(target: str) -> grpc.Channel:
    import grpc

    opts = [("grpc.max_send_message_length", 64 * MIB), ("grpc.max_receive_message_length", 64 * MIB)]
    return grpc.insecure_channel(target, options=opts)


def metadata(auth: Auth, token: str = TOKEN) -> tuple[tuple[str, str], ...]:
    if auth == "none":
        return ()
    return (("authorization", f"Bearer {WRONG_TOKEN if auth == 'wrong' else token}"),)


def submit_messages(attack: Attack, label: str = "") -> list[Any]:
    """The SubmitChunk stream of ``attack``: header (with overrides), data chunks, framing faults."""
    from fedmerge.service.client import FORMATS
    from fedmerge.v1 import intake_pb2

    data = attack.payload or b""
    header = intake_pb2.SubmitHeader(
        format=FORMATS[attack.fmt],
        total_size=len(data),
        sha256=hashlib.sha256(data).hexdigest() if attack.declare_sha and data else "",
        label=label,
    )
    for key, value in attack.header.items():
        setattr(header, key, value)
    chunks = [data[i : i + attack.chunk_size] for i in range(0, len(data), attack.chunk_size)]
    if attack.reorder and len(chunks) >= 2:
        chunks[0], chunks[1] = chunks[1], chunks[0]
    msgs = [intake_pb2.SubmitChunk(header=header)] + [intake_pb2.SubmitChunk(data=c) for c in chunks]
    if attack.framing == "data-first":
        msgs.insert(0, intake_pb2.SubmitChunk(data=chunks[0] if chunks else b"x"))
    elif attack.framing == "second-header":
        msgs.insert(2, intake_pb2.SubmitChunk(header=header))
    return msgs


@dataclass
class Sent:
    """The direct answer to one intake call: a SubmitReply, or a gRPC status and its details."""

    ok: bool
    code: str = "OK"
    details: str = ""
    submission_id: str = ""
    duplicate: bool = False

    @property
    def text(self) -> str:
        if self.ok:
            return f"acknowledged {self.submission_id}" + (" (duplicate)" if self.duplicate else "")
        return f"{self.code}: {self.details}"


def send(target: str, attack: Attack, *, label: str = "", token: str = TOKEN, timeout: float = 60.0) -> Sent:
    """Send ``attack`` to the intake at ``target`` (SubmitExpert, or BulkUpload for ``bulk_offset``)."""
    import grpc

    from fedmerge.v1 import intake_pb2, intake_pb2_grpc

    md = metadata(attack.auth, token)
    with channel(target) as ch:
        try:
            if attack.bulk_offset is not None:
                data = attack.payload or b""
                sha = hashlib.sha256(data).hexdigest()
                bulk = intake_pb2_grpc.BulkUploadStub(ch)
                bulk.Begin(
                    intake_pb2.BulkBeginRequest(sha256=sha, total_size=len(data)),
                    metadata=md,
                    timeout=timeout,
                )
                chunk = intake_pb2.BulkChunk(sha256=sha, offset=attack.bulk_offset, data=data)
                status = bulk.Upload(iter([chunk]), metadata=md, timeout=timeout)
                return Sent(True, details=f"offset {status.offset}")
            reply = intake_pb2_grpc.ExpertIntakeStub(ch).SubmitExpert(
                iter(submit_messages(attack, label)), metadata=md, timeout=timeout
            )
            return Sent(True, submission_id=reply.submission_id, duplicate=reply.duplicate)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            return Sent(False, code.name if code is not None else "UNKNOWN", details or "")


class Stall:
    """A SubmitExpert stream that sends its header and first data chunk, then waits until
    :meth:`release` (or the server ends the call). ``done()``: whether the call has ended."""

    def __init__(self, target: str, attack: Attack, *, label: str = "stall") -> None:
        from fedmerge.v1 import intake_pb2_grpc

        self._go = threading.Event()
        msgs = submit_messages(replace(attack, chunk_size=max(1, len(attack.payload or b"x") // 2)), label)
        self._channel = channel(target)

        def stream() -> Iterator[Any]:
            yield from msgs[:2]
            self._go.wait()

        stub = intake_pb2_grpc.ExpertIntakeStub(self._channel)
        self.future = stub.SubmitExpert.future(stream(), metadata=metadata(attack.auth))

    def done(self) -> bool:
        return bool(self.future.done())

    def answer(self) -> str:
        """The call's status once it ended (``CODE: details``), or ``running``."""
        if not self.future.done():
            return "running"
        exc = self.future.exception()
        if exc is None:
            return "OK"
        return f"{exc.code().name}: {exc.details()}"

    def release(self) -> None:
        self.future.cancel()
        self._go.set()
        self._channel.close()


def serving(target: str, timeout: float = 5.0) -> bool:
    """Whether the intake answers a valid ListVersions within ``timeout`` seconds."""
    import grpc

    from fedmerge.v1 import intake_pb2, intake_pb2_grpc

    with channel(target) as ch:
        try:
            intake_pb2_grpc.ExpertIntakeStub(ch).ListVersions(
                intake_pb2.ListVersionsRequest(limit=1), metadata=metadata("valid"), timeout=timeout
            )
            return True
        except grpc.RpcError:
            return False


def settle(
    target: str, submission_id: str, timeout: float = 30.0, *, token: str = TOKEN
) -> tuple[str, str, str]:
    """(state, version, reason) of a submission once merged or rejected (``queued`` at the timeout,
    ``unknown`` when the server does not know the id — or when ``token``'s client did not submit it:
    a client reads only its own submissions)."""
    import grpc

    from fedmerge.service.client import STATE_NAMES
    from fedmerge.v1 import intake_pb2, intake_pb2_grpc

    end = time.monotonic() + timeout
    request = intake_pb2.GetSubmissionRequest(submission_id=submission_id)
    with channel(target) as ch:
        stub = intake_pb2_grpc.ExpertIntakeStub(ch)
        while True:
            try:
                sub = stub.GetSubmission(request, metadata=metadata("valid", token), timeout=5.0)
                state = STATE_NAMES.get(sub.state, "queued")
                if state != "queued" or time.monotonic() > end:
                    return state, sub.version, sub.reason
            except grpc.RpcError:
                if time.monotonic() > end:
                    return "unknown", "", ""
            time.sleep(0.05)


@functools.lru_cache(maxsize=8)
def _intake_root(store: str) -> tuple[str, str, dict[str, torch.Tensor]]:
    """(id, content hash, floating weights) of the store's root version; roots never change."""
    from fedmerge.store import ModelStore

    with ModelStore.open(store) as s:
        root = s.get("v000001")
        weights = s.materialize(root)
    return root.id, root.content_hash, {k: v for k, v in weights.items() if v.is_floating_point()}


def intake_valid(store: Path, seed: int, peer_data: bytes = b"", other_version: str = "v000000") -> Valid:
    """A valid delta package (seeded by ``seed``) for the intake's base, the store's root version."""
    root_id, root_hash, floating = _intake_root(str(Path(store).resolve()))
    meta = PackageMeta("expert", 0, root_id, root_hash, num_examples=10)
    delta = synthetic_delta(floating, seed, scale=0.05)
    codec = CodecConfig(density=0.5, values="int8")
    data = encode_package(delta, codec, meta=meta).data
    return Valid(floating, delta, meta, codec, peer_data or data, "client-00", other_version, INTAKE_LIMIT)


def run_intake(
    workdir: str | os.PathLike[str],
    cases: Sequence[HostileCase] | None = None,
    *,
    stall_s: float = 3.0,
    server_args: Sequence[str] = INTAKE_SERVER_ARGS,
) -> tuple[list[Outcome], dict[str, Any]]:
    """Every intake case against one real server process: a valid expert first (the replay target and
    the 'other' version), then the corpus (each case: send, settle if acknowledged, check the server
    still serves and no version changed), then a second valid expert. Returns the outcomes and a
    summary (valid submissions, every acknowledged id with its final state, lost acknowledged)."""
    cases = [c for c in (cases or cases_for("intake")) if "intake" in c.expect]
    work = Path(workdir)
    outcomes: list[Outcome] = []
    acknowledged: dict[str, str] = {}
    with IntakeProcess(work, *server_args) as srv:
        first = intake_valid(srv.store, seed=1)
        t0 = time.perf_counter()
        sent = send(srv.target, Attack(first.data), label="valid-1")
        if not sent.ok:
            raise HostileRunError(f"the valid expert was refused: {sent.text}")
        state, other, reason = settle(srv.target, sent.submission_id)
        reference_s = time.perf_counter() - t0
        if state != "merged":
            raise HostileRunError(f"the valid expert was not merged: {state} {reason}")
        acknowledged[sent.submission_id] = "valid-1"
        for i, c in enumerate(cases):
            # distinct bytes per case: the intake deduplicates by content, whatever the header says
            valid = intake_valid(srv.store, seed=10 + i, peer_data=first.data, other_version=other)
            out = Outcome(
                c.name,
                c.klass,
                "intake",
                "grpc",
                c.description,
                expect=c.expect["intake"],
                gap=c.gaps.get("intake", ""),
            )
            attack = c.build(valid)
            before = store_snapshot(srv.store)
            allowed: set[str] = set()
            t0 = time.perf_counter()
            if attack.stall_s > 0:
                allowed = _stall(srv, attack, out, stall_s, seed=1000 + i)
            else:
                result = send(srv.target, attack, label=c.name)
                out.error = result.text
                out.acknowledged = result.ok and attack.bulk_offset is None
                out.crash = result.code in ("INTERNAL", "UNKNOWN")
                if out.acknowledged:
                    out.submission_id = result.submission_id
                    acknowledged.setdefault(result.submission_id, c.name)
                    state, version, reason = settle(srv.target, result.submission_id)
                    out.merged = state == "merged" and not result.duplicate
                    if result.duplicate:
                        out.error = (
                            f"acknowledged as duplicate of {result.submission_id} ({state} in {version})"
                        )
                    else:
                        out.error = f"acknowledged {result.submission_id}, then {state}: {reason or version}"
                out.seconds = time.perf_counter() - t0
                out.serving = srv.alive() and serving(srv.target)
            after = store_snapshot(srv.store)
            out.versions_unchanged = unchanged(before, after, allowed_new=allowed)
            out.crash = out.crash or not srv.alive()
            outcomes.append(out)
        last = intake_valid(srv.store, seed=3)
        sent = send(srv.target, Attack(last.data), label="valid-2")
        final_state = settle(srv.target, sent.submission_id)[0] if sent.ok else sent.text
        if sent.ok:
            acknowledged.setdefault(sent.submission_id, "valid-2")
        states = {sid: settle(srv.target, sid, timeout=10.0) for sid in acknowledged}
        alive = srv.alive()
        final = store_snapshot(srv.store)
    lost = [
        sid
        for sid, (state, _, reason) in states.items()
        if state not in ("merged", "rejected") or (state == "rejected" and not reason)
    ]
    summary = {
        "reference_s": reference_s,
        "valid_after_corpus": final_state,
        "server_alive": alive,
        "acknowledged": {
            sid: {"case": acknowledged[sid], "state": s, "version": v, "reason": r}
            for sid, (s, v, r) in states.items()
        },
        "lost_acknowledged": lost,
        "verify": final.get("@verify"),
        "store": str(work / "store"),
    }
    return outcomes, summary


def _stall(srv: IntakeProcess, attack: Attack, out: Outcome, stall_s: float, seed: int) -> set[str]:
    """Open the stalled stream(s); within ``stall_s`` seconds send a valid expert from another client
    and a ListVersions (is the server still serving?) and watch whether the server ends the stalled
    calls; then release them. Returns the versions the valid expert went into (the only versions the
    case may add; with the handler pool exhausted it may be taken after the client gave up on it)."""
    from fedmerge.service.intake import submission_id

    count = srv.max_workers if attack.streams < 0 else attack.streams
    opened = time.monotonic()
    stalls = [Stall(srv.target, attack, label=f"stall-{i}") for i in range(count)]
    spare = intake_valid(srv.store, seed=seed).data
    try:
        time.sleep(0.3)
        bystander = list(TOKENS)[1]  # the stalling client's own extra streams may be refused
        result = send(srv.target, Attack(spare), label="during-stall", token=bystander, timeout=stall_s)
        out.serving = result.ok and serving(srv.target, timeout=1.0)
        while time.monotonic() < opened + stall_s + 0.5 and not all(s.done() for s in stalls):
            time.sleep(0.05)
        ended = [s.answer() for s in stalls if s.done()]
        state = "still serving" if out.serving else "not serving"
        if len(ended) == len(stalls):
            out.error = f"{len(stalls)} stalled stream(s) dropped by the server: {ended[0]}; {state}"
        else:
            out.error = (
                f"{len(stalls) - len(ended)} of {len(stalls)} stalled stream(s) still open after "
                f"{stall_s:g} s (no server-side idle timeout); {state} meanwhile"
            )
    finally:
        for s in stalls:
            s.release()
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and not serving(srv.target, timeout=1.0):
        time.sleep(0.05)
    sid = submission_id(hashlib.sha256(spare).hexdigest())
    state, version, _ = settle(srv.target, sid, timeout=10.0 if result.ok else 2.0, token=bystander)
    return {version} if state == "merged" else set()


def summarize(outcomes: Sequence[Outcome], lost_acknowledged: int) -> dict[str, int]:
    """The counts ``python -m bench hostile`` prints as its last line."""
    return {
        "cases": len(outcomes),
        "crashes": sum(o.crash for o in outcomes),
        "changed_versions": sum(not o.versions_unchanged for o in outcomes),
        "lost_acknowledged": lost_acknowledged,
        "not_serving": sum(not o.serving for o in outcomes),
        "unexpected": sum(not o.as_expected and not o.gap for o in outcomes),
        "known_gaps": sum(not o.as_expected and bool(o.gap) for o in outcomes),
    }


def temporary_workdir(prefix: str = "fedmerge-hostile-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
