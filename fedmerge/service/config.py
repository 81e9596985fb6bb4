"""Typed, validated settings of the intake service (:class:`ServiceConfig`).

Every field is checked in ``__post_init__``; a bad value raises :class:`ServiceConfigError` naming
the field, the value and the remedy. Sizes are bytes; times are seconds.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmerge.errors import ConfigError

_TOKEN_CLIENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")


class ServiceConfigError(ConfigError):
    """A service setting is missing, unknown or out of range."""


@dataclass(frozen=True)
class Limits:
    """Per-client limits. ``max_submission_bytes`` bounds one expert; ``max_queued`` how many of a
    client's experts may wait unmerged at once; ``max_total_bytes`` all bytes a client ever submitted
    (0 = unlimited); ``max_concurrent_streams`` how many ``SubmitExpert``/``Upload`` streams a client
    may have open at once (one more is refused with ``RESOURCE_EXHAUSTED``), so that one client holds
    at most that many of the server's ``max_workers`` handler threads."""

    max_submission_bytes: int = 2 << 30
    max_queued: int = 64
    max_total_bytes: int = 0
    max_bulk_bytes: int = 8 << 30
    max_concurrent_streams: int = 4

    def __post_init__(self) -> None:
        for name in ("max_submission_bytes", "max_queued", "max_bulk_bytes", "max_concurrent_streams"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ServiceConfigError(f"limits.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.max_total_bytes, int) or self.max_total_bytes < 0:
            raise ServiceConfigError(
                f"limits.max_total_bytes must be ≥ 0 (0 = unlimited), got {self.max_total_bytes!r}"
            )


@dataclass(frozen=True)
class TlsConfig:
    """Server certificate and key (PEM); with ``client_ca`` clients must present a certificate signed
    by it (mutual TLS) and their identity is the certificate's common name."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def __post_init__(self) -> None:
        for name in ("cert", "key", "client_ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ServiceConfigError(f"tls.{name}: {path} does not exist; pass a PEM file")

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        ca = Path(self.client_ca).read_bytes() if self.client_ca is not None else None
        return Path(self.key).read_bytes(), Path(self.cert).read_bytes(), ca


@dataclass(frozen=True)
class ServiceConfig:
    """Everything ``serve-continual`` needs.

    * ``store``: the model store directory, or ``s3://bucket/prefix`` (blobs in an S3-compatible
      object store at ``s3_endpoint``, else ``AWS_ENDPOINT_URL``; credentials from boto3's chain:
      ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, a profile, …);
    * ``data_dir``: spool, queue database and bulk objects (default ``<store>/../intake``; for an
      ``s3://`` store a local folder beside its read-through cache, ``<cache>.intake``);
    * ``method`` / ``params``: the continual merger (:func:`fedmerge.aggregators.continual.create_continual`);
    * ``batch_size``: experts merged per committed version (1 = a version per expert);
    * ``base``: the base version (id or alias) every expert is relative to (default: the store's root);
    * ``track``: the alias moved to each continual version (the merger state is resumed from it);
    * ``tokens``: bearer token → client id; empty and no mTLS = no authentication (``allow_insecure``
      must then be True, so an open server is a deliberate choice);
    * ``operators``: client ids (token clients or mTLS common names) with the operator role: they may
      read every submission through ``GetSubmission``; any other client reads only its own (others'
      answer ``NOT_FOUND``). Give a token the role with a third field ``operator`` in the token file,
      or name the client with ``--operator``;
    * ``limits``: per-client size limits and quotas; ``chunk_size``: bytes per streamed chunk;
    * ``stream_idle_timeout_s``: a ``SubmitExpert`` or ``Upload`` stream that delivers no message for
      this long is aborted with ``DEADLINE_EXCEEDED`` (a stalled client frees its handler thread);
    * ``catalog``: None keeps the catalog and the queue in SQLite files (one server); a
      ``postgresql://`` URL keeps the store's catalog, the queue and the track leases in that
      database, so several replicas share them (``data_dir`` must then be one shared directory;
      :mod:`fedmerge.service.replicas`); ``lease_ttl_s``: how long a replica's lease on the track
      lasts unrenewed (a dead holder's track is taken over after at most this long).
    """

    store: Path | str
    data_dir: Path | None = None
    listen: str = "127.0.0.1:50051"
    method: str = "opcm"
    params: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 1
    base: str | None = None
    track: str = "continual"
    tokens: dict[str, str] = field(default_factory=dict)
    operators: frozenset[str] = frozenset()
    tls: TlsConfig | None = None
    allow_insecure: bool = False
    limits: Limits = field(default_factory=Limits)
    chunk_size: int = 1 << 20
    max_workers: int = 16
    max_message_bytes: int = 8 << 20
    stream_idle_timeout_s: float = 30.0
    catalog: str | None = None
    lease_ttl_s: float = 15.0
    s3_endpoint: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.store, str) and not self.store.startswith("s3://"):
            object.__setattr__(self, "store", Path(self.store))
        if self.s3_endpoint is not None and not self.on_object_store:
            raise ServiceConfigError(
                f"s3_endpoint {self.s3_endpoint!r} is given but store {self.store} is a directory; "
                "pass an s3://bucket/prefix store or leave the endpoint out"
            )
        if self.catalog is not None and not str(self.catalog).startswith(("postgresql://", "postgres://")):
            raise ServiceConfigError(
                f"catalog must be a postgresql://user@host:port/database URL (or left out for SQLite), "
                f"got {self.catalog!r}"
            )
        ttl = self.lease_ttl_s
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0.5 <= ttl < math.inf:
            raise ServiceConfigError(f"lease_ttl_s must be a number of seconds ≥ 0.5, got {ttl!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ServiceConfigError(f"batch_size must be an integer ≥ 1, got {self.batch_size!r}")
        if not (4096 <= self.chunk_size <= 64 << 20):
            raise ServiceConfigError(f"chunk_size must be in [4 KiB, 64 MiB], got {self.chunk_size}")
        if self.max_message_bytes < self.chunk_size + 4096:
            raise ServiceConfigError(
                f"max_message_bytes ({self.max_message_bytes}) must exceed chunk_size ({self.chunk_size}) "
                "plus framing; raise it"
            )
        if self.max_workers < 2:
            raise ServiceConfigError(f"max_workers must be ≥ 2, got {self.max_workers}")
        if self.limits.max_concurrent_streams >= self.max_workers:
            raise ServiceConfigError(
                f"limits.max_concurrent_streams ({self.limits.max_concurrent_streams}) must be below "
                f"max_workers ({self.max_workers}), or one client can hold every handler thread; "
                "lower it or raise max_workers"
            )
        timeout = self.stream_idle_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < math.inf:
            raise ServiceConfigError(
                f"stream_idle_timeout_s must be a number of seconds > 0, got {timeout!r}"
            )
        if not re.fullmatch(r"[^:\s]+:\d{1,5}", self.listen):
            raise ServiceConfigError(f"listen must be HOST:PORT, got {self.listen!r}")
        for token, client in self.tokens.items():
            if len(token) < 16:
                raise ServiceConfigError(
                    f"token for client {client!r} is {len(token)} characters; "
                    "use at least 16 random characters"
                )
            if not _TOKEN_CLIENT.match(client):
                raise ServiceConfigError(
                    f"client id {client!r} must be 1–128 letters, digits or _.@- "
                    "starting with a letter or digit"
                )
        if isinstance(self.operators, str) or not all(isinstance(o, str) for o in self.operators):
            raise ServiceConfigError(
                f"operators must be a set of client ids, got {self.operators!r}; e.g. frozenset({{'ops'}})"
            )
        if any(not o.strip() for o in self.operators):
            raise ServiceConfigError("operators: a client id is empty; name the operator's client id")
        object.__setattr__(self, "operators", frozenset(self.operators))
        mtls = self.tls is not None and self.tls.client_ca is not None
        if not self.tokens and not mtls and not self.allow_insecure:
            raise ServiceConfigError(
                "no authentication configured: pass bearer tokens (--tokens FILE), mutual TLS "
                "(--tls-client-ca), or --allow-insecure to run an open server on purpose"
            )
        try:
            json.dumps(self.params, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ServiceConfigError(f"params must be JSON values: {exc}") from None

    @property
    def on_object_store(self) -> bool:
        """Whether ``store`` is an ``s3://bucket/prefix`` URL."""
        return isinstance(self.store, str)

    @property
    def intake_dir(self) -> Path:
        if self.data_dir is not None:
            return Path(self.data_dir)
        if isinstance(self.store, str):
            from fedmerge.store.s3_client import S3Location, default_cache_dir

            endpoint = self.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
            cache = default_cache_dir(S3Location.parse(self.store), endpoint)
            return cache.with_name(cache.name + ".intake")
        return Path(self.store).parent / "intake"

    @property
    def authenticated(self) -> bool:
        return bool(self.tokens) or (self.tls is not None and self.tls.client_ca is not None)


def load_tokens(path: Path) -> dict[str, str]:
    """Read a token file: one ``CLIENT_ID TOKEN [operator]`` line per client; ``#`` starts a comment.
    Returns token → client id (:func:`load_token_file` also returns the operators)."""
    return load_token_file(path)[0]


def load_token_file(path: Path) -> tuple[dict[str, str], frozenset[str]]:
    """Read a token file: one ``CLIENT_ID TOKEN`` line per client, optionally followed by the role
    ``operator`` (may read every client's submissions); ``#`` starts a comment. Returns (token →
    client id, operator client ids)."""
    tokens: dict[str, str] = {}
    operators: set[str] = set()
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ServiceConfigError(f"cannot read token file {path}: {exc}") from None
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.split()
        if len(parts) == 3 and parts[2] == "operator":
            operators.add(parts[0])
            parts = parts[:2]
        if len(parts) != 2:
            raise ServiceConfigError(
                f"{path}:{number}: expected 'CLIENT_ID TOKEN' or 'CLIENT_ID TOKEN operator', "
                f"got {len(parts)} fields"
            )
        client, token = parts
        if token in tokens:
            raise ServiceConfigError(
                f"{path}:{number}: token of {client!r} is already used by {tokens[token]!r}"
            )
        tokens[token] = client
    return tokens, frozenset(operators)
