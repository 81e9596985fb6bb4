"""The gRPC server: ExpertIntake + BulkUpload services, TLS, authentication, error mapping.

Authentication (``ServiceConfig``): bearer tokens — every call carries ``authorization: Bearer
<token>`` metadata, checked by :class:`BearerAuthInterceptor` against the configured token → client
id table before any handler runs (``UNAUTHENTICATED`` otherwise) — and/or mutual TLS, where the TLS
handshake itself refuses clients without a certificate signed by ``tls.client_ca`` and the client id
is the certificate's common name. A submission's metadata (``GetSubmission``: client id, label,
reason) is readable by the client that submitted it and by ``operators`` only; to anyone else the id
is unknown (``NOT_FOUND``). A bulk upload's partial state belongs to the client that began it.
Errors map to gRPC status codes: invalid input →
``INVALID_ARGUMENT``, quota → ``RESOURCE_EXHAUSTED``, unknown id → ``NOT_FOUND``, a concurrent upload
of the same object → ``ABORTED`` (retry), a busy store → ``UNAVAILABLE`` (retry).

Streams (``fedmerge.service.streams``): ``SubmitExpert`` and ``Upload`` read their request stream
through an idle guard — no message for ``stream_idle_timeout_s`` → ``DEADLINE_EXCEEDED``, nothing of
that expert kept (a bulk upload keeps its flushed bytes, resumable as after any broken stream) — and
hold one of the client's ``limits.max_concurrent_streams`` slots while open (one more →
``RESOURCE_EXHAUSTED`` at once, before a byte is read).

Threads: gRPC handlers run in a pool of ``max_workers`` threads, each with its own store connection
(SQLite connections are per thread); the merge worker runs in its own thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc

from fedmerge.errors import FedMergeError, InvalidSubmission
from fedmerge.metrics import FedmergeMetrics
from fedmerge.service.bulk import BulkBusyError, BulkError, BulkStore, UnknownObjectError, check_sha
from fedmerge.service.config import ServiceConfig
from fedmerge.service.intake import IntakeQueue, QuotaExceeded, Submission, UnknownSubmissionError
from fedmerge.service.streams import IdleGuard, StreamIdleTimeout, StreamSlots
from fedmerge.service.worker import MergeWorker
from fedmerge.store import ModelStore, StoreBusyError, UnknownVersionError, Version
from fedmerge.store.blobs import read_blob
from fedmerge.store.s3_client import ObjectStoreError
from fedmerge.store.safetensors_format import TensorSpec, dtype_from_name, encode_header, tensor_bytes
from fedmerge.v1 import intake_pb2, intake_pb2_grpc

log = logging.getLogger(__name__)

FORMAT_FROM_PB = {
    intake_pb2.EXPERT_FORMAT_CHECKPOINT: "checkpoint",
    intake_pb2.EXPERT_FORMAT_PEFT_TAR: "peft_tar",
    intake_pb2.EXPERT_FORMAT_DELTA_PACKAGE: "delta_package",
}
STATE_TO_PB = {
    "queued": intake_pb2.SUBMISSION_STATE_QUEUED,
    "merged": intake_pb2.SUBMISSION_STATE_MERGED,
    "rejected": intake_pb2.SUBMISSION_STATE_REJECTED,
    "failed": intake_pb2.SUBMISSION_STATE_FAILED,
}
CLIENT_KEY = "fedmerge-client-id"


# ------------------------------------------------------------------------------------ authentication


def _abort_handler(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(abort)


class BearerAuthInterceptor(grpc.ServerInterceptor):
    """Refuses (``UNAUTHENTICATED``) every call whose bearer token is not in ``tokens``."""

    def __init__(self, tokens: dict[str, str], on_refused: Callable[[], None] | None = None) -> None:
        self.tokens = dict(tokens)
        self.on_refused = on_refused

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        token = bearer_token(details.invocation_metadata)
        if (token is None or token not in self.tokens) and self.on_refused is not None:
            self.on_refused()
        if token is None:
            return _abort_handler(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing 'authorization: Bearer <token>' metadata; pass --token (or FEDMERGE_TOKEN)",
            )
        if token not in self.tokens:
            return _abort_handler(
                grpc.StatusCode.UNAUTHENTICATED, "unknown bearer token; ask the operator for one"
            )
        return continuation(details)


def bearer_token(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return None


# ------------------------------------------------------------------------------------ helpers


def version_info(v: Version) -> intake_pb2.VersionInfo:
    subs = v.metadata.get("submissions", []) if isinstance(v.metadata, dict) else []
    return intake_pb2.VersionInfo(
        id=v.id,
        content_hash=v.content_hash,
        kind=v.kind,
        method=v.method,
        parents=list(v.parents),
        submissions=[str(s) for s in subs],
        created_at=v.created_at,
        num_merged=int(v.metadata.get("num_merged", 0)) if isinstance(v.metadata, dict) else 0,
        manifest_json=v.to_json(),
    )


def submission_pb(s: Submission) -> intake_pb2.Submission:
    return intake_pb2.Submission(
        submission_id=s.id,
        sha256=s.sha256,
        client_id=s.client_id,
        state=STATE_TO_PB[s.state],
        version=s.version or "",
        reason=s.reason or "",
        size=s.size,
        label=s.label,
        sequence=s.seq,
    )


def _chunks(parts: Iterator[bytes | memoryview], size: int) -> Iterator[bytes]:
    """Re-cut a stream of byte parts into pieces of at most ``size`` bytes."""
    for part in parts:
        view = memoryview(part)
        for start in range(0, view.nbytes, size):
            yield bytes(view[start : start + size])


class _Handlers:
    """Shared state of both servicers: config, queue, bulk store, per-thread store connections."""

    def __init__(
        self,
        config: ServiceConfig,
        queue: IntakeQueue,
        bulk: BulkStore,
        stop: threading.Event,
        metrics: FedmergeMetrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.queue = queue
        self.bulk = bulk
        self.stop = stop
        self._local = threading.local()
        self._stores: list[ModelStore] = []
        self._lock = threading.Lock()
        self.slots = StreamSlots(config.limits.max_concurrent_streams)

    def store(self) -> ModelStore:
        s = getattr(self._local, "store", None)
        if s is None:
            s = open_store(self.config)
            self._local.store = s
            with self._lock:
                self._stores.append(s)
        return s

    def client_id(self, context: grpc.ServicerContext) -> str:
        token = bearer_token(context.invocation_metadata())
        if token is not None and token in self.config.tokens:
            return self.config.tokens[token]
        names = context.auth_context().get("x509_common_name")
        if names:
            return names[0].decode()
        if self.config.authenticated:  # unreachable behind the interceptor / mTLS handshake
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no client identity")
        return "anonymous"

    def may_read(self, client: str, sub: Submission) -> bool:
        """Whether ``client`` may read ``sub``'s metadata: its submitter, or an operator."""
        return client == sub.client_id or client in self.config.operators

    @staticmethod
    def stream_owner(context: grpc.ServicerContext, client: str) -> str:
        """Whose stream slots a call uses: the client id, or for an open server the peer's host."""
        if client != "anonymous":
            return client
        peer = context.peer() or ""  # e.g. ipv4:127.0.0.1:54321 — the port differs per connection
        return "anonymous@" + peer.rsplit(":", 1)[0]

    def guard(self, request_iterator: Iterator[Any], call: str, hint: str) -> IdleGuard[Any]:
        return IdleGuard(request_iterator, self.config.stream_idle_timeout_s, call=call, hint=hint)

    def refused(self, exc: Exception) -> None:
        """Count a SubmitExpert call refused before acknowledgement, by reason class."""
        if self.metrics is None:
            return
        if isinstance(exc, QuotaExceeded):
            reason = "quota"
        elif isinstance(exc, StreamIdleTimeout):
            reason = "timeout"
        elif isinstance(exc, (StoreBusyError, BulkBusyError)):
            reason = "busy"
        elif isinstance(exc, (InvalidSubmission, BulkError)):
            reason = "invalid"
        else:
            reason = "other"
        self.metrics.intake_refused(reason)

    def uplink(self, n: int) -> None:
        if self.metrics is not None:
            self.metrics.add_uplink(n)

    def downlink(self, n: int) -> None:
        if self.metrics is not None:
            self.metrics.add_downlink(n)

    def fail(self, context: grpc.ServicerContext, exc: Exception) -> None:
        code = grpc.StatusCode.INTERNAL
        if isinstance(exc, QuotaExceeded):
            # RESOURCE_EXHAUSTED tells clients to retry later (queue full); a size or byte quota that
            # no retry can satisfy is FAILED_PRECONDITION, so clients stop instead of retrying
            retry_later = grpc.StatusCode.RESOURCE_EXHAUSTED
            code = retry_later if exc.retryable else grpc.StatusCode.FAILED_PRECONDITION
        elif isinstance(exc, (UnknownSubmissionError, UnknownVersionError, UnknownObjectError)):
            code = grpc.StatusCode.NOT_FOUND
        elif isinstance(exc, BulkBusyError):
            code = grpc.StatusCode.ABORTED
        elif isinstance(exc, StoreBusyError | ObjectStoreError):  # retry (here or at another replica)
            code = grpc.StatusCode.UNAVAILABLE
        elif isinstance(exc, StreamIdleTimeout):
            code = grpc.StatusCode.DEADLINE_EXCEEDED
        elif isinstance(exc, (InvalidSubmission, FedMergeError)):
            code = grpc.StatusCode.INVALID_ARGUMENT
        context.abort(code, str(exc))


class IntakeServicer(intake_pb2_grpc.ExpertIntakeServicer):
    def __init__(self, h: _Handlers) -> None:
        self.h = h

    def SubmitExpert(  # noqa: N802
        self, request_iterator: Iterator[intake_pb2.SubmitChunk], context: grpc.ServicerContext
    ) -> intake_pb2.SubmitReply:
        client = self.h.client_id(context)
        try:
            with (
                self.h.slots.hold(self.h.stream_owner(context, client)),
                self.h.guard(
                    request_iterator,
                    "SubmitExpert",
                    "nothing it sent was kept and nothing was acknowledged; resend the expert",
                ) as stream,
            ):
                sub, dup = self._receive(client, stream)
        except FedMergeError as exc:
            self.h.refused(exc)
            self.h.fail(context, exc)
            raise AssertionError("unreachable") from exc
        if self.h.metrics is not None:
            self.h.metrics.intake_acknowledged(dup)
        return intake_pb2.SubmitReply(
            submission_id=sub.id, sha256=sub.sha256, duplicate=dup, state=STATE_TO_PB[sub.state]
        )

    def _receive(self, client: str, stream: Iterator[intake_pb2.SubmitChunk]) -> tuple[Submission, bool]:
        """Header, then the data chunks (or a bulk object) of one SubmitExpert stream → (submission, dup)."""
        first = next(stream, None)
        if first is None:
            raise InvalidSubmission(
                "the SubmitExpert stream carried no message; send a SubmitChunk with the header "
                "(format, total_size) first, then the data"
            )
        part = first.WhichOneof("part")
        if part is None:
            raise InvalidSubmission(
                "the first SubmitChunk is empty (neither header nor data); it must carry the header "
                "(format, total_size)"
            )
        if part != "header":
            raise InvalidSubmission("the first SubmitChunk must carry the header (format, total_size)")
        hdr = first.header
        fmt = FORMAT_FROM_PB.get(hdr.format)
        if fmt is None:
            raise InvalidSubmission(
                f"header.format {hdr.format} is not a known ExpertFormat; use CHECKPOINT, PEFT_TAR or "
                "DELTA_PACKAGE"
            )
        if hdr.sha256:
            check_sha(hdr.sha256)
        if hdr.bulk_object:
            check_sha(hdr.bulk_object)
            if hdr.sha256 and hdr.sha256 != hdr.bulk_object:
                raise InvalidSubmission(
                    f"header.sha256 {hdr.sha256} does not match the bulk object's hash {hdr.bulk_object} "
                    "(bulk objects are named by the sha256 of their bytes); declare the object's own hash "
                    "or leave sha256 empty"
                )
            return self.h.queue.receive_bulk(
                client_id=client,
                fmt=fmt,
                base_version=hdr.base_version,
                label=hdr.label,
                bulk=self.h.bulk,
                sha256=check_sha(hdr.bulk_object),
            )

        def data() -> Iterator[bytes]:
            for index, msg in enumerate(stream, 2):
                kind = msg.WhichOneof("part")
                if kind is None:
                    raise InvalidSubmission(
                        f"SubmitChunk #{index} is empty (neither header nor data); after the header every "
                        "message must carry data — nothing of this expert was kept, resend it"
                    )
                if kind != "data":
                    raise InvalidSubmission("only the first SubmitChunk may carry a header")
                self.h.uplink(len(msg.data))
                yield msg.data

        return self.h.queue.receive(
            client_id=client,
            fmt=fmt,
            base_version=hdr.base_version,
            label=hdr.label,
            total_size=int(hdr.total_size),
            chunks=data(),
            expected_sha256=hdr.sha256,
        )

    def GetSubmission(  # noqa: N802
        self, request: intake_pb2.GetSubmissionRequest, context: grpc.ServicerContext
    ) -> intake_pb2.Submission:
        client = self.h.client_id(context)
        try:
            sub = self.h.queue.get(request.submission_id)
            if not self.h.may_read(client, sub):
                # the same answer as for an unknown id: whether another client submitted it is theirs
                raise UnknownSubmissionError(
                    f"no submission {request.submission_id!r} of client {client!r}; a client reads only "
                    "the submissions it made (operators read all)"
                )
            return submission_pb(sub)
        except FedMergeError as exc:
            self.h.fail(context, exc)
            raise AssertionError("unreachable") from exc

    def ListVersions(  # noqa: N802
        self, request: intake_pb2.ListVersionsRequest, context: grpc.ServicerContext
    ) -> intake_pb2.ListVersionsReply:
        versions = self.h.store().list(limit=request.limit or None)
        return intake_pb2.ListVersionsReply(versions=[version_info(v) for v in versions])

    def GetVersion(  # noqa: N802
        self, request: intake_pb2.GetVersionRequest, context: grpc.ServicerContext
    ) -> Iterator[intake_pb2.VersionChunk]:
        store = self.h.store()
        try:
            version = store.get(request.version or "latest")
        except FedMergeError as exc:
            self.h.fail(context, exc)
            raise AssertionError("unreachable") from exc
        size = request.chunk_size or self.h.config.chunk_size
        size = max(4096, min(size, self.h.config.chunk_size))
        if request.full_weights:
            specs = store.materialized_specs(version)
            tensors: Iterator[tuple[str, Any]] = store.iter_materialized(version)
        else:
            entries = sorted(version.tensors.items())
            specs = [TensorSpec(n, dtype_from_name(e.dtype), e.shape) for n, e in entries]
            tensors = (
                (n, read_blob(store.blobs, e.blob, what=f"version {version.id} tensor {n!r}"))
                for n, e in entries
            )
        header = encode_header(specs, {"fedmerge_version": version.id})
        total = len(header) + sum(s.nbytes for s in specs)

        def parts() -> Iterator[bytes | memoryview]:
            yield header
            for _, t in tensors:
                yield tensor_bytes(t)

        first = True
        for piece in _chunks(parts(), size):
            self.h.downlink(len(piece))
            if first:
                yield intake_pb2.VersionChunk(info=version_info(version), data=piece, total_size=total)
                first = False
            else:
                yield intake_pb2.VersionChunk(data=piece)

    def WatchVersions(  # noqa: N802
        self, request: intake_pb2.WatchVersionsRequest, context: grpc.ServicerContext
    ) -> Iterator[intake_pb2.VersionInfo]:
        store = self.h.store()
        if request.after:
            try:
                seen = store.get(request.after).sequence
            except FedMergeError as exc:
                self.h.fail(context, exc)
                raise AssertionError("unreachable") from exc
        else:
            newest = store.list(limit=1)
            seen = newest[0].sequence if newest else 0
        while context.is_active() and not self.h.stop.is_set():
            fresh = [v for v in store.list(limit=64) if v.sequence > seen]
            for v in sorted(fresh, key=lambda v: v.sequence):
                yield version_info(v)
                seen = v.sequence
            self.h.stop.wait(0.2)


class BulkServicer(intake_pb2_grpc.BulkUploadServicer):
    def __init__(self, h: _Handlers) -> None:
        self.h = h

    @staticmethod
    def _status(s: Any) -> intake_pb2.BulkStatus:
        return intake_pb2.BulkStatus(
            sha256=s.sha256, total_size=s.total_size, offset=s.offset, complete=s.complete
        )

    def Begin(  # noqa: N802
        self, request: intake_pb2.BulkBeginRequest, context: grpc.ServicerContext
    ) -> intake_pb2.BulkStatus:
        owner = self.h.client_id(context)
        try:
            return self._status(self.h.bulk.begin(request.sha256, int(request.total_size), owner))
        except BulkError as exc:
            self.h.fail(context, exc)
            raise AssertionError("unreachable") from exc

    def Upload(  # noqa: N802
        self, request_iterator: Iterator[intake_pb2.BulkChunk], context: grpc.ServicerContext
    ) -> intake_pb2.BulkStatus:
        client = self.h.client_id(context)
        owner = self.h.stream_owner(context, client)
        try:
            with (
                self.h.slots.hold(owner),
                self.h.guard(
                    request_iterator,
                    "Upload",
                    "the bytes already written stay resumable: call Begin and continue from the offset "
                    "it returns",
                ) as stream,
            ):
                return self._upload(stream, client)
        except FedMergeError as exc:
            self.h.fail(context, exc)
            raise AssertionError("unreachable") from exc

    def _upload(self, stream: Iterator[intake_pb2.BulkChunk], client: str) -> intake_pb2.BulkStatus:
        """Write one Upload stream's chunks into ``client``'s partial upload; on any error the object
        stays resumable (flushed, released)."""
        sha: str | None = None
        try:
            for chunk in stream:
                if sha is None:
                    sha = check_sha(chunk.sha256)
                    self.h.bulk.acquire(sha, client)
                elif chunk.sha256 != sha:
                    raise BulkError("one Upload stream carries one object; open a new stream for another")
                self.h.uplink(len(chunk.data))
                self.h.bulk.write(sha, int(chunk.offset), chunk.data, client)
            if sha is None:
                raise BulkError("empty Upload stream; send at least one chunk")
            status = self.h.bulk.finish(sha, client)  # still holding the object: no other stream interleaves
            return self._status(status)
        finally:
            if sha is not None:  # error or broken connection: keep what was written, resumable
                self.h.bulk.release(sha, client)

    def UploadUnary(  # noqa: N802
        self, request: intake_pb2.UnaryUploadRequest, context: grpc.ServicerContext
    ) -> intake_pb2.BulkStatus:
        self.h.client_id(context)
        self.h.uplink(len(request.data))
        try:
            return self._status(self.h.bulk.put_bytes(request.data))
        except BulkError as exc:
            self.h.fail(context, exc)
            raise AssertionError("unreachable") from exc


# ------------------------------------------------------------------------------------ the server


def _timestamp(iso: str) -> float | None:
    """Seconds since the epoch of an ISO-8601 time (None when it does not parse)."""
    try:
        return datetime.fromisoformat(iso).timestamp()
    except (TypeError, ValueError):
        return None


def open_store(config: ServiceConfig) -> ModelStore:
    """The service's model store: a directory, or ``s3://…`` at ``config.s3_endpoint``, on its catalog."""
    return ModelStore.open(config.store, catalog=config.catalog, s3_endpoint=config.s3_endpoint)


class IntakeServer:
    """Owns the queue, bulk store, merge worker thread and the gRPC server.

    >>> server = IntakeServer(config); port = server.start(); ...; server.stop()
    """

    def __init__(self, config: ServiceConfig, metrics: FedmergeMetrics | None = None) -> None:
        """``metrics``: where to count intake, merges, bytes, queue depth and store size (None: off)."""
        self.config = config
        self.metrics = metrics
        root = config.intake_dir
        root.mkdir(parents=True, exist_ok=True)
        if config.catalog is not None:  # one of several replicas: queue and leases in PostgreSQL
            from fedmerge.service.replicas import SharedIntakeQueue

            objects = None
            if config.on_object_store:  # the spool in the bucket: replicas share no directory
                from fedmerge.store.s3 import S3BlobBackend

                objects = S3BlobBackend.connect(str(config.store), endpoint=config.s3_endpoint)
            self.queue: IntakeQueue = SharedIntakeQueue(root, config.catalog, config.limits, objects=objects)
        else:
            self.queue = IntakeQueue(root, config.limits)
        self.bulk = BulkStore(root / "bulk", max_bytes=config.limits.max_bulk_bytes)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.worker: MergeWorker | None = None
        self.worker_error: BaseException | None = None
        self._worker_thread: threading.Thread | None = None
        self.handlers = _Handlers(config, self.queue, self.bulk, self._stop, metrics)
        if metrics is not None:
            metrics.watch_queue(self.queue.depth)
            if not config.on_object_store:  # a bucket's size is not a directory's to sum
                metrics.watch_store(Path(config.store))
        self.grpc_server: grpc.Server | None = None
        self.port = 0

    def _worker_main(self) -> None:
        store: ModelStore | None = None
        try:
            store = open_store(self.config)
            worker = MergeWorker(
                store,
                self.queue,
                method=self.config.method,
                params=self.config.params,
                batch_size=self.config.batch_size,
                base=self.config.base,
                track=self.config.track,
                max_bytes=self.config.limits.max_submission_bytes,
                metrics=self.metrics,
            )
            worker.recover()
            lease = None
            if self.config.catalog is not None:  # merge only while holding the track's lease
                from fedmerge.service.replicas import TrackLease

                lease = TrackLease(self.config.catalog, self.config.track, ttl_s=self.config.lease_ttl_s)
            if self.metrics is not None:
                head = worker.head or store.get("latest")
                self.metrics.show_version(head.id, head.round, _timestamp(head.created_at))
        except BaseException as exc:
            self.worker_error = exc
            self._ready.set()
            if store is not None:
                store.close()
            return
        self.worker = worker
        self._ready.set()
        try:
            if lease is not None:
                from fedmerge.service.replicas import run_leased

                try:
                    run_leased(worker, lease, self._stop)
                finally:
                    lease.close()
            else:
                worker.run(self._stop)
        finally:
            store.close()

    def start(self) -> int:
        """Start the merge worker (raising its configuration error, if any) and serve; returns the port."""
        self._worker_thread = threading.Thread(
            target=self._worker_main, name="fedmerge-merge-worker", daemon=True
        )
        self._worker_thread.start()
        self._ready.wait()
        if self.worker_error is not None:
            raise self.worker_error
        counter = self.metrics.unauthenticated.inc if self.metrics is not None else None
        interceptors = [BearerAuthInterceptor(self.config.tokens, counter)] if self.config.tokens else []
        options = [
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.max_send_message_length", self.config.max_message_bytes),
        ]
        server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=self.config.max_workers, thread_name_prefix="fedmerge-rpc"
            ),
            interceptors=interceptors,
            options=options,
        )
        intake_pb2_grpc.add_ExpertIntakeServicer_to_server(IntakeServicer(self.handlers), server)
        intake_pb2_grpc.add_BulkUploadServicer_to_server(BulkServicer(self.handlers), server)
        if self.config.tls is not None:
            key, cert, ca = self.config.tls.read()
            creds = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
            )
            self.port = server.add_secure_port(self.config.listen, creds)
        else:
            self.port = server.add_insecure_port(self.config.listen)
        server.start()
        self.grpc_server = server
        return self.port

    def wait(self) -> None:
        """Block until :meth:`stop` (or the process is signalled)."""
        while not self._stop.wait(0.5):
            pass

    def stop(self, grace: float = 2.0) -> None:
        self._stop.set()
        self.queue.wake()
        if self.grpc_server is not None:
            self.grpc_server.stop(grace).wait()
        if self._worker_thread is not None:
            self._worker_thread.join(30.0)
        self.queue.close()
        time.sleep(0)
