"""The catalog: which versions are committed, their parents, contributors, blobs and aliases.

SQLite in WAL mode through the standard library, ``synchronous=FULL`` so a committed transaction
survives a crash or power loss. A version is *visible* exactly when its row is in ``versions``;
the row, its parents, contributors, blob references and alias moves are inserted in one
``BEGIN IMMEDIATE`` transaction, so readers see all of a version or none of it. ``BEGIN
IMMEDIATE`` takes the single writer lock up front; a writer that cannot get it within
``busy_timeout`` seconds gets :class:`StoreBusyError` (retryable, nothing written). WAL readers
never block and never see an uncommitted row.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmerge.store.errors import StoreBusyError

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    content_hash TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    kind TEXT NOT NULL,
    method TEXT NOT NULL,
    round INTEGER,
    base_version TEXT,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS parents (
    child TEXT NOT NULL REFERENCES versions(id),
    position INTEGER NOT NULL,
    parent TEXT NOT NULL REFERENCES versions(id),
    PRIMARY KEY (child, position)
);
CREATE TABLE IF NOT EXISTS contributors (
    version TEXT NOT NULL REFERENCES versions(id),
    client_id TEXT NOT NULL,
    num_examples INTEGER NOT NULL,
    submission_hash TEXT NOT NULL,
    accepted INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS contributors_by_client ON contributors(client_id);
CREATE TABLE IF NOT EXISTS blob_refs (
    version TEXT NOT NULL REFERENCES versions(id),
    blob TEXT NOT NULL,
    PRIMARY KEY (version, blob)
);
CREATE INDEX IF NOT EXISTS blob_refs_by_blob ON blob_refs(blob);
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT PRIMARY KEY,
    version TEXT NOT NULL REFERENCES versions(id),
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS alias_moves (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    previous TEXT,
    action TEXT NOT NULL,
    undone INTEGER NOT NULL DEFAULT 0,
    at TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class VersionRow:
    seq: int
    id: str
    content_hash: str
    manifest_sha256: str
    kind: str
    method: str
    round: int | None
    base_version: str | None
    created_at: str


@dataclass(frozen=True)
class AliasMove:
    seq: int
    name: str
    version: str
    previous: str | None
    action: str  # "set" | "rollback"
    undone: bool
    at: str


_ROW_COLUMNS = "seq, id, content_hash, manifest_sha256, kind, method, round, base_version, created_at"


def _move(row: tuple[Any, ...]) -> AliasMove:
    seq, name, version, previous, action, undone, at = row
    return AliasMove(int(seq), str(name), str(version), previous, str(action), bool(undone), str(at))


def _is_locked(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class Catalog:
    """A connection to ``catalog.sqlite``; one per :class:`~fedmerge.store.model_store.ModelStore`."""

    url: str | None = None
    """Where a shared catalog lives (``postgresql://…``); None for this SQLite file in the store."""

    def __init__(self, path: Path, busy_timeout: float = 30.0) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as exc:
            if _is_locked(exc):
                raise StoreBusyError(f"catalog {path} is locked while opening; retry") from None
            raise
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        with self.write():
            self._create_schema()

    def _create_schema(self) -> None:
        for statement in SCHEMA.split(";"):
            if statement.strip():
                self._conn.execute(statement)

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE`` … ``COMMIT``); rolled back if the body raises."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _is_locked(exc):
                raise StoreBusyError(
                    f"another process held the catalog {self.path} for more than {self.busy_timeout:.0f} s; "
                    "nothing was written — retry, or raise busy_timeout"
                ) from None
            raise
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        try:
            self._conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            self._conn.execute("ROLLBACK")
            if _is_locked(exc):
                raise StoreBusyError(
                    f"catalog {self.path} stayed busy at commit; nothing was written, retry"
                ) from None
            raise

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for several reads (a deferred transaction)."""
        self._conn.execute("BEGIN")
        try:
            yield self._conn
        finally:
            self._conn.execute("COMMIT")

    # -- writes (inside ``write()``) -------------------------------------------------------------

    @staticmethod
    def next_sequence(conn: sqlite3.Connection) -> int:
        (seq,) = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM versions").fetchone()
        return int(seq)

    @staticmethod
    def insert_version(
        conn: sqlite3.Connection,
        row: VersionRow,
        parents: list[str],
        contributors: list[tuple[str, int, str, bool]],
        blobs: set[str],
    ) -> None:
        conn.execute(
            f"INSERT INTO versions ({_ROW_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.seq,
                row.id,
                row.content_hash,
                row.manifest_sha256,
                row.kind,
                row.method,
                row.round,
                row.base_version,
                row.created_at,
            ),
        )
        conn.executemany(
            "INSERT INTO parents (child, position, parent) VALUES (?, ?, ?)",
            [(row.id, i, p) for i, p in enumerate(parents)],
        )
        conn.executemany(
            "INSERT INTO contributors (version, client_id, num_examples, submission_hash, accepted) "
            "VALUES (?, ?, ?, ?, ?)",
            [(row.id, c, n, h, int(a)) for c, n, h, a in contributors],
        )
        conn.executemany(
            "INSERT INTO blob_refs (version, blob) VALUES (?, ?)", [(row.id, b) for b in sorted(blobs)]
        )

    @staticmethod
    def move_alias(conn: sqlite3.Connection, name: str, version: str, action: str, at: str) -> str | None:
        """Point ``name`` at ``version``, record the move; return the previous target."""
        found = conn.execute("SELECT version FROM aliases WHERE name = ?", (name,)).fetchone()
        previous = found[0] if found else None
        conn.execute(
            "INSERT INTO aliases (name, version, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at",
            (name, version, at),
        )
        conn.execute(
            "INSERT INTO alias_moves (name, version, previous, action, at) VALUES (?, ?, ?, ?, ?)",
            (name, version, previous, action, at),
        )
        return str(previous) if previous is not None else None

    @staticmethod
    def last_undoable_move(conn: sqlite3.Connection, name: str) -> AliasMove | None:
        found = conn.execute(
            "SELECT seq, name, version, previous, action, undone, at FROM alias_moves "
            "WHERE name = ? AND action = 'set' AND undone = 0 ORDER BY seq DESC LIMIT 1",
            (name,),
        ).fetchone()
        return _move(found) if found else None

    @staticmethod
    def mark_undone(conn: sqlite3.Connection, move_seq: int) -> None:
        conn.execute("UPDATE alias_moves SET undone = 1 WHERE seq = ?", (move_seq,))

    # -- reads -----------------------------------------------------------------------------------

    def row(self, vid: str) -> VersionRow | None:
        found = self._conn.execute(f"SELECT {_ROW_COLUMNS} FROM versions WHERE id = ?", (vid,)).fetchone()
        return VersionRow(*found) if found else None

    def rows(self) -> list[VersionRow]:
        """Every committed version, oldest first."""
        return [
            VersionRow(*r) for r in self._conn.execute(f"SELECT {_ROW_COLUMNS} FROM versions ORDER BY seq")
        ]

    def alias(self, name: str) -> str | None:
        found = self._conn.execute("SELECT version FROM aliases WHERE name = ?", (name,)).fetchone()
        return str(found[0]) if found else None

    def aliases(self) -> dict[str, str]:
        return {n: v for n, v in self._conn.execute("SELECT name, version FROM aliases ORDER BY name")}

    def alias_moves(self, name: str | None = None) -> list[AliasMove]:
        sql = "SELECT seq, name, version, previous, action, undone, at FROM alias_moves"
        args: tuple[str, ...] = ()
        if name is not None:
            sql += " WHERE name = ?"
            args = (name,)
        return [_move(r) for r in self._conn.execute(sql + " ORDER BY seq", args)]

    def query_ids(
        self,
        *,
        round: int | None = None,
        contributor: str | None = None,
        method: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
    ) -> list[str]:
        """Ids matching every given filter, newest first. ``contributor`` matches accepted clients."""
        where: list[str] = []
        args: list[object] = []
        if round is not None:
            where.append("v.round = ?")
            args.append(round)
        if method is not None:
            where.append("v.method = ?")
            args.append(method)
        if kind is not None:
            where.append("v.kind = ?")
            args.append(kind)
        if contributor is not None:
            where.append(
                "EXISTS (SELECT 1 FROM contributors c "
                "WHERE c.version = v.id AND c.client_id = ? AND c.accepted = 1)"
            )
            args.append(contributor)
        sql = "SELECT v.id FROM versions v"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY v.seq DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        return [r[0] for r in self._conn.execute(sql, args)]

    def referenced_blobs(self) -> set[str]:
        return {r[0] for r in self._conn.execute("SELECT DISTINCT blob FROM blob_refs")}


CATALOG_FILE = "catalog.sqlite"
