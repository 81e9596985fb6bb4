"""Which catalog a store uses: SQLite inside the store directory, or a PostgreSQL database
(:mod:`fedmerge.store.pg_catalog`). Above both catalog modules, so neither imports the other back."""

from __future__ import annotations

import os
from pathlib import Path

from fedmerge.errors import ConfigError
from fedmerge.store.catalog import CATALOG_FILE, Catalog
from fedmerge.store.pg_catalog import PgCatalog, is_postgres_url, redact


def open_catalog(root: Path, catalog: str | None, busy_timeout: float = 30.0) -> Catalog:
    """The catalog of the store at ``root``: ``catalog.sqlite`` inside it when ``catalog`` is None,
    else the PostgreSQL database ``catalog`` names (``postgresql://user@host:port/db``)."""
    marker = root / SHARED_MARKER
    if catalog is None or catalog == "":
        if marker.is_file():  # opening it on SQLite would start a second, diverging history
            raise ConfigError(
                f"the catalog of store {root} is in PostgreSQL ({marker.read_text().strip()}); pass "
                "its URL (--catalog / catalog=)"
            )
        return Catalog(root / CATALOG_FILE, busy_timeout=busy_timeout)
    if not is_postgres_url(catalog):
        raise ConfigError(
            f"catalog {catalog!r} is not supported: leave it out (SQLite inside the store) or pass "
            "a postgresql://user@host:port/database URL"
        )
    opened = PgCatalog(catalog, busy_timeout=busy_timeout)
    if root.is_dir() and not marker.is_file():
        tmp = root / f".{SHARED_MARKER}.{os.getpid()}.tmp"
        tmp.write_text(redact(catalog) + "\n")
        os.replace(tmp, marker)
    return opened


SHARED_MARKER = "catalog.postgresql"
"""In a store directory whose catalog is in PostgreSQL: the (password-free) URL; opening the store
without a catalog URL is then refused instead of starting an empty SQLite catalog beside it."""
