"""The catalog in PostgreSQL (``--catalog postgresql://…``), shared by several servers on one store.

Same tables, same rows and the same promises as the SQLite :class:`~fedmerge.store.catalog.Catalog`
(it subclasses it and runs its SQL): a version is visible exactly when its transaction commits, and
that transaction inserts the row, its parents, contributors, blob references and alias moves
together, so aliases move atomically and readers see all of a version or none of it.

Writers are serialised the way SQLite's ``BEGIN IMMEDIATE`` serialises them: :meth:`PgCatalog.write`
opens a transaction and takes the transaction-scoped advisory lock :data:`WRITE_LOCK`, so sequence
numbers (version ids) are allocated and manifests written by one writer at a time, whichever server
it runs in. A writer that cannot get the lock within ``busy_timeout`` seconds gets
:class:`~fedmerge.store.StoreBusyError` (``lock_timeout``; nothing written).

A lost connection (the database restarted, the network dropped) is :class:`CatalogUnavailableError`,
a retryable :class:`~fedmerge.store.StoreBusyError`: reads reconnect and retry with back-off for up
to ``busy_timeout`` seconds; a write is never retried here, because a connection lost at ``COMMIT``
leaves unknown whether it committed — the caller re-reads and decides (the intake's merge worker
re-reads the track's head and reconciles, so nothing is merged twice).

**Fencing.** :meth:`PgCatalog.set_fence` makes every later write of this catalog check, inside its
transaction and under a share lock on the row, that the lease ``(track, holder, token)`` of
:mod:`fedmerge.service.replicas` is still held and unexpired by the database's clock (``now()``); a
writer whose lease expired or was taken over gets :class:`LeaseLostError` and commits nothing. The
row lock keeps a takeover waiting until the fenced commit has ended.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

from fedmerge.errors import ConfigError
from fedmerge.store.catalog import SCHEMA, Catalog
from fedmerge.store.errors import StoreBusyError

WRITE_LOCK = 0x66656D6572676501
"""Advisory lock key (``pg_advisory_xact_lock``) held by every catalog write transaction."""

SCHEMA_LOCK = 0x66656D6572676500
"""Advisory lock key held while creating tables (servers starting together would race)."""


def pg_schema(sqlite_schema: str) -> str:
    """A SQLite schema of this project in PostgreSQL's dialect: the one place the two differ (the
    autoincrementing ``seq`` key and 64-bit sizes), so each table is declared once, for SQLite."""
    serial = sqlite_schema.replace("seq INTEGER PRIMARY KEY AUTOINCREMENT", "seq BIGSERIAL PRIMARY KEY")
    return serial.replace("size INTEGER", "size BIGINT")


PG_SCHEMA = pg_schema(SCHEMA)

LEASE_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    track TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    token BIGINT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
)
"""

URL_SCHEMES = ("postgresql://", "postgres://")


class CatalogUnavailableError(StoreBusyError):
    """The PostgreSQL server could not be reached or dropped the connection; retry (with back-off)."""


class LeaseLostError(StoreBusyError):
    """A fenced write found its lease expired or taken over by another server: nothing was written."""


def is_postgres_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith(URL_SCHEMES)


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:  # pragma: no cover - depends on the install
        raise ConfigError("a postgresql:// catalog needs psycopg: pip install 'fedmerge[postgres]'") from None
    return psycopg


def redact(url: str) -> str:
    """``url`` without its password (for messages)."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


_PLACEHOLDER = re.compile(r"\?")


class PgConnection:
    """One psycopg connection with sqlite3's calling convention (``?`` placeholders, ``execute``
    returning a cursor), reconnecting after the server went away. Thread-safe (one lock)."""

    def __init__(self, url: str, *, busy_timeout: float = 30.0, connect_timeout: float = 10.0) -> None:
        self.url = url
        self.busy_timeout = busy_timeout
        self.connect_timeout = connect_timeout
        self.psycopg = _psycopg()
        self.lock = threading.RLock()
        self._conn: Any = None
        self._in_transaction = False
        self._connect()

    def _connect(self) -> Any:
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        try:
            self._conn = self.psycopg.connect(
                self.url, autocommit=True, connect_timeout=max(1, int(self.connect_timeout))
            )
        except self.psycopg.OperationalError as exc:
            self._conn = None
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CatalogUnavailableError(
                f"cannot reach the PostgreSQL catalog {redact(self.url)}: {first}; retry when it is up"
            ) from None
        return self._conn

    def _lost(self, exc: BaseException) -> CatalogUnavailableError:
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(Exception):
                conn.close()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return CatalogUnavailableError(
            f"lost the PostgreSQL catalog {redact(self.url)} ({first}); nothing was acknowledged — retry"
        )

    def _is_connection_error(self, exc: BaseException) -> bool:
        pg = self.psycopg
        if isinstance(exc, pg.OperationalError | pg.InterfaceError):
            return True
        return isinstance(exc, pg.errors.AdminShutdown | pg.errors.CrashShutdown | pg.errors.CannotConnectNow)

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        """Run one statement; outside a transaction a lost connection is retried with back-off."""
        query = _PLACEHOLDER.sub("%s", sql)
        with self.lock:
            deadline = time.monotonic() + self.busy_timeout
            pause = 0.05
            while True:
                try:
                    return self._connect().execute(query, tuple(args) or None)
                except CatalogUnavailableError:
                    if self._in_transaction or time.monotonic() + pause > deadline:
                        raise
                except Exception as exc:
                    if not self._is_connection_error(exc):
                        raise
                    lost = self._lost(exc)
                    if self._in_transaction or time.monotonic() + pause > deadline:
                        raise lost from None
                time.sleep(pause)
                pause = min(2 * pause, 2.0)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        query = _PLACEHOLDER.sub("%s", sql)
        with self.lock:
            try:
                with self._connect().cursor() as cur:
                    cur.executemany(query, [tuple(r) for r in rows])
            except Exception as exc:
                if self._is_connection_error(exc):
                    raise self._lost(exc) from None
                raise

    @contextmanager
    def transaction(
        self, *, lock_key: int | None = None, lock_timeout: float | None = None
    ) -> Iterator[None]:
        """``BEGIN`` … ``COMMIT`` (rolled back if the body raises), optionally under an advisory lock
        taken within ``lock_timeout`` seconds (else :class:`StoreBusyError`)."""
        pg = self.psycopg
        with self.lock:
            self.execute("BEGIN")  # reconnects first if needed
            self._in_transaction = True
            try:
                if lock_key is not None:
                    ms = int(1000 * (lock_timeout if lock_timeout is not None else self.busy_timeout))
                    self.execute(f"SET LOCAL lock_timeout = {max(1, ms)}")
                    try:
                        self.execute("SELECT pg_advisory_xact_lock(?)", (lock_key,))
                    except pg.errors.LockNotAvailable:
                        raise StoreBusyError(
                            f"another server held the catalog {redact(self.url)} for more than "
                            f"{ms / 1000:.0f} s; nothing was written — retry, or raise busy_timeout"
                        ) from None
                    self.execute("SET LOCAL lock_timeout = 0")
                yield
            except BaseException:
                self._rollback()
                raise
            try:
                self._connect().execute("COMMIT")
            except Exception as exc:
                if self._is_connection_error(exc):
                    raise self._lost(exc) from None
                self._rollback()
                raise
            finally:
                self._in_transaction = False

    def _rollback(self) -> None:
        self._in_transaction = False
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            self._conn = None
            return
        try:
            conn.execute("ROLLBACK")
        except Exception:
            self._lost(RuntimeError("rollback failed"))

    def close(self) -> None:
        with self.lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class PgCatalog(Catalog):
    """The catalog in a PostgreSQL database (see the module docstring)."""

    def __init__(self, url: str, busy_timeout: float = 30.0) -> None:
        if not is_postgres_url(url):
            raise ConfigError(f"catalog {url!r} is not a postgresql:// URL")
        self.url = url
        self.path = redact(url)  # type: ignore[assignment]  # what messages name
        self.busy_timeout = busy_timeout
        self._pg = PgConnection(url, busy_timeout=busy_timeout)
        self._conn = self._pg  # type: ignore[assignment]  # Catalog's reads run on it unchanged
        self._fence: tuple[str, str, int] | None = None
        with self._pg.transaction(lock_key=SCHEMA_LOCK):
            for statement in [*PG_SCHEMA.split(";"), LEASE_SCHEMA]:
                if statement.strip():
                    self._pg.execute(statement)

    def close(self) -> None:
        self._pg.close()

    def set_fence(self, track: str, holder: str, token: int) -> None:
        """From now on every write checks that ``holder`` still holds lease ``token`` on ``track``."""
        self._fence = (track, holder, int(token))

    def clear_fence(self) -> None:
        self._fence = None

    def check_fence(self) -> None:
        """Inside a write: refuse (:class:`LeaseLostError`) unless the fence's lease is held and
        unexpired by the database's clock; lock the lease row until the transaction ends."""
        if self._fence is None:
            return
        track, holder, token = self._fence
        found = self._pg.execute(
            "SELECT 1 FROM leases WHERE track = ? AND holder = ? AND token = ? AND expires_at > now() "
            "FOR SHARE",
            (track, holder, token),
        ).fetchone()
        if found is None:
            raise LeaseLostError(
                f"the lease on track {track!r} (token {token}) expired or was taken over by another "
                "server before this commit; nothing was committed — the new holder merges the queue"
            )

    @contextmanager
    def write(self) -> Iterator[Any]:
        """One write transaction under :data:`WRITE_LOCK` (and the fence, if set)."""
        with self._pg.transaction(lock_key=WRITE_LOCK, lock_timeout=self.busy_timeout):
            self.check_fence()
            yield self._pg

    @contextmanager
    def read(self) -> Iterator[Any]:
        """A consistent snapshot for several reads (``REPEATABLE READ``, read only)."""
        with self._pg.transaction():
            self._pg.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            yield self._pg
