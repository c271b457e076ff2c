"""Storage: one contract (base.Store), one module per backend."""

from __future__ import annotations

from gpubox import errors
from gpubox.store.base import Store


def open_store(url: str, upgrade: bool = True) -> Store:
    """The store a URL names: `sqlite:///path/to/file.db` or `postgresql://…`. With `upgrade`
    its schema is created or brought up to date; a newer schema than ours is refused."""
    if url.startswith("sqlite://"):
        from gpubox.store import sqlite

        path = url.removeprefix("sqlite://")
        if not path or path == "/":
            raise errors.ConfigError(f"db: no file in {url!r} (want sqlite:///path/to/file.db)")
        return sqlite.SqliteStore(path, upgrade)
    if url.startswith(("postgresql://", "postgres://")):
        from gpubox.store import postgres

        return postgres.PostgresStore(url, upgrade)
    raise errors.ConfigError(f"db: {url!r} is neither sqlite:///… nor postgresql://…")
