"""The jobs table as models.JOB_FIELDS describes it: each schema version's DDL in a backend's
types, the row a new job is inserted as, and the job a row is read back as. Nothing here
names a job's column: a field added to JOB_FIELDS reaches all of it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from gpubox import fields, models

# The fields with a column, in the order of JOB_FIELDS.
COLUMNS = fields.stored(models.JOB_FIELDS)
NAMES = frozenset(field.name for field in COLUMNS)
LATEST = max(field.since for field in COLUMNS)  # the last schema version that added a column

# What a new job's insert writes: every column but the id (the backend's counter) and those
# the record does not hold (they take their defaults).
_INSERTED = tuple(field for field in COLUMNS if field.kind is not fields.KEY and field.path)
# What the row reader reads back, and into which record: (attribute, column, load).
_READ = [
    (field.path, field.name, field.kind.load)
    for field in COLUMNS
    if field.path is not None and not field.computed
]
_SPEC_READ = [(path.removeprefix("spec."), n, f) for path, n, f in _READ if path[:5] == "spec."]
_JOB_READ = [(path, name, load) for path, name, load in _READ if "." not in path]
# The spec's fields that a REAL column holds: a float once stored, whatever was given.
_REALS = [attr for attr, _, load in _SPEC_READ if load is fields.REAL.load]


def column_ddl(field: fields.Field, types: Mapping[str, str]) -> str:
    """One column as a CREATE TABLE or an ALTER TABLE writes it, in a backend's `types`
    (fields.COLUMN_TYPES → SQL type)."""
    ddl = f"{field.name} {types[field.kind.column]}"
    if not field.null and field.kind is not fields.KEY:  # a key is NOT NULL by its own type
        ddl += " NOT NULL"
    if field.default is not None:
        ddl += f" DEFAULT {field.default}"
    return ddl


def jobs_ddl(version: int, types: Mapping[str, str]) -> str:
    """What schema `version` does to the jobs table: version 1 creates it with the columns
    of version 1; each later version adds its own."""
    added = [column_ddl(field, types) for field in COLUMNS if field.since == version]
    if version == 1:
        return "CREATE TABLE jobs (\n    " + ",\n    ".join(added) + "\n);\n"
    return "".join(f"ALTER TABLE jobs ADD COLUMN {ddl};\n" for ddl in added)


def migrations(types: Mapping[str, str], others: Sequence[str]) -> tuple[str, ...]:
    """A backend's migration scripts, one per schema version: what JOB_FIELDS says that
    version does to the jobs table, then `others[version - 1]`, the backend's own DDL of that
    version for everything else (other tables, indexes, updates of rows). A version that
    only adds columns needs nothing in `others`. Statements end with ";" at a line's end."""
    count = max(LATEST, len(others))
    return tuple(
        jobs_ddl(version, types) + (others[version - 1] if version <= len(others) else "")
        for version in range(1, count + 1)
    )


def missing(present: Iterable[str]) -> list[str]:
    """The columns of JOB_FIELDS that a jobs table with the columns `present` lacks."""
    return sorted(NAMES - set(present))


def insert_row(job: models.Job) -> dict[str, Any]:
    """The row a new job is inserted as: column name → value, without the id."""
    return {
        field.name: field.get(job) if field.kind.dump is None else field.kind.dump(field.get(job))
        for field in _INSERTED
    }


def as_stored(spec: models.JobSpec) -> models.JobSpec:
    """The spec as get_job reads it back once stored, worked out without reading it: auth and
    secrets are never stored (only sealed), and REAL columns give floats."""
    reals: dict[str, Any] = {
        name: float(value) for name in _REALS if (value := getattr(spec, name)) is not None
    }
    return dataclasses.replace(spec, auth=None, secrets={}, **reals)


def _reader() -> Callable[[Any], Any]:
    """job_from_row, written out once from JOB_FIELDS (see fields.build)."""
    names: dict[str, Any] = {"Job": models.Job, "JobSpec": models.JobSpec}

    def argument(attr: str, column: str, load: Callable[[Any], Any] | None) -> str:
        read = f"record[{column!r}]"
        if load is None:
            return f"{attr}={read}"
        names[f"load_{len(names)}"] = load
        return f"{attr}=load_{len(names) - 1}({read})"

    spec = ", ".join(argument(*item) for item in _SPEC_READ)
    job = ", ".join(argument(*item) for item in _JOB_READ)
    return fields.build("job_from_row", f"Job(spec=JobSpec({spec}), {job})", names)


# A Job from a `jobs` row (a mapping of column name to value).
job_from_row: Callable[[Mapping[str, Any]], models.Job] = _reader()


def new_job(spec: models.JobSpec, now: datetime) -> models.Job:
    """A job as create_job stores it, before it has an id (0 until the insert gives one)."""
    return models.Job(0, as_stored(spec), models.Status.QUEUED, created_at=now, updated_at=now)


def jobs_by_id(cur: Any, ids: list[int], known: Mapping[int, models.Job]) -> list[models.Job]:
    """The jobs with these ids in this order, read with `cur` but for those in `known` (a job
    gone meanwhile is left out)."""
    found = {job_id: known[job_id] for job_id in ids if job_id in known}
    missing = [job_id for job_id in ids if job_id not in found]
    for start in range(0, len(missing), 500):  # within any backend's parameter limit
        chunk = missing[start : start + 500]
        cur.execute(f"SELECT * FROM jobs WHERE id IN ({', '.join('?' * len(chunk))})", chunk)
        found.update((row["id"], job_from_row(row)) for row in cur.fetchall())
    return [found[job_id] for job_id in ids if job_id in found]
