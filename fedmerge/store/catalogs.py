"""Which catalog a store uses: SQLite inside the store directory, or a PostgreSQL database
(:mod:`fedmerge.store.pg_catalog`). Above both catalog modules, so neither imports the other back."""

from __future__ import annotations

from pathlib import Path

from fedmerge.errors import ConfigError
from fedmerge.store.catalog import CATALOG_FILE, Catalog
from fedmerge.store.pg_catalog import PgCatalog, is_postgres_url


def open_catalog(root: Path, catalog: str | None, busy_timeout: float = 30.0) -> Catalog:
    """The catalog of the store at ``root``: ``catalog.sqlite`` inside it when ``catalog`` is None,
    else the PostgreSQL database ``catalog`` names (``postgresql://user@host:port/db``)."""
    if catalog is None or catalog == "":
        return Catalog(root / CATALOG_FILE, busy_timeout=busy_timeout)
    if not is_postgres_url(catalog):
        raise ConfigError(
            f"catalog {catalog!r} is not supported: leave it out (SQLite inside the store) or pass "
            "a postgresql://user@host:port/database URL"
        )
    return PgCatalog(catalog, busy_timeout=busy_timeout)
