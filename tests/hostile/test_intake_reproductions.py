"""Intake reproductions of hostile input that once got through, each against a fresh
``fedmerge serve-continual`` process.

One server process (``python -m fedmerge.cli serve-continual``, the ``fedmerge`` command) takes every
reproduction in turn. Each must be refused with a message naming what is wrong (a gRPC
status, or a submission that ends ``rejected``/``failed`` with its reason), leave every stored version
byte-identical, keep the server's memory (``VmHWM`` of ``/proc/PID/status``: its peak resident set)
and its disk (its ``TMPDIR``, data directory and store, counted by allocated blocks, so sparse files
count for what they occupy) within :data:`SLACK` of the payload's size, and a valid submission sent
right after it must be merged. A second test restarts the server with a failing submission queued.

The measured numbers go to the JSON-lines file named by ``FEDMERGE_INTAKE_REPRO_REPORT`` when set
(``bench/RESULTS.md`` quotes them).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from safetensors.torch import save

from fedmerge.codec import CodecConfig, PackageMeta, encode_package
from fedmerge.service.client import ClientOptions, connect, upload_bulk
from fedmerge.service.intake import IntakeQueue
from fedmerge.store import ModelStore
from fedmerge.v1 import delta_pb2, intake_pb2, intake_pb2_grpc
from fedmerge_testing.hostile import (
    gnu_sparse_member,
    resign,
    store_snapshot,
    synthetic_delta,
    tiny_base,
)

MIB = 1 << 20
SLACK = 16 * MIB
"""How far above the payload's size the server's peak RSS and its disk use may grow for one submission
(the issue: "within a few megabytes of the payload size"; the expansions it reports are 0.75–1 GiB)."""
SUBMITTER = "intake-repro-submitter-token-xxx"
OTHER = "intake-repro-other-client-token-"
OPERATOR = "intake-repro-operator-token-xxxx"
GIB = 1 << 30


# ------------------------------------------------------------------------------------ the server


def _kib(status: str, key: str) -> int:
    m = re.search(rf"^{key}:\s+(\d+) kB$", status, re.M)
    assert m, f"{key} not in /proc/PID/status"
    return int(m.group(1))


def disk_bytes(*roots: Path) -> int:
    """Bytes allocated (``st_blocks``·512, so a sparse file counts what it occupies) by the files
    under ``roots``, each inode once (bulk objects are hard-linked into the spool)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for name in files:
                try:
                    st = os.lstat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    continue
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


class Serve:
    """``fedmerge serve-continual`` on a store of the tiny base, with its own ``TMPDIR``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.store, self.data, self.tmp = root / "store", root / "intake", root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        with ModelStore.open(self.store) as s:
            if not s.list(limit=1):
                s.commit_base(tiny_base(), name="tiny")
            self.base = s.get("v000001")
            self.weights = {k: v for k, v in s.materialize(self.base).items() if v.is_floating_point()}
        self.tokens = root / "tokens.txt"
        self.tokens.write_text(f"client-00 {SUBMITTER}\nclient-01 {OTHER}\nops {OPERATOR} operator\n")
        self.log = root / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> None:
        port_file = self.root / "port"
        port_file.unlink(missing_ok=True)
        cmd = [
            sys.executable, "-m", "fedmerge.cli", "serve-continual", "--store", str(self.store),
            "--data-dir", str(self.data), "--listen", "127.0.0.1:0", "--tokens", str(self.tokens),
            "--port-file", str(port_file),
        ]  # fmt: skip
        env = {**os.environ, "TMPDIR": str(self.tmp)}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"serve-continual did not start: {self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def memory_kib(self) -> tuple[int, int]:
        """(VmHWM, VmRSS) of the server process in KiB."""
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return _kib(status, "VmHWM"), _kib(status, "VmRSS")

    def disk(self) -> int:
        return disk_bytes(self.tmp, self.data, self.store)

    def opts(self, token: str = SUBMITTER) -> ClientOptions:
        return ClientOptions(f"127.0.0.1:{self.port}", token=token)

    def snapshot(self) -> dict[str, str]:
        return store_snapshot(self.store)

    # ------------------------------------------------------------------------------- payloads
    def meta(self, **kw: Any) -> PackageMeta:
        return PackageMeta("expert", 0, self.base.id, self.base.content_hash, num_examples=10, **kw)

    def valid_package(self, seed: int) -> bytes:
        delta = synthetic_delta(self.weights, seed, scale=0.05)
        return encode_package(delta, CodecConfig(density=0.5, values="int8"), meta=self.meta()).data


# ------------------------------------------------------------------------------------ calls


@dataclass
class Result:
    """How the server answered one submission: ``state`` is ``refused`` (a gRPC status) or the
    submission's final state; ``message`` the status details or the submission's reason."""

    state: str
    message: str
    submission_id: str = ""


_STATES = {
    intake_pb2.SUBMISSION_STATE_MERGED: "merged",
    intake_pb2.SUBMISSION_STATE_REJECTED: "rejected",
    intake_pb2.SUBMISSION_STATE_FAILED: "failed",
}


def settle(srv: Serve, submission_id: str, token: str = SUBMITTER, timeout: float = 60.0) -> Result:
    opts = srv.opts(token)
    deadline = time.monotonic() + timeout
    with connect(opts) as ch:
        stub = intake_pb2_grpc.ExpertIntakeStub(ch)
        while True:
            sub = stub.GetSubmission(
                intake_pb2.GetSubmissionRequest(submission_id=submission_id),
                metadata=opts.metadata(),
                timeout=10,
            )
            if sub.state in _STATES:
                return Result(_STATES[sub.state], sub.reason or sub.version, submission_id)
            if time.monotonic() > deadline:
                return Result("queued", "", submission_id)
            time.sleep(0.05)


def submit(srv: Serve, data: bytes, fmt: str, *, sha256: str | None = None, token: str = SUBMITTER) -> Result:
    """One SubmitExpert stream of ``data``; ``sha256`` overrides the declared hash."""
    opts = srv.opts(token)
    header = intake_pb2.SubmitHeader(
        format=getattr(intake_pb2, f"EXPERT_FORMAT_{fmt.upper()}"),
        total_size=len(data),
        sha256=hashlib.sha256(data).hexdigest() if sha256 is None else sha256,
    )
    chunks = [data[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20)]
    msgs = [intake_pb2.SubmitChunk(header=header)] + [intake_pb2.SubmitChunk(data=c) for c in chunks]
    with connect(opts) as ch:
        try:
            reply = intake_pb2_grpc.ExpertIntakeStub(ch).SubmitExpert(
                iter(msgs), metadata=opts.metadata(), timeout=60
            )
        except grpc.RpcError as exc:
            return Result("refused", f"{exc.code().name}: {exc.details()}")
    return settle(srv, reply.submission_id, token)


def submit_bulk(srv: Serve, data: bytes, fmt: str, *, sha256: str) -> Result:
    """Upload ``data`` over the bulk channel, then submit it declaring ``sha256``."""
    opts = srv.opts()
    obj = upload_bulk(data, opts)
    header = intake_pb2.SubmitHeader(
        format=getattr(intake_pb2, f"EXPERT_FORMAT_{fmt.upper()}"),
        bulk_object=obj,
        sha256=sha256,
        total_size=len(data),
    )
    with connect(opts) as ch:
        try:
            reply = intake_pb2_grpc.ExpertIntakeStub(ch).SubmitExpert(
                iter([intake_pb2.SubmitChunk(header=header)]), metadata=opts.metadata(), timeout=60
            )
        except grpc.RpcError as exc:
            return Result("refused", f"{exc.code().name}: {exc.details()}")
    return settle(srv, reply.submission_id)


# ------------------------------------------------------------------------------------ payloads

PEFT_CONFIG = b'{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["l1"]}'


def lora_factors(seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "base_model.model.l1.lora_A.weight": 0.05 * torch.randn(2, 8, generator=g),
        "base_model.model.l1.lora_B.weight": 0.05 * torch.randn(32, 2, generator=g),
    }


def peft_tar(config: bytes, weights: bytes | None = None, *, extra: bytes = b"") -> bytes:
    """An uncompressed (PAX) tar of adapter_config.json and adapter_model.safetensors; ``extra``:
    raw tar blocks appended before the end-of-archive marker."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        members = [("adapter_config.json", config)]
        if weights is not None:
            members.append(("adapter_model.safetensors", weights))
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    body = buf.getvalue().rstrip(b"\0")
    body += b"\0" * (-len(body) % 512)
    return body + extra + b"\0" * 1024


def reshaped(srv: Serve, codec: CodecConfig, numel: int = 1 << 28) -> bytes:
    """A one-tensor package (``l1.weight``, a few kept entries) whose header then declares shape
    ``[numel]`` — a few hundred bytes that would expand to ``4·numel`` bytes if decoded blindly."""
    if codec.sparsify == "randomk":
        tensor = torch.full((32, 8), 0.25)  # random-k keeps ~density·256 of them, by seed
    else:
        tensor = torch.zeros(32, 8)
        tensor[3, 5] = 0.25
    data = encode_package({"l1.weight": tensor}, codec, meta=srv.meta()).data
    kept = delta_pb2.DeltaPackage.FromString(data).tensors[0].nnz
    assert kept > 0, "the package must carry a value"
    pkg = delta_pb2.DeltaPackage.FromString(data)
    del pkg.tensors[0].shape[:]
    pkg.tensors[0].shape.append(numel)
    resign(pkg)
    return pkg.SerializeToString()


def empty_package(srv: Serve) -> bytes:
    pkg = delta_pb2.DeltaPackage.FromString(srv.valid_package(1))
    del pkg.tensors[:]
    resign(pkg)
    return pkg.SerializeToString()


FP32 = CodecConfig(sparsify="none", values="fp32", error_feedback=False)
COO_ONE = CodecConfig(
    sparsify="topk", density=1 / 256, values="fp32", index_coding="coo", error_feedback=False
)
RANDOMK = CodecConfig(sparsify="randomk", density=1 / 32, values="fp32", error_feedback=False, rescale=False)


def shifted(weights: dict[str, torch.Tensor], by: float) -> dict[str, torch.Tensor]:
    """Full weights with ``by`` added to every floating tensor (a checkpoint of τ ≈ ``by``)."""
    return {k: (v + by).contiguous() if v.is_floating_point() else v for k, v in weights.items()}


def huge(srv: Serve) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(t, 3e38) for k, t in srv.weights.items()}


@dataclass(frozen=True)
class Repro:
    """One reproduction: ``send`` submits it and returns (payload bytes, result); ``expect`` is the
    pattern the refusal's message must match."""

    name: str
    send: Callable[[Serve], tuple[int, Result]]
    expect: str
    states: tuple[str, ...] = ("rejected", "failed", "refused")
    notes: dict[str, str] = field(default_factory=dict)


def _stream(build: Callable[[Serve], bytes], fmt: str) -> Callable[[Serve], tuple[int, Result]]:
    def send(srv: Serve) -> tuple[int, Result]:
        data = build(srv)
        return len(data), submit(srv, data, fmt)

    return send


def _sha_mismatch_bulk(srv: Serve) -> tuple[int, Result]:
    data = srv.valid_package(77)
    return len(data), submit_bulk(srv, data, "delta_package", sha256=hashlib.sha256(b"other").hexdigest())


def _sha_mismatch_stream(srv: Serve) -> tuple[int, Result]:
    data = srv.valid_package(78)
    return len(data), submit(srv, data, "delta_package", sha256=hashlib.sha256(b"other").hexdigest())


_SHARED_BEGIN: dict[str, Any] = {}


def _others_begin(srv: Serve) -> tuple[int, Result]:
    """Client A uploads half an object; client B calls Begin with its hash and another size. B's call
    must not touch A's partial upload: A resumes at its offset (reported as a refusal of B's reset)."""
    data = srv.valid_package(79)
    sha, half = hashlib.sha256(data).hexdigest(), len(data) // 2
    a, b = srv.opts(), srv.opts(OTHER)
    with connect(a) as ch_a, connect(b) as ch_b:
        bulk_a, bulk_b = intake_pb2_grpc.BulkUploadStub(ch_a), intake_pb2_grpc.BulkUploadStub(ch_b)
        begin = intake_pb2.BulkBeginRequest(sha256=sha, total_size=len(data))
        bulk_a.Begin(begin, metadata=a.metadata(), timeout=30)
        bulk_a.Upload(iter([intake_pb2.BulkChunk(sha256=sha, offset=0, data=data[:half])]),
                      metadata=a.metadata(), timeout=30)  # fmt: skip
        hostile = intake_pb2.BulkBeginRequest(sha256=sha, total_size=half - 1)
        b_offset = bulk_b.Begin(hostile, metadata=b.metadata(), timeout=30).offset
        a_offset = bulk_a.Begin(begin, metadata=a.metadata(), timeout=30).offset
    _SHARED_BEGIN.update(sha=sha, data=data, half=half)
    state = "refused" if a_offset == half else "reset"
    return len(data), Result(state, f"B's Begin: offset {b_offset}; A resumes at {a_offset} of {len(data)}")


REPROS: tuple[Repro, ...] = (
    # 1. merge-worker wedges
    Repro("peft-config-empty-object", _stream(lambda s: peft_tar(b"{}", save(lora_factors())), "peft_tar"),
          r"adapter_config\.json lacks the required key '(r|lora_alpha)'"),
    Repro("peft-config-list", _stream(lambda s: peft_tar(b"[1, 2]", save(lora_factors())), "peft_tar"),
          r"adapter_config\.json must hold a JSON object, got list"),
    Repro("peft-config-lora-alpha-object",
          _stream(lambda s: peft_tar(PEFT_CONFIG.replace(b'"lora_alpha": 4', b'"lora_alpha": {}'),
                                     save(lora_factors())), "peft_tar"),
          r"adapter_config\.json: 'lora_alpha' must be a positive finite number, got \{\}"),
    Repro("peft-weights-not-safetensors",
          _stream(lambda s: peft_tar(PEFT_CONFIG, b"this is not a safetensors file" * 8), "peft_tar"),
          r"adapter_model\.safetensors is not a safetensors file"),
    # 2. finite but huge values
    Repro("package-all-3e38", _stream(lambda s: encode_package(huge(s), FP32, meta=s.meta()).data,
                                      "delta_package"),
          r"tensor '[^']+' holds \|value\| = 3e\+38 above the bound"),
    Repro("checkpoint-all-3e38",
          _stream(lambda s: save(shifted(tiny_base(), 3e38)), "checkpoint"),
          r"checkpoint: tensor '[^']+' holds \|value\| = 3e\+38 above the bound"),
    # 4. experts with no content
    Repro("package-no-tensors", _stream(empty_package, "delta_package"),
          r"package holds no tensors; a delta must change at least one tensor"),
    Repro("lora-only-lora-B",
          _stream(lambda s: encode_package(
              {k: v for k, v in lora_factors().items() if "lora_B" in k}, FP32,
              meta=s.meta(kind="lora", lora_rank=2, lora_alpha=4.0)).data, "delta_package"),
          r"module 'base_model\.model\.l1' has lora_B but no lora_A"),
    Repro("lora-with-task-vector-names",
          _stream(lambda s: encode_package(synthetic_delta(s.weights, 3), FP32,
                                           meta=s.meta(kind="lora", lora_rank=2, lora_alpha=4.0)).data,
                  "delta_package"),
          r"tensor '[^']+' is not a lora_A/lora_B factor"),
    # 5. the bulk channel's promises
    Repro("bulk-header-sha256-mismatch", _sha_mismatch_bulk,
          r"INVALID_ARGUMENT: header\.sha256 [0-9a-f]{64} does not match"
          r" the bulk object.s hash [0-9a-f]{64}"),
    Repro("stream-header-sha256-mismatch", _sha_mismatch_stream,
          r"INVALID_ARGUMENT: payload hashes to [0-9a-f]{12}… but the header declared [0-9a-f]{12}…"),
    Repro("another-clients-begin-same-hash", _others_begin, r"A resumes at (\d+) of", states=("refused",)),
    # 6. tiny payloads that cost gigabytes
    Repro("coo-one-entry-shape-2^28", _stream(lambda s: reshaped(s, COO_ONE), "delta_package"),
          r"tensor 'l1\.weight': declares shape \(268435456,\) .* refused before allocation"),
    Repro("seeded-randomk-shape-2^28", _stream(lambda s: reshaped(s, RANDOMK), "delta_package"),
          r"tensor 'l1\.weight': declares shape \(268435456,\) .* refused before allocation"),
    Repro("peft-tar-gnu-sparse-1GiB",
          _stream(lambda s: peft_tar(PEFT_CONFIG, extra=gnu_sparse_member("adapter_model.safetensors", GIB)),
                  "peft_tar"),
          r"adapter_model\.safetensors' is a sparse file \(declares 1073741824 bytes\)"),
)  # fmt: skip


# ------------------------------------------------------------------------------------ fixtures


def _report(row: dict[str, Any]) -> None:
    path = os.environ.get("FEDMERGE_INTAKE_REPRO_REPORT")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    srv = Serve(tmp_path_factory.mktemp("intake-repro"))
    srv.start()
    try:
        # warm up every path once (imports, first merges of each format), so what is measured per
        # reproduction is what that reproduction costs
        warm = [
            submit(srv, srv.valid_package(1), "delta_package"),
            submit(srv, save(shifted(tiny_base(), 0.01)), "checkpoint"),
            submit(srv, peft_tar(PEFT_CONFIG, save(lora_factors())), "peft_tar"),
        ]
        assert [r.state for r in warm] == ["merged"] * 3, warm
        yield srv
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("repro", REPROS, ids=[r.name for r in REPROS])
def test_each_reproduction_is_refused_clearly_cheaply_and_the_next_valid_expert_merges(
    server: Serve, repro: Repro
) -> None:
    srv = server
    hwm0, rss0 = srv.memory_kib()
    disk0 = srv.disk()
    before = srv.snapshot()
    size, result = repro.send(srv)
    hwm1, rss1 = srv.memory_kib()
    disk1 = srv.disk()
    after = srv.snapshot()
    row = {
        "case": repro.name, "payload_bytes": size, "state": result.state, "message": result.message,
        "hwm_kib_before": hwm0, "hwm_kib_after": hwm1, "rss_kib_before": rss0, "rss_kib_after": rss1,
        "disk_bytes_before": disk0, "disk_bytes_after": disk1,
    }  # fmt: skip
    _report(row)
    assert srv.alive(), f"{repro.name}: the server died: {srv.log.read_text()[-3000:]}"
    assert result.state in repro.states, f"{repro.name}: {result}"
    assert re.search(repro.expect, result.message), f"{repro.name}: {result.message!r} ≁ {repro.expect!r}"
    assert after == before, f"{repro.name}: a stored version changed or one was added"
    assert (hwm1 - hwm0) * 1024 <= size + SLACK, f"{repro.name}: peak RSS grew {hwm1 - hwm0} KiB"
    assert disk1 - disk0 <= size + SLACK, f"{repro.name}: disk use grew {disk1 - disk0} bytes"
    # a valid submission right after is merged
    if repro.name == "another-clients-begin-same-hash":  # A finishes its own upload and submits it
        data, half, sha = _SHARED_BEGIN["data"], _SHARED_BEGIN["half"], _SHARED_BEGIN["sha"]
        with connect(srv.opts()) as ch:
            done = intake_pb2_grpc.BulkUploadStub(ch).Upload(
                iter([intake_pb2.BulkChunk(sha256=sha, offset=half, data=data[half:])]),
                metadata=srv.opts().metadata(), timeout=30,
            )  # fmt: skip
        assert done.complete
        header = intake_pb2.SubmitHeader(
            format=intake_pb2.EXPERT_FORMAT_DELTA_PACKAGE, bulk_object=sha, sha256=sha, total_size=len(data)
        )
        with connect(srv.opts()) as ch:
            reply = intake_pb2_grpc.ExpertIntakeStub(ch).SubmitExpert(
                iter([intake_pb2.SubmitChunk(header=header)]), metadata=srv.opts().metadata(), timeout=60
            )
        valid = settle(srv, reply.submission_id)
    else:
        valid = submit(srv, srv.valid_package(1000 + REPROS.index(repro)), "delta_package")
    assert valid.state == "merged", f"after {repro.name}: {valid}"
    assert len(srv.snapshot()) == len(after) + 1


def test_other_clients_cannot_read_a_submission(server: Serve) -> None:
    result = submit(server, server.valid_package(500), "delta_package")
    assert result.state == "merged"
    with pytest.raises(grpc.RpcError) as err:
        settle(server, result.submission_id, token=OTHER)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "client-00" not in (err.value.details() or "")
    assert settle(server, result.submission_id, token=OPERATOR).state == "merged"


def test_the_worker_survives_a_restart_with_a_failed_submission_in_its_queue(tmp_path: Path) -> None:
    srv = Serve(tmp_path)
    srv.start()
    srv.stop()  # the data directory exists now; queue experts as the intake acknowledges them
    queue = IntakeQueue(srv.data)
    subs = {}
    for name, fmt, data in (
        ("poison-config", "peft_tar", peft_tar(b"{}", save(lora_factors()))),
        ("poison-weights", "peft_tar", peft_tar(PEFT_CONFIG, b"not safetensors" * 4)),
        ("valid", "delta_package", srv.valid_package(600)),
    ):
        subs[name], _ = queue.receive(
            client_id="client-00", fmt=fmt, base_version="", label=name, total_size=len(data), chunks=[data]
        )
    queue.close()
    for restart in range(2):  # the second start finds the set-aside rows in the queue
        srv.start()
        try:
            states = {n: settle(srv, s.id) for n, s in subs.items()}
            assert states["valid"].state == "merged", states
            for name in ("poison-config", "poison-weights"):
                assert states[name].state in ("rejected", "failed"), (restart, states)
                assert "adapter" in states[name].message, states[name]
            after = submit(srv, srv.valid_package(700 + restart), "delta_package")
            assert after.state == "merged", (restart, after)
        finally:
            srv.stop()
    with ModelStore.open(srv.store) as store:
        assert len([v for v in store.list() if v.method == "opcm"]) == 3  # valid + one per start
