"""The store's schema in SQL: versions and their upgrade, the check that the jobs table has
every column of models.JOB_FIELDS, and the bulk copy of rows behind `gpubox db copy`."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

from gpubox import errors, fields, models
from gpubox.store import backend, base, columns

log = logging.getLogger(__name__)

SHAPE_VERSION = 3  # the schema version that added jobs.shape


class SchemaStore(backend.Backend):
    """The store's schema and bulk copy."""

    @property
    def latest_version(self) -> int:
        return len(self.MIGRATIONS)

    def _prepare(self, upgrade: bool) -> None:
        """At open: bring the schema up to date, or only refuse one newer than ours; then
        check that a schema of our version has every column of the jobs table."""
        if upgrade:
            applied = self.upgrade()
            if applied:
                log.info("store schema upgraded to version %d", applied[-1])
        version = self.schema_version()
        if version > self.latest_version:
            raise errors.StoreError(
                f"the store has schema version {version}, newer than this gpubox knows"
                f" ({self.latest_version}): upgrade gpubox"
            )
        if version == self.latest_version:
            self._check_columns(version)

    def _check_columns(self, version: int) -> None:
        """Refuse a jobs table that lacks a column of models.JOB_FIELDS: a field given a
        schema version (`since`) that the database had already reached never got its column,
        and would fail every insert."""
        with self._read() as cur:
            cur.execute("SELECT * FROM jobs LIMIT 0")
            lacking = columns.missing(column[0] for column in cur.description)
        if lacking:
            raise errors.StoreError(
                f"the jobs table lacks the column(s) {', '.join(lacking)} of schema version"
                f" {version}: a field added to models.JOB_FIELDS needs a new schema version"
                " as its `since`"
            )

    def schema_version(self) -> int:
        with self._read() as cur:
            return self._current_version(cur)

    def upgrade(self) -> list[int]:
        applied = []
        with self._write() as cur:
            version = self._current_version(cur)
            if version > self.latest_version:
                raise errors.StoreError(
                    f"the store has schema version {version}, newer than this gpubox knows"
                    f" ({self.latest_version}): upgrade gpubox"
                )
            for number in range(version + 1, self.latest_version + 1):
                self._apply(cur, self.MIGRATIONS[number - 1])
                if number == SHAPE_VERSION:
                    _fill_shapes(cur)
                applied.append(number)
            if applied:
                cur.execute("DELETE FROM schema_version")
                cur.execute("INSERT INTO schema_version (version) VALUES (?)", (applied[-1],))
        return applied

    def count(self, table: str) -> int:
        _check_table(table)
        with self._read() as cur:
            cur.execute(f"SELECT COUNT(*) AS n FROM {table}")
            return int(cur.fetchone()["n"])

    def export_rows(self, table: str, batch: int = 5000) -> Iterator[list[dict[str, Any]]]:
        _check_table(table)
        keys = base.TABLES[table]
        order = ", ".join(keys)
        last: tuple[Any, ...] | None = None
        while True:
            with self._read() as cur:
                if last is None:
                    cur.execute(f"SELECT * FROM {table} ORDER BY {order} LIMIT ?", (batch,))
                else:
                    marks = ", ".join("?" * len(keys))
                    cur.execute(
                        f"SELECT * FROM {table} WHERE ({order}) > ({marks})"
                        f" ORDER BY {order} LIMIT ?",
                        (*last, batch),
                    )
                rows = cur.fetchall()
            if not rows:
                return
            yield rows
            last = tuple(rows[-1][key] for key in keys)

    def import_rows(self, table: str, rows: Sequence[dict[str, Any]]) -> None:
        _check_table(table)
        if not rows:
            return
        names = list(rows[0])
        sql = f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
        with self._write() as cur:
            cur.executemany(sql, [tuple(row[name] for name in names) for row in rows])

    def clear(self) -> None:
        with self._write() as cur:
            for table in base.TABLES:
                cur.execute(f"DELETE FROM {table}")


def _fill_shapes(cur: Any) -> None:
    """Write the shape of every job that may still run (schema version 3 added the column).
    Reads only the columns that version 3 has, so that later versions can still use it."""
    cur.execute(
        "SELECT id, command, gpus, labels, gpu_model, gpu_memory_gb, container FROM jobs"
        " WHERE status IN ('QUEUED', 'RUNNING')"
    )
    shapes = []
    for row in cur.fetchall():
        spec = models.JobSpec(
            name="",
            image="",
            command=fields.load_json(row["command"]),
            gpus=row["gpus"],
            labels=fields.load_json(row["labels"]),
            gpu_model=row["gpu_model"],
            gpu_memory_gb=row["gpu_memory_gb"],
            container=models.ContainerOptions.from_dict(fields.load_json(row["container"])),
        )
        shapes.append((spec.needs.shape, row["id"]))
    if shapes:
        cur.executemany("UPDATE jobs SET shape = ? WHERE id = ?", shapes)


def _check_table(table: str) -> None:
    if table not in base.TABLES:
        raise errors.StoreError(f"no table {table!r}")
