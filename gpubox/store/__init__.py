"""Storage: one contract (base.Store), one module per backend."""

from __future__ import annotations

from gpubox import errors
from gpubox.store.base import Store


def open_store(url: str) -> Store:
    """The store a URL names: `sqlite:///path/to/file.db` or `postgresql://…`."""
    if url.startswith("sqlite://"):
        from gpubox.store import sqlite

        path = url.removeprefix("sqlite://")
        if not path or path == "/":
            raise errors.ConfigError(f"db: no file in {url!r} (want sqlite:///path/to/file.db)")
        return sqlite.SqliteStore(path)
    if url.startswith(("postgresql://", "postgres://")):
        raise errors.ConfigError("db: PostgreSQL is not supported yet; use sqlite:///…")
    raise errors.ConfigError(f"db: {url!r} is neither sqlite:///… nor postgresql://…")
