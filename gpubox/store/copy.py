"""`gpubox db copy`: a whole store into another (SQLite → PostgreSQL, or back), keys kept."""

from __future__ import annotations

from collections.abc import Callable

from gpubox import errors
from gpubox.store.base import TABLES, Store


def check(source: Store, destination: Store, replace: bool = False) -> None:
    """Refuse a copy that would lose data or cannot work, before anything is written."""
    if source.identity() == destination.identity():
        # --replace would empty the one store there is, then copy its nothing back.
        raise errors.WrongState("the source and the destination are the same store")
    if source.schema_version() != destination.schema_version():
        raise errors.StoreError(
            f"schema versions differ (source {source.schema_version()}, destination"
            f" {destination.schema_version()}): run `gpubox db upgrade` on the older one first"
        )
    if not replace and any(destination.count(table) for table in TABLES):
        raise errors.WrongState(
            "the destination store is not empty; pass --replace to empty it first"
        )


def copy_store(
    source: Store,
    destination: Store,
    replace: bool = False,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, int]:
    """Copy every row of every table; rows per table. The destination must be empty unless
    `replace`, which empties it first; never the source itself. Ends with a count check of
    every table."""
    check(source, destination, replace)
    if replace:
        destination.clear()
    totals = {table: source.count(table) for table in TABLES}
    for table in TABLES:
        for rows in source.export_rows(table):
            destination.import_rows(table, rows)
            if progress is not None:
                progress(table, len(rows))
    destination.finish_import()
    copied = {table: destination.count(table) for table in TABLES}
    wrong = [f"{t}: {copied[t]} of {totals[t]}" for t in TABLES if copied[t] != totals[t]]
    if wrong:
        raise errors.StoreError("the copy is incomplete (" + "; ".join(wrong) + ")")
    return copied
