"""Client side of large payloads in rounds: upload a package through the ServerApp's bulk endpoint.

A ``train`` message whose ``"fedmerge.config"`` carries ``bulk-address``, ``bulk-token`` and
``bulk-threshold-bytes`` lets a node send a package larger than the threshold through the bulk
channel (``fedmerge.v1.BulkUpload``: content-addressed, resumable, 1 MiB chunks) instead of inside
its Flower reply; the reply then carries only the object's sha256 and size in its ``"config"``
record (keys :data:`REF_SHA_KEY`, :data:`REF_SIZE_KEY`). The token authenticates the upload as this
node for this round: the server derived it from the node id, round and attempt with a secret, and it
reached the node through Flower's authenticated channel.

TLS: when the server's endpoint speaks TLS the message also says so (``bulk-tls``, and
``bulk-tls-client-auth`` when it requires a client certificate). The node verifies the server's
certificate against a CA bundle chosen in this order (:func:`trust_roots`): the SuperNode's
``--node-config "bulk-root-certificates='/path/ca.pem'"``, else the file named by
``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH``, else the system's bundle (``SSL_CERT_FILE`` or OpenSSL's
default file). Under mutual TLS it presents ``bulk-client-cert`` / ``bulk-client-key`` from its node
config (only then: a node's certificate is not shown to an endpoint that does not ask for it).
``bulk-require-tls=true`` in the node config refuses to send a package to a plaintext
endpoint. A failed handshake (unknown issuer, expired certificate, a certificate that does not name the
address dialled, a plaintext peer) is not retried: :class:`BulkUploadFailed` says which, and the
ClientApp's error reply carries that reason to the server, which records it for this node.

Download (``bulk-downlink = true`` on the server): a message that names the round's base for download
(:class:`BaseReference`: keys :data:`BASE_ID_KEY`, :data:`BASE_HASH_KEY`, :data:`BASE_DIGEST_KEY`,
:data:`BASE_SIZE_KEY`) instead of carrying ``"arrays"`` lets the node stream the base's full weights
from the same endpoint (``fedmerge.v1.ExpertIntake.GetVersion`` under the same token and TLS) into a
file (:func:`download_base`); the caller checks the weights' digest
(:func:`fedmerge.flower.client.fetch_base`). Failures raise :class:`BulkDownloadFailed`.

The TLS files of both sides are checked by the same helpers (:mod:`fedmerge.flower.tls`): readable,
PEM, key and certificate of one pair, within their validity.

This module imports no server-side code (a ClientApp must not load the round engine or the service;
it dials with the intake service's client helpers, :mod:`fedmerge.service.client`).
"""

from __future__ import annotations

import hashlib
import os
import ssl
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from fedmerge.errors import FedMergeError
from fedmerge.flower.tls import TlsMaterialError, check_key_pair, read_certificates
from fedmerge.service.client import ClientOptions, connect
from fedmerge.v1 import intake_pb2, intake_pb2_grpc

if TYPE_CHECKING:
    pass

ADDRESS_KEY = "bulk-address"
TOKEN_KEY = "bulk-token"
THRESHOLD_KEY = "bulk-threshold-bytes"
TLS_KEY = "bulk-tls"  # train message: the endpoint speaks TLS
CLIENT_AUTH_KEY = "bulk-tls-client-auth"  # train message: it requires a client certificate (mutual TLS)
# a SuperNode's --node-config keys
ROOTS_NODE_KEY = "bulk-root-certificates"
CLIENT_CERT_NODE_KEY = "bulk-client-cert"
CLIENT_KEY_NODE_KEY = "bulk-client-key"
REQUIRE_TLS_NODE_KEY = "bulk-require-tls"
GRPC_ROOTS_ENV = "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"
# train message: the round's base, to be downloaded from the bulk endpoint (instead of "arrays")
BASE_ID_KEY = "bulk-base-version-id"
BASE_HASH_KEY = "bulk-base-version-hash"
BASE_DIGEST_KEY = "bulk-base-digest"  # fedmerge.flower.downlink.weights_digest of the full weights
BASE_SIZE_KEY = "bulk-base-size"  # bytes of the safetensors file streamed
REF_SHA_KEY = "fedmerge-bulk-sha256"
REF_SIZE_KEY = "fedmerge-bulk-size"
CHUNK_BYTES = 1 << 20
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED)


class BulkUploadFailed(FedMergeError, RuntimeError):
    """The package could not be uploaded through the bulk endpoint (the server's reason is given)."""


class BulkDownloadFailed(FedMergeError, RuntimeError):
    """The round's base could not be downloaded from the bulk endpoint, or what arrived is not it
    (cut short, wrong version, digest mismatch); the message says which."""


@dataclass(frozen=True)
class NodeTls:
    """A node's own TLS settings for the bulk channel, from its SuperNode's ``--node-config``
    (module docstring): CA bundle, client certificate and key (mutual TLS), and whether it refuses a
    plaintext endpoint. Paths are on the node's machine; they are read when a package is uploaded."""

    root_certificates: str = ""
    client_cert: str = ""
    client_key: str = ""
    require_tls: bool = False

    @staticmethod
    def from_node_config(node_config: Mapping[str, Any]) -> NodeTls:
        """TlsMaterialError for a non-string path, a lone client certificate or key, or a
        ``bulk-require-tls`` that is not true/false."""
        values: dict[str, str] = {}
        for key in (ROOTS_NODE_KEY, CLIENT_CERT_NODE_KEY, CLIENT_KEY_NODE_KEY):
            value = node_config.get(key, "")
            if not isinstance(value, str):
                raise TlsMaterialError(f"node config {key}={value!r} must be a path (a quoted string)")
            values[key] = value
        if bool(values[CLIENT_CERT_NODE_KEY]) != bool(values[CLIENT_KEY_NODE_KEY]):
            raise TlsMaterialError(
                f"node config sets only one of {CLIENT_CERT_NODE_KEY} and {CLIENT_KEY_NODE_KEY}; "
                "a client certificate needs its key (set both, or neither)"
            )
        require = node_config.get(REQUIRE_TLS_NODE_KEY, False)
        if not isinstance(require, bool):
            raise TlsMaterialError(f"node config {REQUIRE_TLS_NODE_KEY}={require!r} must be true or false")
        return NodeTls(
            values[ROOTS_NODE_KEY], values[CLIENT_CERT_NODE_KEY], values[CLIENT_KEY_NODE_KEY], require
        )


def trust_roots(node: NodeTls) -> tuple[Path, str]:
    """(CA bundle, where it was taken from) that verifies the server: the node's
    ``bulk-root-certificates``, else ``$GRPC_DEFAULT_SSL_ROOTS_FILE_PATH``, else the system bundle
    (``ssl.get_default_verify_paths().cafile``: ``$SSL_CERT_FILE`` or OpenSSL's default file).
    The file must hold at least one PEM certificate (TlsMaterialError otherwise)."""
    if node.root_certificates:
        path, source = Path(node.root_certificates), f"{ROOTS_NODE_KEY}={node.root_certificates}"
    elif os.environ.get(GRPC_ROOTS_ENV):
        path, source = Path(os.environ[GRPC_ROOTS_ENV]), f"{GRPC_ROOTS_ENV}={os.environ[GRPC_ROOTS_ENV]}"
    else:
        cafile = ssl.get_default_verify_paths().cafile
        if cafile is None:
            raise TlsMaterialError(
                "the bulk endpoint speaks TLS but this node has no CA bundle to verify it: set "
                f"--node-config \"{ROOTS_NODE_KEY}='/path/ca.pem'\" (the CA that signed the server's "
                "bulk-tls-cert), or SSL_CERT_FILE"
            )
        path, source = Path(cafile), f"the system CA bundle {cafile}"
    read_certificates(path, ROOTS_NODE_KEY if node.root_certificates else source)
    return path, source


def _handshake_failure(detail: str, target: BulkTarget, roots: str) -> str | None:
    """The reason a TLS handshake failed as this client saw it, from gRPC's status detail; None when
    the failure is not one of the handshake's verdicts (then it may be retried)."""
    host = target.address.rpartition(":")[0]
    if "CERTIFICATE_VERIFY_FAILED" in detail:
        why = detail.split("CERTIFICATE_VERIFY_FAILED:", 1)[1].split(":", 1)[0].strip()
        if "expired" in why or "not yet valid" in why:
            return (
                f"the server's certificate is outside its validity ({why}); renew the server's bulk-tls-cert"
            )
        return f"the server's certificate is not trusted by {roots} ({why}): wrong CA bundle or wrong server"
    if "Hostname Verification" in detail:
        return (
            f"the server's certificate does not name {host!r}, the host this node dials "
            "(bulk-public-address must be a name or IP in the certificate's subjectAltName)"
        )
    if "WRONG_VERSION_NUMBER" in detail:
        return "the endpoint did not answer in TLS (a plaintext server, or another service on that port)"
    if "handshake failed" in detail.lower():
        return f"TLS handshake failed ({detail.split('last error: ', 1)[-1]})"
    return None


# ---------------------------------------------------------------------------------- the target


@dataclass(frozen=True)
class BulkTarget:
    """Where and as whom a node uploads this round's package, above which size it must, and whether
    the endpoint speaks TLS (``tls``) and requires a client certificate (``client_auth``)."""

    address: str
    token: str
    threshold_bytes: int
    tls: bool = False
    client_auth: bool = False

    @staticmethod
    def from_settings(settings: Mapping[str, Any]) -> BulkTarget | None:
        """From a train message's merged settings; None when the server offers no bulk endpoint."""
        address = settings.get(ADDRESS_KEY)
        token = settings.get(TOKEN_KEY)
        if not address or not token:
            return None
        return BulkTarget(
            str(address), str(token), int(settings.get(THRESHOLD_KEY, 0)),
            tls=bool(settings.get(TLS_KEY, False)), client_auth=bool(settings.get(CLIENT_AUTH_KEY, False)),
        )  # fmt: skip

    def to_record(self) -> dict[str, Any]:
        return {
            ADDRESS_KEY: self.address, TOKEN_KEY: self.token, THRESHOLD_KEY: self.threshold_bytes,
            TLS_KEY: self.tls, CLIENT_AUTH_KEY: self.client_auth,
        }  # fmt: skip


def channel_options(target: BulkTarget, node: NodeTls) -> tuple[ClientOptions, str]:
    """How to connect to ``target`` (:class:`~fedmerge.service.client.ClientOptions`) and the trust
    source named in errors. BulkUploadFailed when this node's TLS settings cannot serve this endpoint:
    TLS required by the node but not offered, a client certificate required but not configured, or
    a TLS file that fails :func:`read_certificates` / :func:`check_key_pair`."""
    limit = 4 * CHUNK_BYTES
    where = f"bulk upload to {target.address}"
    if not target.tls:
        if node.require_tls:
            raise BulkUploadFailed(
                f"{where} refused by this node: its endpoint is plaintext and the node config sets "
                f"{REQUIRE_TLS_NODE_KEY}=true (the server's operator must set bulk-tls-cert/bulk-tls-key)"
            )
        return ClientOptions(target.address, max_message_bytes=limit), "plaintext"
    if target.client_auth and not node.client_cert:
        raise BulkUploadFailed(
            f"{where}: the endpoint requires a client certificate (mutual TLS); set --node-config "
            f"\"{CLIENT_CERT_NODE_KEY}='/path/cert.pem' {CLIENT_KEY_NODE_KEY}='/path/key.pem'\" "
            "(issued by the CA in the server's bulk-tls-client-ca)"
        )
    present = target.client_auth and bool(node.client_cert)  # the certificate goes only where it is asked
    try:
        roots, source = trust_roots(node)
        if present:
            check_key_pair(node.client_cert, node.client_key, CLIENT_CERT_NODE_KEY, CLIENT_KEY_NODE_KEY)
    except TlsMaterialError as exc:
        raise BulkUploadFailed(f"{where}: {exc}") from None
    opts = ClientOptions(
        target.address,
        root_cert=roots,
        client_cert=Path(node.client_cert) if present else None,
        client_key=Path(node.client_key) if present else None,
        max_message_bytes=limit,
    )
    return opts, source


def upload_package(
    data: bytes, target: BulkTarget, *, node: NodeTls | None = None, retries: int = 6, backoff_s: float = 0.2
) -> str:
    """Upload ``data`` under ``target``'s token; returns its sha256. A broken stream resumes from the
    offset the server reports (``Begin``); memory beyond ``data`` is one chunk. ``node`` is this
    node's TLS settings (:meth:`NodeTls.from_node_config`); a failed TLS handshake is not retried
    (:class:`BulkUploadFailed` names the cause: untrusted or expired certificate, wrong name,
    plaintext peer)."""
    node = node or NodeTls()
    opts, roots = channel_options(target, node)
    sha = hashlib.sha256(data).hexdigest()
    metadata = (("authorization", f"Bearer {target.token}"),)
    view = memoryview(data)
    delay = backoff_s
    for attempt in range(retries + 1):
        try:
            with connect(opts) as channel:
                stub = intake_pb2_grpc.BulkUploadStub(channel)
                begin = intake_pb2.BulkBeginRequest(sha256=sha, total_size=len(data))
                status = stub.Begin(begin, metadata=metadata)
                if status.complete:
                    return sha
                start = int(status.offset)

                def chunks(start: int = start) -> Iterator[intake_pb2.BulkChunk]:
                    for offset in range(start, len(data), CHUNK_BYTES):
                        block = bytes(view[offset : offset + CHUNK_BYTES])
                        yield intake_pb2.BulkChunk(sha256=sha, offset=offset, data=block)

                final = stub.Upload(chunks(), metadata=metadata)
                if final.complete:
                    return sha
                reason = f"the upload ended at {final.offset} of {len(data)} bytes"
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            detail = exc.details() if hasattr(exc, "details") else str(exc)
            handshake = _handshake_failure(str(detail), target, roots) if target.tls else None
            if handshake is not None:
                raise BulkUploadFailed(f"bulk upload to {target.address}: {handshake}") from None
            reason = f"{getattr(code, 'name', 'UNKNOWN')}: {detail}"
            if code not in RETRYABLE:
                raise BulkUploadFailed(f"bulk upload to {target.address} refused: {reason}") from None
            if target.client_auth and "Socket closed" in str(detail):
                reason += (
                    " (under mutual TLS the server closes the handshake when it does not accept this node's "
                    f"{CLIENT_CERT_NODE_KEY}: is it issued by the CA in the server's bulk-tls-client-ca?)"
                )
        if attempt < retries:
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    raise BulkUploadFailed(f"bulk upload to {target.address} failed after {retries + 1} attempts: {reason}")


@dataclass(frozen=True)
class BaseReference:
    """The round's base as a train message names it for download (keys :data:`BASE_ID_KEY`,
    :data:`BASE_HASH_KEY`, :data:`BASE_DIGEST_KEY`, :data:`BASE_SIZE_KEY`)."""

    version_id: str
    version_hash: str
    digest: str
    size: int

    @staticmethod
    def from_settings(settings: Mapping[str, Any]) -> BaseReference | None:
        """From a train message's merged settings; None when the message names no base to download."""
        if BASE_ID_KEY not in settings:
            return None
        try:
            return BaseReference(
                str(settings[BASE_ID_KEY]), str(settings[BASE_HASH_KEY]), str(settings[BASE_DIGEST_KEY]),
                int(settings[BASE_SIZE_KEY]),
            )  # fmt: skip
        except KeyError as exc:
            raise BulkDownloadFailed(
                f"train message names a base to download but lacks {exc.args[0]!r}; server and client "
                "versions differ"
            ) from None


def download_base(
    ref: BaseReference,
    target: BulkTarget,
    dest: Path,
    *,
    node: NodeTls | None = None,
    retries: int = 3,
    backoff_s: float = 0.2,
) -> Path:
    """Stream the base ``ref`` names from ``target`` (``ExpertIntake.GetVersion``, full weights,
    under the node's round token) into the safetensors file ``dest``; returns ``dest``.

    Memory is one chunk. The first chunk must name ``ref.version_id`` with ``ref.version_hash`` and
    announce ``ref.size`` bytes; fewer or more bytes than that is a cut or corrupt stream. A cut
    stream (UNAVAILABLE and the like) is tried again from the start; a refusal (bad token, closed
    round, another version) or a mismatch raises :class:`BulkDownloadFailed` at once, and ``dest``
    is removed. The caller verifies the weights (:func:`~fedmerge.flower.downlink.weights_digest`)."""
    node = node or NodeTls()
    try:
        opts, roots = channel_options(target, node)
    except BulkUploadFailed as exc:
        raise BulkDownloadFailed(str(exc).replace("bulk upload", "bulk download", 1)) from None
    metadata = (("authorization", f"Bearer {target.token}"),)
    where = f"bulk download of base {ref.version_id!r} from {target.address}"
    request = intake_pb2.GetVersionRequest(version=ref.version_id, full_weights=True)
    delay = backoff_s
    reason = ""
    for attempt in range(retries + 1):
        try:
            with connect(opts) as channel, dest.open("wb") as fh:
                stub = intake_pb2_grpc.ExpertIntakeStub(channel)
                received = 0
                for i, chunk in enumerate(stub.GetVersion(request, metadata=metadata)):
                    if i == 0:
                        _check_first_chunk(chunk, ref, where)
                    received += len(chunk.data)
                    if received > ref.size:
                        raise BulkDownloadFailed(f"{where}: more than the announced {ref.size} bytes arrived")
                    fh.write(chunk.data)
            if received != ref.size:
                raise BulkDownloadFailed(
                    f"{where}: the stream ended after {received} of {ref.size} bytes (cut short)"
                )
            return dest
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            detail = exc.details() if hasattr(exc, "details") else str(exc)
            handshake = _handshake_failure(str(detail), target, roots) if target.tls else None
            if handshake is not None:
                dest.unlink(missing_ok=True)
                raise BulkDownloadFailed(f"{where}: {handshake}") from None
            reason = f"{getattr(code, 'name', 'UNKNOWN')}: {detail}"
            if code not in RETRYABLE:
                dest.unlink(missing_ok=True)
                raise BulkDownloadFailed(f"{where} refused: {reason}") from None
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        if attempt < retries:
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    dest.unlink(missing_ok=True)
    raise BulkDownloadFailed(f"{where} failed after {retries + 1} attempts: {reason}")


def _check_first_chunk(chunk: intake_pb2.VersionChunk, ref: BaseReference, where: str) -> None:
    if chunk.info.id != ref.version_id or chunk.info.content_hash != ref.version_hash:
        raise BulkDownloadFailed(
            f"{where}: the server streams version {chunk.info.id!r} (content hash "
            f"{chunk.info.content_hash[:12]}…), not {ref.version_id!r} ({ref.version_hash[:12]}…)"
        )
    if chunk.total_size != ref.size:
        raise BulkDownloadFailed(
            f"{where}: the server announces {chunk.total_size} bytes, the train message {ref.size}"
        )
