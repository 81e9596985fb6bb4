"""Client side of large payloads in rounds: upload a package through the ServerApp's bulk endpoint.

A ``train`` message whose ``"fedmerge.config"`` carries ``bulk-address``, ``bulk-token`` and
``bulk-threshold-bytes`` lets a node send a package larger than the threshold through the bulk
channel (``fedmerge.v1.BulkUpload``: content-addressed, resumable, 1 MiB chunks) instead of inside
its Flower reply; the reply then carries only the object's sha256 and size in its ``"config"``
record (keys :data:`REF_SHA_KEY`, :data:`REF_SIZE_KEY`). The token authenticates the upload as this
node for this round: the server derived it from the node id, round and attempt with a secret, and it
reached the node through Flower's authenticated channel.

This module imports no server-side code (a ClientApp must not load the round engine or the service).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from fedmerge.errors import FedMergeError
from fedmerge.v1 import intake_pb2, intake_pb2_grpc

ADDRESS_KEY = "bulk-address"
TOKEN_KEY = "bulk-token"
THRESHOLD_KEY = "bulk-threshold-bytes"
REF_SHA_KEY = "fedmerge-bulk-sha256"
REF_SIZE_KEY = "fedmerge-bulk-size"
CHUNK_BYTES = 1 << 20
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED)


class BulkUploadFailed(FedMergeError, RuntimeError):
    """The package could not be uploaded through the bulk endpoint (the server's reason is given)."""


@dataclass(frozen=True)
class BulkTarget:
    """Where and as whom a node uploads this round's package, and above which size it must."""

    address: str
    token: str
    threshold_bytes: int

    @staticmethod
    def from_settings(settings: Mapping[str, Any]) -> BulkTarget | None:
        """From a train message's merged settings; None when the server offers no bulk endpoint."""
        address = settings.get(ADDRESS_KEY)
        token = settings.get(TOKEN_KEY)
        if not address or not token:
            return None
        return BulkTarget(str(address), str(token), int(settings.get(THRESHOLD_KEY, 0)))

    def to_record(self) -> dict[str, Any]:
        return {ADDRESS_KEY: self.address, TOKEN_KEY: self.token, THRESHOLD_KEY: self.threshold_bytes}


def upload_package(data: bytes, target: BulkTarget, *, retries: int = 6, backoff_s: float = 0.2) -> str:
    """Upload ``data`` under ``target``'s token; returns its sha256. A broken stream resumes from the
    offset the server reports (``Begin``); memory beyond ``data`` is one chunk."""
    sha = hashlib.sha256(data).hexdigest()
    metadata = (("authorization", f"Bearer {target.token}"),)
    options = [
        ("grpc.max_send_message_length", 4 * CHUNK_BYTES),
        ("grpc.max_receive_message_length", 1 << 20),
    ]
    view = memoryview(data)
    delay = backoff_s
    for attempt in range(retries + 1):
        try:
            with grpc.insecure_channel(target.address, options=options) as channel:
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
            reason = f"{getattr(code, 'name', 'UNKNOWN')}: {detail}"
            if code not in RETRYABLE:
                raise BulkUploadFailed(f"bulk upload to {target.address} refused: {reason}") from None
        if attempt < retries:
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    raise BulkUploadFailed(f"bulk upload to {target.address} failed after {retries + 1} attempts: {reason}")
