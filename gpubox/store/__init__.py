"""Storage: one contract (base.Store), one module per backend."""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

from gpubox import errors
from gpubox.store.base import Store as Store


def redacted(url: str) -> str:
    """A store URL as an error message may show it: a password in it (user:PASSWORD@, or
    password=… among its parameters) replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(a malformed URL)"
    if parts.password is not None:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        url = parts._replace(netloc=netloc).geturl()
    return re.sub(r"(?i)(password=)[^&]*", r"\1***", url)


def _sqlite_path(url: str) -> str:
    path = url.removeprefix("sqlite://")
    if not path or path == "/":
        raise errors.ConfigError(
            f"db: no file in {redacted(url)!r} (want sqlite:///path/to/file.db)"
        )
    return path


def missing_file(url: str) -> str | None:
    """For a SQLite URL whose file does not exist, that file's path; else None."""
    if not url.startswith("sqlite://") or os.path.exists(path := _sqlite_path(url)):
        return None
    return "/" + path.lstrip("/") if path.startswith("/") else path  # sqlite:////x: /x


def open_existing(url: str) -> Store:
    """A store to read as it is: never created (a mistyped SQLite path is an error, not a
    new empty file), never upgraded."""
    if missing := missing_file(url):
        raise errors.ConfigError(f"db: no SQLite store at {missing}")
    store = open_store(url, upgrade=False)
    if not store.schema_version():
        store.close()
        raise errors.StoreError(f"{redacted(url)} holds no gpubox store (it has no schema)")
    return store


def open_store(url: str, upgrade: bool = True, idle_transaction_s: float = 0.0) -> Store:
    """The store a URL names: `sqlite:///path/to/file.db` or `postgresql://…`. With `upgrade`
    its schema is created or brought up to date; a newer schema than ours is refused.
    `idle_transaction_s` (PostgreSQL, 0: none): the server ends a session of this store
    whose transaction stays idle that long (see store.leases: a frozen leader's)."""
    if url.startswith("sqlite://"):
        from gpubox.store import sqlite

        return sqlite.SqliteStore(_sqlite_path(url), upgrade)
    if url.startswith(("postgresql://", "postgres://")):
        from gpubox.store import postgres

        return postgres.PostgresStore(url, upgrade, idle_transaction_s=idle_transaction_s)
    raise errors.ConfigError(f"db: {redacted(url)!r} is neither sqlite:///… nor postgresql://…")
