"""Client helpers for the intake service: submit experts, upload bulk objects, query and download.

Imports only grpc and the generated stubs (no torch), so client processes start fast.

    opts = ClientOptions("server:50051", token="...")            # or ClientOptions.parse("host:port")
    reply = submit_expert(opts, "adapter_dir/")                  # a directory is sent as a peft tar
    sub = wait_merged(opts, reply.submission_id)                 # → Submission (state, version)
    sha = upload_bulk("delta.pkg", opts)                         # resumable; the content hash names it

Retries: every call that changes server state is idempotent (submissions by content hash, bulk
uploads by offset), so :func:`submit_expert` and :func:`upload_bulk` retry on ``UNAVAILABLE``,
``ABORTED``, ``DEADLINE_EXCEEDED`` and the retryable ``RESOURCE_EXHAUSTED`` (queue full) with
exponential back-off; other errors raise :class:`ServiceCallError` with the server's message.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import grpc

from fedmerge.errors import FedMergeError
from fedmerge.v1 import intake_pb2, intake_pb2_grpc

RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
FORMATS = {
    "checkpoint": intake_pb2.EXPERT_FORMAT_CHECKPOINT,
    "peft_tar": intake_pb2.EXPERT_FORMAT_PEFT_TAR,
    "delta_package": intake_pb2.EXPERT_FORMAT_DELTA_PACKAGE,
}
STATE_NAMES = {
    intake_pb2.SUBMISSION_STATE_QUEUED: "queued",
    intake_pb2.SUBMISSION_STATE_MERGED: "merged",
    intake_pb2.SUBMISSION_STATE_REJECTED: "rejected",
    intake_pb2.SUBMISSION_STATE_FAILED: "failed",
}
# states a submission never leaves: merged, rejected (invalid), failed (dead letter)
FINAL_STATES = frozenset(
    {
        intake_pb2.SUBMISSION_STATE_MERGED,
        intake_pb2.SUBMISSION_STATE_REJECTED,
        intake_pb2.SUBMISSION_STATE_FAILED,
    }
)
Progress = Callable[[int, int], None]  # (bytes done, total)


class ServiceCallError(FedMergeError):
    """A call to the intake service failed; ``code`` is the gRPC status, ``retryable`` whether to retry."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = code in RETRYABLE


@dataclass(frozen=True)
class ClientOptions:
    """Where the server is and how to authenticate: bearer ``token`` and/or TLS (``root_cert`` to trust
    the server, ``client_cert``/``client_key`` for mutual TLS), all PEM paths."""

    target: str
    token: str | None = None
    root_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    server_name: str | None = None
    max_message_bytes: int = 64 << 20

    @staticmethod
    def parse(server: str | ClientOptions) -> ClientOptions:
        if isinstance(server, ClientOptions):
            return server
        return ClientOptions(server, token=os.environ.get("FEDMERGE_TOKEN") or None)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def connect(opts: ClientOptions) -> grpc.Channel:
    options: list[tuple[str, int | str]] = [
        ("grpc.max_receive_message_length", opts.max_message_bytes),
        ("grpc.max_send_message_length", opts.max_message_bytes),
    ]
    if opts.server_name:
        options.append(("grpc.ssl_target_name_override", opts.server_name))
    if opts.root_cert is None and opts.client_cert is None:
        return grpc.insecure_channel(opts.target, options=options)
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(opts.root_cert).read_bytes() if opts.root_cert else None,
        private_key=Path(opts.client_key).read_bytes() if opts.client_key else None,
        certificate_chain=Path(opts.client_cert).read_bytes() if opts.client_cert else None,
    )
    return grpc.secure_channel(opts.target, creds, options=options)


def _error(exc: grpc.RpcError) -> ServiceCallError:
    code = exc.code() if hasattr(exc, "code") else None
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    name = code.name if code is not None else "UNKNOWN"
    return ServiceCallError(f"{name}: {detail}", code)


Metadata = tuple[tuple[str, str], ...]
R = TypeVar("R")


def _retrying(call: Callable[[], R], retries: int, backoff: float, *, retry_own: bool = False) -> R:
    """``call()`` up to ``retries`` + 1 times, sleeping ``backoff``, 2·``backoff``, … (at most 5 s)
    between tries while the error is retryable; a gRPC error becomes a :class:`ServiceCallError`. With
    ``retry_own`` a retryable :class:`ServiceCallError` that ``call`` raises itself is retried too."""
    delay = backoff
    for attempt in range(retries + 1):
        try:
            return call()
        except grpc.RpcError as exc:
            err = _error(exc)
        except ServiceCallError as exc:
            if not retry_own:
                raise
            err = exc
        if not err.retryable or attempt == retries:
            raise err from None
        time.sleep(delay)
        delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------ payloads


def pack_peft(directory: str | Path) -> bytes:
    """An uncompressed tar of a peft adapter directory's two files (what the server expects)."""
    d = Path(directory)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            path = d / name
            if not path.is_file():
                raise ServiceCallError(f"{d} has no {name}; pass a peft adapter directory (save_pretrained)")
            info = tarfile.TarInfo(name)
            info.size = path.stat().st_size
            info.mtime = 0  # identical adapters give identical bytes (idempotent resubmission)
            with path.open("rb") as fh:
                tar.addfile(info, fh)
    return buf.getvalue()


def detect_format(path: Path) -> str:
    """A peft adapter directory (``adapter_config.json``) → ``peft_tar``; a Hugging Face model directory
    (``config.json`` / ``*.safetensors``, sharded or not) or a ``*.safetensors`` file → ``checkpoint``;
    anything else → ``delta_package``."""
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return "peft_tar"
        from fedmerge.delta.hf import is_hf_model_dir  # torch loads only for a directory's checks

        if is_hf_model_dir(path):
            return "checkpoint"
        raise ServiceCallError(
            f"{path} is neither a peft adapter directory (adapter_config.json) nor a Hugging Face model "
            "directory (config.json with model.safetensors or a sharded index)"
        )
    if path.suffix == ".safetensors":
        return "checkpoint"
    return "delta_package"


def pack_hf_model(directory: Path, into: Path) -> Path:
    """The weights of a Hugging Face model directory (sharded or not) as one safetensors file ``into``:
    the intake's ``checkpoint`` format. Raises :class:`ServiceCallError` naming what is wrong."""
    from safetensors.torch import save_file

    from fedmerge.delta.hf import HFModelError, load_hf_state_dict

    try:
        weights = load_hf_state_dict(directory)
    except HFModelError as exc:
        raise ServiceCallError(str(exc)) from None
    save_file({k: v.contiguous() for k, v in weights.items()}, str(into))
    return into


@dataclass
class _Payload:
    size: int
    sha256: str
    open: Callable[[], BinaryIO]


def _payload(source: str | os.PathLike[str] | bytes) -> _Payload:
    if isinstance(source, bytes):
        data = source
        return _Payload(len(data), hashlib.sha256(data).hexdigest(), lambda: io.BytesIO(data))
    path = Path(source)
    if path.is_dir():  # a Hugging Face directory is packed by submit_expert first
        return _payload(pack_peft(path))
    with path.open("rb") as fh:
        sha = hashlib.file_digest(fh, "sha256").hexdigest()
    return _Payload(path.stat().st_size, sha, lambda: path.open("rb"))


def _read_from(fh: BinaryIO, chunk_size: int) -> Iterator[bytes]:
    while block := fh.read(chunk_size):
        yield block


# ------------------------------------------------------------------------------------ intake calls


def submit_expert(
    server: str | ClientOptions,
    source: str | os.PathLike[str] | bytes,
    *,
    fmt: str | None = None,
    base_version: str = "",
    label: str = "",
    chunk_size: int = 1 << 20,
    retries: int = 5,
    backoff: float = 0.2,
    progress: Progress | None = None,
    timeout: float | None = None,
) -> intake_pb2.SubmitReply:
    """Stream one expert; returns the reply once the server has it durably (idempotent by content)."""
    opts = ClientOptions.parse(server)
    if fmt is None:
        fmt = "delta_package" if isinstance(source, bytes) else detect_format(Path(source))
    if fmt not in FORMATS:
        raise ServiceCallError(f"format {fmt!r} is not one of {sorted(FORMATS)}")
    if fmt == "checkpoint" and not isinstance(source, bytes) and Path(source).is_dir():
        with tempfile.TemporaryDirectory(prefix="fedmerge-push-") as tmp:
            packed = pack_hf_model(Path(source), Path(tmp) / "model.safetensors")
            return submit_expert(
                server, packed, fmt=fmt, base_version=base_version, label=label, chunk_size=chunk_size,
                retries=retries, backoff=backoff, progress=progress, timeout=timeout,
            )  # fmt: skip
    payload = _payload(source)
    header = intake_pb2.SubmitHeader(
        format=FORMATS[fmt],
        base_version=base_version,
        total_size=payload.size,
        sha256=payload.sha256,
        label=label,
    )

    def call() -> intake_pb2.SubmitReply:
        def messages() -> Iterator[intake_pb2.SubmitChunk]:
            yield intake_pb2.SubmitChunk(header=header)
            done = 0
            with payload.open() as fh:
                for block in _read_from(fh, chunk_size):
                    yield intake_pb2.SubmitChunk(data=block)
                    done += len(block)
                    if progress is not None:
                        progress(done, payload.size)

        with connect(opts) as channel:
            stub = intake_pb2_grpc.ExpertIntakeStub(channel)
            reply: intake_pb2.SubmitReply = stub.SubmitExpert(
                messages(), metadata=opts.metadata(), timeout=timeout
            )
            return reply

    return _retrying(call, retries, backoff)


def submit_bulk_expert(
    server: str | ClientOptions, sha256: str, *, fmt: str, base_version: str = "", label: str = ""
) -> intake_pb2.SubmitReply:
    """Queue an already uploaded bulk object as an expert."""
    opts = ClientOptions.parse(server)
    header = intake_pb2.SubmitHeader(
        format=FORMATS[fmt],
        base_version=base_version,
        bulk_object=sha256,
        label=label,
    )

    def call() -> intake_pb2.SubmitReply:
        with connect(opts) as channel:
            stub = intake_pb2_grpc.ExpertIntakeStub(channel)
            reply: intake_pb2.SubmitReply = stub.SubmitExpert(
                iter([intake_pb2.SubmitChunk(header=header)]), metadata=opts.metadata()
            )
            return reply

    return _retrying(call, 5, 0.2)


def _unary(server: str | ClientOptions, call: Callable[[grpc.Channel, Metadata], R]) -> R:
    """``call(channel, metadata)`` (one unary RPC) on a fresh channel to ``server``; a gRPC error
    becomes a :class:`ServiceCallError`."""
    opts = ClientOptions.parse(server)
    with connect(opts) as channel:
        try:
            return call(channel, opts.metadata())
        except grpc.RpcError as exc:
            raise _error(exc) from None


def get_submission(server: str | ClientOptions, submission_id: str) -> intake_pb2.Submission:
    request = intake_pb2.GetSubmissionRequest(submission_id=submission_id)
    sub: intake_pb2.Submission = _unary(
        server, lambda ch, md: intake_pb2_grpc.ExpertIntakeStub(ch).GetSubmission(request, metadata=md)
    )
    return sub


def wait_merged(
    server: str | ClientOptions, submission_id: str, *, timeout: float = 300.0, poll: float = 0.2
) -> intake_pb2.Submission:
    """Poll until the submission is merged, rejected or failed (raises ``ServiceCallError`` on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sub = get_submission(server, submission_id)
            if sub.state in FINAL_STATES:
                return sub
        except ServiceCallError as exc:
            if not exc.retryable:
                raise
        if time.monotonic() > deadline:
            raise ServiceCallError(
                f"submission {submission_id} not merged after {timeout} s; it stays queued"
            )
        time.sleep(poll)


def list_versions(server: str | ClientOptions, limit: int = 0) -> list[intake_pb2.VersionInfo]:
    request = intake_pb2.ListVersionsRequest(limit=limit)
    reply = _unary(
        server, lambda ch, md: intake_pb2_grpc.ExpertIntakeStub(ch).ListVersions(request, metadata=md)
    )
    return list(reply.versions)


def download_version(
    server: str | ClientOptions, version: str, out: str | os.PathLike[str], *, full_weights: bool = False
) -> intake_pb2.VersionInfo:
    """Stream a version (its delta, or the full weights) into the safetensors file ``out``."""
    opts = ClientOptions.parse(server)
    target = Path(out)
    info = intake_pb2.VersionInfo()
    with connect(opts) as channel, tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        try:
            stream = intake_pb2_grpc.ExpertIntakeStub(channel).GetVersion(
                intake_pb2.GetVersionRequest(version=version, full_weights=full_weights),
                metadata=opts.metadata(),
            )
            for chunk in stream:
                if chunk.HasField("info"):
                    info = chunk.info
                tmp.write(chunk.data)
        except grpc.RpcError as exc:
            os.unlink(tmp.name)
            raise _error(exc) from None
    os.replace(tmp.name, target)
    return info


def watch_versions(server: str | ClientOptions, after: str = "") -> Iterator[intake_pb2.VersionInfo]:
    """Yield versions as they are committed (forever; break out of the loop to stop)."""
    opts = ClientOptions.parse(server)
    with connect(opts) as channel:
        stream = intake_pb2_grpc.ExpertIntakeStub(channel).WatchVersions(
            intake_pb2.WatchVersionsRequest(after=after), metadata=opts.metadata()
        )
        try:
            yield from stream
        except grpc.RpcError as exc:
            raise _error(exc) from None
        finally:
            stream.cancel()


# ------------------------------------------------------------------------------------ bulk channel


def upload_bulk(
    path_or_bytes: str | os.PathLike[str] | bytes,
    server: str | ClientOptions,
    *,
    chunk_size: int = 1 << 20,
    retries: int = 8,
    backoff: float = 0.2,
    progress: Progress | None = None,
) -> str:
    """Upload a payload content-addressed and resumably; returns its sha256 (the name to send instead).

    Memory: one chunk. A broken connection resumes from the offset the server reports.
    """
    opts = ClientOptions.parse(server)
    payload = _payload(path_or_bytes)

    def attempt() -> str:
        with connect(opts) as channel:
            stub = intake_pb2_grpc.BulkUploadStub(channel)
            status = stub.Begin(
                intake_pb2.BulkBeginRequest(sha256=payload.sha256, total_size=payload.size),
                metadata=opts.metadata(),
            )
            if status.complete:
                return payload.sha256
            start = int(status.offset)

            def chunks() -> Iterator[intake_pb2.BulkChunk]:
                offset = start
                with payload.open() as fh:
                    fh.seek(offset)
                    for block in _read_from(fh, chunk_size):
                        yield intake_pb2.BulkChunk(sha256=payload.sha256, offset=offset, data=block)
                        offset += len(block)
                        if progress is not None:
                            progress(offset, payload.size)

            final = stub.Upload(chunks(), metadata=opts.metadata())
            if not final.complete:
                raise ServiceCallError(
                    f"bulk upload ended at {final.offset} of {payload.size} bytes", grpc.StatusCode.ABORTED
                )
            return payload.sha256

    return _retrying(attempt, retries, backoff, retry_own=True)


def upload_unary(data: bytes, server: str | ClientOptions) -> str:
    """The whole payload in one gRPC message (the benchmark's reference path; no resume, no bound)."""
    request = intake_pb2.UnaryUploadRequest(data=data)
    status = _unary(
        server, lambda ch, md: intake_pb2_grpc.BulkUploadStub(ch).UploadUnary(request, metadata=md)
    )
    return str(status.sha256)
