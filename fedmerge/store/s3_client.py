"""Reaching an S3-compatible object store: the ``s3://bucket/prefix`` location, the per-process boto3
client (adaptive retries and back-off), the store's clock in an answer, and the error an unusable
object store raises. The blob backend on top is :mod:`fedmerge.store.s3`."""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from fedmerge.errors import ConfigError, FedMergeError


class ObjectStoreError(FedMergeError, RuntimeError):
    """The object store cannot be used: unreachable, refused credentials, missing bucket, or a request
    still failing after botocore's retries. Nothing was committed by the failing call."""

    retryable = True


def is_s3_url(url: str | os.PathLike[str]) -> bool:
    return isinstance(url, str) and url.startswith("s3://")


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or ends without "/"

    @classmethod
    def parse(cls, url: str) -> S3Location:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ConfigError(f"store {url!r} is not an s3://bucket/prefix URL")
        if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", parsed.netloc):
            raise ConfigError(
                f"store {url!r}: {parsed.netloc!r} is not a valid bucket name (3-63 lowercase letters, "
                "digits, dots or hyphens)"
            )
        return cls(parsed.netloc, parsed.path.strip("/"))

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def default_cache_dir(loc: S3Location, endpoint: str | None) -> Path:
    """``$FEDMERGE_S3_CACHE`` or ``~/.cache/fedmerge/s3``, then endpoint host, bucket and prefix."""
    base = Path(os.environ.get("FEDMERGE_S3_CACHE") or Path.home() / ".cache" / "fedmerge" / "s3")
    host = urlparse(endpoint).netloc.replace(":", "_") if endpoint else "aws"
    return base / host / loc.bucket / (loc.prefix or "_")


_CLIENT_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CA_BUNDLE",
)
"""The environment that decides which credentials and settings a new client takes."""
_CLIENTS: dict[str, Any] = {}
_CLIENTS_LOCK = threading.Lock()


def make_client(endpoint: str | None, max_attempts: int = 8, connect_timeout: float = 5.0) -> Any:
    """A boto3 S3 client (credentials from boto3's usual chain) with adaptive retries and back-off.

    Clients are thread-safe and costly to build (botocore loads and parses the S3 service model,
    ~0.1 s of CPU), so one is kept per process and per (endpoint, retry settings, credential
    environment): opening a store again — a handle per thread, a command per export — reuses it and
    its open connections. A changed ``AWS_*`` credential variable gets a new client; a forked child
    never shares its parent's (the key holds the process id)."""
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
    fingerprint = hashlib.sha256(
        repr(
            (os.getpid(), endpoint, max_attempts, connect_timeout, [os.environ.get(k) for k in _CLIENT_ENV])
        ).encode()
    ).hexdigest()
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(fingerprint)
        if client is None:
            client = _CLIENTS[fingerprint] = _new_client(endpoint, max_attempts, connect_timeout)
    return client


def _new_client(endpoint: str | None, max_attempts: int, connect_timeout: float) -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ConfigError("an s3:// store needs boto3: pip install 'fedmerge[s3]'") from None
    config = Config(
        retries={"max_attempts": max_attempts, "mode": "adaptive"},
        connect_timeout=connect_timeout,
        read_timeout=60,
        max_pool_connections=32,
        s3={"addressing_style": "path"},
    )
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint, config=config)


def server_time(answer: dict[str, Any], *seen: float) -> float:
    """The object store's clock at ``answer``: its HTTP ``Date`` header (whole seconds, rounded down,
    so an age measured against it is never overstated). Without one, the newest of ``seen`` (the
    timestamps just listed), or 0 — so nothing looks old by this machine's clock."""
    date = str(answer.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date", ""))
    if date:
        with contextlib.suppress(TypeError, ValueError):
            return email.utils.parsedate_to_datetime(date).timestamp()
    return max(seen, default=0.0)


def is_missing(exc: BaseException) -> bool:
    """Whether the object store answered that the object does not exist."""
    return error_code(exc) in {"404", "NoSuchKey", "NotFound"}


def error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code or str(status or "")
    return ""
