"""The ServerApp's bulk endpoint: large round payloads uploaded beside Flower, spooled to disk.

When ``bulk-address`` is set, :class:`BulkEndpoint` serves ``fedmerge.v1.BulkUpload`` (the service's
:class:`~fedmerge.service.server.BulkServicer`, unchanged) for the run. Each ``train`` message carries
the endpoint's address and a per-node, per-round token::

    token = "<round>.<attempt>.<node>." ‖ hex(HMAC-SHA256(secret, "<round>/<attempt>/<node>"))

with a secret drawn when the endpoint starts, so only the node that received the message through
Flower's authenticated channel can upload under that identity (owner ``round-R/attempt-A/node-N``),
and only while that round attempt is open. Uploads land in the round's spool,
``<spool>/round-R-attempt-A/`` (a :class:`~fedmerge.service.bulk.BulkStore` recording owners), which
is removed after the round commits or is abandoned (:meth:`BulkEndpoint.close_round`).

:meth:`BulkEndpoint.resolve` turns a reply's reference (sha256, size) into a verified file: the
object exists, was completed by this node in this round attempt, has the declared size, and its
bytes hash to the declared sha256. The hash is the one this endpoint computed over the bytes as they
arrived (:meth:`~fedmerge.service.bulk.BulkStore.finish` refuses an upload whose received bytes do not
hash to the name the client declared), never the client's claim; the file is not read again while it
is the one published then (same device, inode, size, modification and change times: the spool is
the server's, written once). A file the endpoint did not complete in this process (a restart), or
one changed since, is hashed again before use. Otherwise :class:`BulkReferenceError` says why.

Verification as uploads arrive: :meth:`BulkEndpoint.verify_on_arrival` registers, for a round
attempt, the judge's check of a spooled package, which runs as soon as a node's first upload of the
round attempt completes, before its reply crosses Flower's message path
(:mod:`~fedmerge.flower.server.arrival_checks`). The judge takes the result with
:meth:`BulkEndpoint.take_verified` once the reply's reference resolved. An upload that
would leave less than ``bulk-spool-reserve-bytes`` free on the spool's disk, or that meets a full
disk, is refused and its partial bytes are removed.

TLS (``bulk-tls-cert`` / ``bulk-tls-key``, optional ``bulk-tls-client-ca``): the endpoint serves
gRPC over TLS with that certificate chain (the service's
:class:`~fedmerge.service.config.TlsConfig`); with a client CA the handshake itself refuses nodes
without a certificate it issued (mutual TLS; the round token still names the node). Each ``train``
message then says ``bulk-tls`` (and ``bulk-tls-client-auth``) so that nodes dial with TLS
(:mod:`fedmerge.flower.client.bulk`). A plaintext endpoint binds only a loopback address unless
``bulk-allow-insecure`` (:func:`~fedmerge.flower.settings.bulk_insecure_bind_problem`).

Downlink (``bulk-downlink = true``): the endpoint also serves ``fedmerge.v1.ExpertIntake.GetVersion``
(that method only; the others answer UNIMPLEMENTED) so that a node that needs the round's base
downloads its full weights here instead of receiving them in Flower's ``"arrays"``.
:meth:`BulkEndpoint.offer_base` pins the round attempt's base version and returns the reference the
``train`` message carries (:data:`~fedmerge.flower.client.bulk.BASE_ID_KEY` and its siblings: version
id, content hash, :func:`~fedmerge.flower.downlink.weights_digest` of the weights, file size). A
download is authenticated by the node's round token (the upload token), is served only while that
round attempt is open, only to a node the base was offered to, and only for that base version
(PERMISSION_DENIED otherwise). The weights are streamed from the store tensor by tensor
(:meth:`~fedmerge.store.ModelStore.iter_materialized`) as one safetensors file in 1 MiB chunks: the
server holds one tensor, never the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from fedmerge.delta.rules import StaleOrInvalid
from fedmerge.errors import ConfigError
from fedmerge.flower.client.bulk import (
    BASE_DIGEST_KEY,
    BASE_HASH_KEY,
    BASE_ID_KEY,
    BASE_SIZE_KEY,
    CHUNK_BYTES,
    CLIENT_AUTH_KEY,
    TLS_KEY,
)
from fedmerge.flower.config import RunConfig
from fedmerge.flower.downlink import weights_digest_of
from fedmerge.flower.server.arrival_checks import ArrivalChecks, Closeable, Verifier, attempt_prefix, discard
from fedmerge.flower.settings import bulk_insecure_bind_problem
from fedmerge.service.bulk import BulkError, BulkStatus, BulkStore, check_sha
from fedmerge.service.config import TlsConfig
from fedmerge.service.server import BulkServicer, _chunks, _Handlers, version_info
from fedmerge.service.streams import IdleGuard, StreamSlots
from fedmerge.store import ModelStore, Version
from fedmerge.store.handles import reopener
from fedmerge.store.safetensors_format import encode_header, tensor_bytes
from fedmerge.v1 import intake_pb2, intake_pb2_grpc

log = logging.getLogger("fedmerge.bulk")
HASH_BLOCK = 4 << 20
STREAM_IDLE_S = 120.0


def file_identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What changes when a file is rewritten or replaced: (device, inode, size, mtime ns, ctime ns)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class Received:
    """An upload this endpoint completed: the published file's identity when it was published (its
    sha256 is its name, computed by the endpoint over the bytes it received)."""

    identity: tuple[int, int, int, int, int]


class BulkReferenceError(StaleOrInvalid):
    """A reply's bulk reference does not resolve to a complete, verified object of that node."""


def _spool_failed(exc: OSError) -> str:
    return f"spool write failed ({exc.strerror or exc}); the partial upload was removed"


def owner_of(round_: int, attempt: int, node: int) -> str:
    return f"{attempt_prefix(round_, attempt)}node-{node}"


class SpoolRouter:
    """The BulkStore interface the servicer uses, routed by owner to the spool of its round attempt."""

    def __init__(self, root: Path, max_bytes: int, reserve_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.reserve_bytes = reserve_bytes
        self._stores: dict[tuple[int, int], BulkStore] = {}
        self._received: dict[tuple[str, str], Received] = {}  # (owner, sha256) completed here
        self._lock = threading.Lock()
        self.on_complete: Callable[[str, str, Path], None] | None = None  # (owner, sha256, path)

    @staticmethod
    def spool_name(round_: int, attempt: int) -> str:
        return f"round-{round_}-attempt-{attempt}"

    def open(self, round_: int, attempt: int) -> BulkStore:
        with self._lock:
            store = self._stores.get((round_, attempt))
            if store is None:
                store = BulkStore(
                    self.root / self.spool_name(round_, attempt), max_bytes=self.max_bytes, track_owners=True
                )
                self._stores[(round_, attempt)] = store
            return store

    def close(self, round_: int, attempt: int) -> None:
        prefix = attempt_prefix(round_, attempt)
        with self._lock:
            self._stores.pop((round_, attempt), None)
            for key in [k for k in self._received if k[0].startswith(prefix)]:
                del self._received[key]
        shutil.rmtree(self.root / self.spool_name(round_, attempt), ignore_errors=True)

    def received(self, owner: str, sha256: str) -> Received | None:
        """The record of ``owner``'s upload of ``sha256`` if this process completed it, else None."""
        with self._lock:
            return self._received.get((owner, sha256))

    def is_open(self, round_: int, attempt: int) -> bool:
        with self._lock:
            return (round_, attempt) in self._stores

    def store_of(self, owner: str) -> BulkStore:
        try:
            r, a, _ = (int(part.split("-", 1)[1]) for part in owner.split("/"))
        except (ValueError, IndexError):
            raise BulkError(f"upload identity {owner!r} is not a round participant") from None
        with self._lock:
            store = self._stores.get((r, a))
        if store is None:
            raise BulkError(f"round {r} attempt {a} is closed; uploads for it are no longer accepted")
        return store

    # the BulkStore methods BulkServicer calls ------------------------------------------------------
    def begin(self, sha256: str, total_size: int, owner: str = "") -> BulkStatus:
        store = self.store_of(owner)
        status = store.begin(sha256, total_size, owner)
        if not status.complete:
            free = shutil.disk_usage(store.root).free
            if free - (total_size - status.offset) < self.reserve_bytes:
                raise BulkError(
                    f"spool disk full: {total_size - status.offset} more bytes would leave "
                    f"{max(free - (total_size - status.offset), 0)} free, below bulk-spool-reserve-bytes="
                    f"{self.reserve_bytes}; the operator must free space on {self.root}"
                )
        return status

    def acquire(self, sha256: str, owner: str = "") -> None:
        self.store_of(owner).acquire(sha256, owner)

    def release(self, sha256: str, owner: str = "") -> None:
        with contextlib.suppress(BulkError):
            self.store_of(owner).release(sha256, owner)

    def write(self, sha256: str, offset: int, data: bytes, owner: str = "") -> int:
        store = self.store_of(owner)
        try:
            return store.write(sha256, offset, data, owner)
        except OSError as exc:  # e.g. ENOSPC: drop this upload's bytes, tell the client why
            self._drop(store, sha256, owner)
            raise BulkError(_spool_failed(exc)) from None

    def finish(self, sha256: str, owner: str = "") -> BulkStatus:
        store = self.store_of(owner)
        try:
            status = store.finish(sha256, owner)
        except OSError as exc:
            self._drop(store, sha256, owner)
            raise BulkError(_spool_failed(exc)) from None
        if status.complete:  # the store hashed the received bytes and found the declared sha256
            path = store.path(sha256)
            with self._lock:
                self._received[(owner, sha256)] = Received(file_identity(path.stat()))
            if self.on_complete is not None:
                self.on_complete(owner, sha256, path)
        return status

    def put_bytes(self, data: bytes) -> BulkStatus:
        raise BulkError("round payloads are uploaded with Begin/Upload (owner-scoped), not UploadUnary")

    @staticmethod
    def _drop(store: BulkStore, sha256: str, owner: str) -> None:
        up = store._uploads.pop((owner, sha256), None)
        if up is not None and up.fh is not None:
            with contextlib.suppress(OSError):
                up.fh.close()
            up.fh = None
        store.part_path(sha256, owner).unlink(missing_ok=True)


class _RoundHandlers(_Handlers):
    """What :class:`BulkServicer` needs from the service, with identities from round tokens."""

    def __init__(self, router: SpoolRouter, secret: bytes) -> None:  # the service's queue/store are unused
        self.bulk = router  # type: ignore[assignment]
        self.metrics = None  # the service's operator metrics are not collected for round uploads
        self.router = router
        self.secret = secret
        self.stop = threading.Event()
        self.slots = StreamSlots(2)

    def client_id(self, context: grpc.ServicerContext) -> str:
        token = ""
        for key, value in context.invocation_metadata():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                token = value[len("Bearer ") :]
        owner = verify_token(self.secret, token)
        if owner is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid round upload token")
            raise AssertionError("unreachable")
        round_, attempt, _ = owner
        if not self.router.is_open(round_, attempt):
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"round {round_} attempt {attempt} is closed; uploads for it are no longer accepted",
            )
        return owner_of(*owner)

    def guard(self, request_iterator: Iterator[Any], call: str, hint: str) -> IdleGuard[Any]:
        return IdleGuard(request_iterator, STREAM_IDLE_S, call=call, hint=hint)


@dataclass(frozen=True)
class BaseOffer:
    """The base a round attempt's nodes may download: the version, the digest of its full weights,
    the size of the safetensors file streamed, and the nodes it was offered to (filled as offered)."""

    version: Version
    digest: str
    size: int
    nodes: set[int] = field(default_factory=set)


class NodeBulkSettings(dict[str, Any]):
    """:meth:`BulkEndpoint.settings_for`'s keys for one node (a dict), able to add the reference of
    the round's base (:meth:`base_reference`) for a node that must download it."""

    def __init__(
        self, endpoint: BulkEndpoint, round_: int, attempt: int, node: int, values: dict[str, Any]
    ) -> None:
        super().__init__(values)
        self.endpoint, self.round, self.attempt, self.node = endpoint, round_, attempt, node

    def base_reference(self, base: Version) -> dict[str, Any] | None:
        """The train message keys that let this node download ``base`` (:meth:`BulkEndpoint.offer_base`)."""
        return self.endpoint.offer_base(self.round, self.attempt, self.node, base)


def _bearer(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :]
    return ""


class _BaseDownload(intake_pb2_grpc.ExpertIntakeServicer):
    """``ExpertIntake.GetVersion`` for round nodes: the round attempt's base, full weights only."""

    def __init__(self, endpoint: BulkEndpoint) -> None:
        self.endpoint = endpoint

    def GetVersion(  # noqa: N802
        self, request: intake_pb2.GetVersionRequest, context: grpc.ServicerContext
    ) -> Iterator[intake_pb2.VersionChunk]:
        owner = verify_token(self.endpoint.secret, _bearer(context))
        if owner is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid round token")
            raise AssertionError("unreachable")
        round_, attempt, node = owner
        offer = self.endpoint.offer_of(round_, attempt)
        if offer is None:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"round {round_} attempt {attempt} is closed or offers no base download",
            )
            raise AssertionError("unreachable")
        if node not in offer.nodes:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"node {node} was not offered the base of round {round_} attempt {attempt}",
            )
        if request.version != offer.version.id or not request.full_weights:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"round {round_} attempt {attempt} serves only the full weights of its base "
                f"{offer.version.id!r}, not {request.version!r} (full_weights={request.full_weights})",
            )
        yield from self.endpoint.stream_base(offer)
        log.info(
            "round %d attempt %d: node %d downloaded base %s (%d bytes) from the bulk endpoint",
            round_, attempt, node, offer.version.id, offer.size,
        )  # fmt: skip


def make_token(secret: bytes, round_: int, attempt: int, node: int) -> str:
    mac = hmac.new(secret, f"{round_}/{attempt}/{node}".encode(), hashlib.sha256).hexdigest()
    return f"{round_}.{attempt}.{node}.{mac}"


def verify_token(secret: bytes, token: str) -> tuple[int, int, int] | None:
    """(round, attempt, node) of a valid token, else None."""
    parts = token.split(".")
    if len(parts) != 4 or not all(p.isdigit() for p in parts[:3]):
        return None
    round_, attempt, node = (int(p) for p in parts[:3])
    if not hmac.compare_digest(make_token(secret, round_, attempt, node), token):
        return None
    return round_, attempt, node


class BulkEndpoint:
    """The run's bulk endpoint and spool (module docstring). ``start()`` binds; ``stop()`` ends it.

    ``tls`` (certificate, key, optional client CA) makes it serve TLS; without it, a ``bind`` off
    loopback raises ConfigError unless ``allow_insecure``."""

    def __init__(
        self,
        spool: Path,
        bind: str,
        public: str = "",
        *,
        max_bytes: int,
        reserve_bytes: int,
        threshold: int,
        tls: TlsConfig | None = None,
        allow_insecure: bool = False,
        store_root: Path | None = None,
        open_store: Callable[[], ModelStore] | None = None,
    ) -> None:
        problem = bulk_insecure_bind_problem(bind, tls is not None, allow_insecure)
        if problem is not None:
            raise ConfigError(problem)
        self.tls = tls
        self.spool = Path(spool)
        self.spool.mkdir(parents=True, exist_ok=True)
        self.bind = bind
        self.public = public
        self.threshold = threshold
        self.router = SpoolRouter(self.spool, max_bytes, reserve_bytes)
        self.secret = secrets.token_bytes(32)
        self.server: grpc.Server | None = None
        self.address = ""
        self.store_root = store_root  # the model store bases are downloaded from (None: no downlink)
        # opens a handle on that store: its catalog and, for s3://, its bucket (store.handles.reopener)
        self.open_store = open_store or (lambda: ModelStore.open(self._root()))
        self._offers: dict[tuple[int, int], BaseOffer] = {}
        self._digests: dict[str, tuple[str, int]] = {}  # version id -> (weights digest, file size)
        self._offer_lock = threading.Lock()
        self.arrival_checks = ArrivalChecks()
        self.router.on_complete = self.arrival_checks.completed

    def _root(self) -> Path:
        assert self.store_root is not None
        return self.store_root

    def start(self) -> str:
        """Bind and serve; returns the address clients dial."""
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="fedmerge-bulk"),
            options=[
                ("grpc.max_receive_message_length", 4 * CHUNK_BYTES),
                ("grpc.max_send_message_length", 4 * CHUNK_BYTES),
            ],
        )
        intake_pb2_grpc.add_BulkUploadServicer_to_server(
            BulkServicer(_RoundHandlers(self.router, self.secret)), server
        )
        intake_pb2_grpc.add_ExpertIntakeServicer_to_server(_BaseDownload(self), server)
        host = self.bind.rpartition(":")[0]
        if self.tls is not None:
            key, cert, ca = self.tls.read()
            creds = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
            )
            port = server.add_secure_port(self.bind, creds)
        else:
            port = server.add_insecure_port(self.bind)
        if port == 0:
            raise ConfigError(f"bulk-address={self.bind!r} could not be bound; choose a free HOST:PORT")
        server.start()
        self.server = server
        if self.public:
            self.address = self.public
        elif host in ("0.0.0.0", "[::]", "::"):
            server.stop(None)
            raise ConfigError(
                f"bulk-address={self.bind!r} binds every interface; set bulk-public-address to the "
                "HOST:PORT clients dial"
            )
        else:
            self.address = f"{host}:{port}"
        return self.address

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=1.0).wait()
            self.server = None
        self.arrival_checks.stop()

    def __enter__(self) -> BulkEndpoint:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------- rounds
    def open_round(self, round_: int, attempt: int) -> None:
        self.router.open(round_, attempt)

    def close_round(self, round_: int, attempt: int) -> None:
        """Reclaim the round attempt's spool (after its commit, or when it is abandoned)."""
        self.arrival_checks.close_attempt(round_, attempt)
        self.router.close(round_, attempt)
        with self._offer_lock:
            self._offers.pop((round_, attempt), None)

    # ----------------------------------------------------------------- verification on arrival
    def verify_on_arrival(self, round_: int, attempt: int, verify: Verifier) -> None:
        """Run ``verify(path)`` on each node's first upload completed in this open round attempt, as
        soon as it completes (module docstring); :meth:`take_verified` hands its result (or its
        exception) to the judge. Results no reply takes are closed by :meth:`close_round`."""
        self.arrival_checks.register(round_, attempt, verify)

    def take_verified(
        self, sha256: str, round_: int, attempt: int, node: int
    ) -> futures.Future[Closeable] | None:
        """The verification started when ``node``'s upload of ``sha256`` completed (its result or its
        exception), once: None when none was started, or when the file is no longer the one published
        then (it is then verified again by the caller). Call after :meth:`resolve` accepted the reference."""
        owner = owner_of(round_, attempt, node)
        fut = self.arrival_checks.take(owner, sha256)
        if fut is None:
            return None
        received = self.router.received(owner, sha256)
        store = self.router.open(round_, attempt) if self.router.is_open(round_, attempt) else None
        try:
            current = None if store is None else file_identity(store.path(sha256).stat())
        except OSError:
            current = None
        if received is None or current != received.identity:
            discard(fut)
            return None
        return fut

    def discard_except(self, round_: int) -> list[str]:
        """Remove every spool left by an earlier run except those of ``round_`` (which a resumed
        round may continue with: its objects are verified again before use). Returns what was removed."""
        removed = []
        keep = f"round-{round_}-attempt-"
        for child in sorted(self.spool.iterdir()):
            if child.is_dir() and not child.name.startswith(keep):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child.name)
        return removed

    def settings_for(self, round_: int, attempt: int, node: int) -> NodeBulkSettings:
        """The train message keys that let ``node`` upload this round attempt's package (a dict that
        can also add the base's download reference: :meth:`NodeBulkSettings.base_reference`)."""
        return NodeBulkSettings(
            self,
            round_,
            attempt,
            node,
            {
                "bulk-address": self.address,
                "bulk-token": make_token(self.secret, round_, attempt, node),
                "bulk-threshold-bytes": self.threshold,
                TLS_KEY: self.tls is not None,
                CLIENT_AUTH_KEY: self.tls is not None and self.tls.client_ca is not None,
            },
        )

    def offer_base(self, round_: int, attempt: int, node: int, base: Version) -> dict[str, Any] | None:
        """Let ``node`` download ``base`` in this round attempt and return the reference its train
        message carries: {BASE_ID_KEY: id, BASE_HASH_KEY: content hash, BASE_DIGEST_KEY:
        weights_digest(θ), BASE_SIZE_KEY: bytes of the safetensors file}. None when the endpoint has
        no store, or the file is not larger than ``bulk-threshold-bytes`` (then "arrays" is cheaper).
        The digest is computed once per version, reading the weights tensor by tensor."""
        if self.store_root is None:
            return None
        with self._offer_lock:
            known = self._digests.get(base.id)
        if known is None:
            with self.open_store() as store:
                specs = store.materialized_specs(base)
                header = encode_header(specs, {"fedmerge_version": base.id})
                size = len(header) + sum(s.nbytes for s in specs)
                digest = weights_digest_of(store.iter_materialized(base)) if size > self.threshold else ""
            known = (digest, size)
            with self._offer_lock:
                self._digests[base.id] = known
        digest, size = known
        if size <= self.threshold:
            return None
        with self._offer_lock:
            offer = self._offers.get((round_, attempt))
            if offer is None or offer.version.id != base.id:
                offer = self._offers[(round_, attempt)] = BaseOffer(base, digest, size)
            offer.nodes.add(node)
        return {BASE_ID_KEY: base.id, BASE_HASH_KEY: base.content_hash, BASE_DIGEST_KEY: digest,
                BASE_SIZE_KEY: size}  # fmt: skip

    def offer_of(self, round_: int, attempt: int) -> BaseOffer | None:
        """The base offered in an open round attempt, else None."""
        if not self.router.is_open(round_, attempt):
            return None
        with self._offer_lock:
            return self._offers.get((round_, attempt))

    def stream_base(self, offer: BaseOffer) -> Iterator[intake_pb2.VersionChunk]:
        """The offered base's full weights as one safetensors file in chunks of at most
        :data:`CHUNK_BYTES`, read from the store one tensor at a time; the first chunk carries the
        version's info and the file's size."""
        assert self.store_root is not None
        with self.open_store() as store:
            specs = store.materialized_specs(offer.version)
            header = encode_header(specs, {"fedmerge_version": offer.version.id})

            def parts() -> Iterator[bytes | memoryview]:
                yield header
                for _, t in store.iter_materialized(offer.version):
                    yield tensor_bytes(t)

            first = True
            for piece in _chunks(parts(), CHUNK_BYTES):
                if first:
                    info = version_info(offer.version)
                    yield intake_pb2.VersionChunk(info=info, data=piece, total_size=offer.size)
                    first = False
                else:
                    yield intake_pb2.VersionChunk(data=piece)

    def resolve(self, sha256: Any, size: Any, round_: int, attempt: int, node: int) -> Path:
        """The verified spool file of a reference (module docstring), else :class:`BulkReferenceError`."""
        if not isinstance(sha256, str) or not isinstance(size, int) or isinstance(size, bool):
            raise BulkReferenceError(
                f"bulk reference needs a sha256 string and an integer size, got {type(sha256).__name__} "
                f"and {type(size).__name__}"
            )
        try:
            check_sha(sha256)
        except BulkError as exc:
            raise BulkReferenceError(f"bulk reference: {exc}") from None
        owner = owner_of(round_, attempt, node)
        store = self.router.open(round_, attempt) if self.router.is_open(round_, attempt) else None
        if store is None:
            raise BulkReferenceError(
                f"bulk object {sha256[:12]}…: round {round_} attempt {attempt} has no spool"
            )
        if not store.has(sha256):
            arrived = store.partial_size(sha256, owner)
            if arrived is not None:
                raise BulkReferenceError(
                    f"bulk object {sha256[:12]}… is still uploading ({arrived} of {size} bytes arrived); "
                    "reply only after the upload completed"
                )
            raise BulkReferenceError(f"bulk object {sha256[:12]}… does not exist; upload it before replying")
        owners = store.owners(sha256)
        if owner not in owners:
            raise BulkReferenceError(
                f"bulk object {sha256[:12]}… was uploaded by another node, not node {node}; "
                "a node may only reference its own upload"
            )
        path = store.path(sha256)
        st = path.stat()
        actual = st.st_size
        if actual != size:
            raise BulkReferenceError(
                f"bulk object {sha256[:12]}… holds {actual} bytes but the reply declares {size}: "
                "truncated or a wrong reference"
            )
        received = self.router.received(owner, sha256)
        if received is not None and received.identity == file_identity(st):
            return path  # hashed by this endpoint as its bytes arrived, and the same file since
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while block := fh.read(HASH_BLOCK):
                digest.update(block)
        if digest.hexdigest() != sha256:
            raise BulkReferenceError(
                f"bulk object {sha256[:12]}… hashes to {digest.hexdigest()[:12]}… on disk: corrupted; "
                "it is not used"
            )
        return path


def bulk_endpoint_for(cfg: RunConfig, store: ModelStore) -> BulkEndpoint:
    """The run's bulk endpoint (not started): spool ``bulk-spool-dir`` or ``<store>.spool``; TLS when
    ``bulk-tls-cert`` is set (the files were checked by :func:`~fedmerge.flower.config.parse_run_config`)."""
    root = Path(store.root).resolve()
    spool = Path(cfg.bulk.spool_dir) if cfg.bulk.spool_dir else root.with_name(root.name + ".spool")
    tls = None
    if cfg.bulk.tls_cert:
        client_ca = Path(cfg.bulk.tls_client_ca) if cfg.bulk.tls_client_ca else None
        tls = TlsConfig(Path(cfg.bulk.tls_cert), Path(cfg.bulk.tls_key), client_ca)
    return BulkEndpoint(
        spool, cfg.bulk.address, cfg.bulk.public_address, max_bytes=cfg.rounds.max_package_bytes,
        reserve_bytes=cfg.bulk.spool_reserve_bytes, threshold=cfg.bulk.threshold_bytes,
        tls=tls, allow_insecure=cfg.bulk.allow_insecure, store_root=root, open_store=reopener(store),
    )  # fmt: skip
