"""A record's fields declared once. Each field says where its record keeps it, how the store
holds it (a neutral column type that each backend maps to its own SQL type, NULL or not, a
default, the schema version that added it), how a value becomes a column value and back, and
where the HTTP API and the worker link show it. models.JOB_FIELDS describes a job this way:
the store's schema, insert and row reader, Job.to_dict and the job a worker receives are all
derived from it. Pure: no I/O."""

from __future__ import annotations

import dataclasses
import functools
import json
import operator
from collections.abc import Callable, Sequence
from typing import Any

Convert = Callable[[Any], Any]
# The neutral column types; each backend maps every one of them to its own SQL type.
COLUMN_TYPES = ("key", "text", "int", "bigint", "real")


@dataclasses.dataclass(frozen=True)
class Kind:
    """How one kind of value is held: its column type, and the functions that turn a value
    into a column value (`dump`), a column value back into a value (`load`), and a value into
    what the API and the worker link show (`show`). None: the value as it is."""

    column: str
    dump: Convert | None = None
    load: Convert | None = None
    show: Convert | None = None


# One encoder for all: json.dumps builds a new one per call when given separators.
_encode = json.JSONEncoder(separators=(",", ":")).encode
_EMPTY_TEXT: dict[type, str] = {dict: "{}", list: "[]"}
_EMPTY: dict[str, Any] = {"{}": dict, "[]": list}


def dump_json(value: Any) -> str | None:
    """A value as compact JSON text; None stays None."""
    if value is None:
        return None
    if not value and type(value) in _EMPTY_TEXT:
        return _EMPTY_TEXT[type(value)]
    return _encode(value)


def load_json(text: str | None) -> Any:
    """The inverse of dump_json."""
    if text is None:
        return None
    empty = _EMPTY.get(text)  # most maps and lists of a job are empty: no parse for those
    return empty() if empty is not None else json.loads(text)


def _copy(value: Any) -> Any:
    """A shallow copy of a map or a list, so that no caller changes a frozen record's."""
    return value.copy() if isinstance(value, dict | list) else value


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


KEY = Kind("key")  # the record's id, from the backend's own counter
TEXT = Kind("text")
INT = Kind("int")
BIGINT = Kind("bigint")  # a count or a sequence number that may pass 2**31
REAL = Kind("real", dump=_float, load=_float)
FLAG = Kind("int", dump=int, load=bool)  # a bool, stored as 0 or 1
JSON = Kind("text", dump=dump_json, load=load_json, show=_copy)  # a map or a list


@dataclasses.dataclass(frozen=True)
class Field:
    """One field of a record, and how each part of gpubox finds it."""

    name: str  # the name of its column (and of the field, where it has no column)
    kind: Kind
    # Where the record keeps it, as attribute names ("spec.name"); None: only the store has it.
    path: str | None = None
    null: bool = False  # whether its column takes NULL
    default: str | None = None  # its column's default, in SQL
    since: int = 1  # the schema version that added its column
    column: bool = True  # False: no column (a value the API or the wire works out)
    computed: bool = False  # its path is a property: the store writes it, never reads it back
    api: str | None = None  # its key in the API: "key", "group.key", or "group.*" to merge
    wire: str | None = None  # its key in the job a worker receives; None: a worker never sees it

    @functools.cached_property
    def get(self) -> Convert:
        """The function that reads this field from a record."""
        if self.path is None:
            return lambda record: None
        return operator.attrgetter(self.path)

    def shown(self, record: Any) -> Any:
        """This field of a record as the API and the worker link show it."""
        value = self.get(record)
        return value if self.kind.show is None else self.kind.show(value)


def stored(fields: Sequence[Field]) -> tuple[Field, ...]:
    """The fields that have a column."""
    return tuple(field for field in fields if field.column)


def build(name: str, expression: str, names: dict[str, Any]) -> Callable[[Any], Any]:
    """A function of one argument, `record`, that returns `expression`, written out once
    from a field table (as dataclasses writes __init__): every job listed or read goes
    through these, and a loop over the table per job cost a third more than the code written
    by hand. `names` are the functions the expression calls. Its text is kept as `.source`,
    to read what the table made."""
    source = f"def {name}(record):\n    return {expression}\n"
    scope = dict(names)
    exec(compile(source, f"<gpubox.fields: {name}>", "exec"), scope)  # noqa: S102
    function: Callable[[Any], Any] = scope[name]
    function.source = source  # type: ignore[attr-defined]
    return function


def _value(field: Field, names: dict[str, Any], shown: bool = True) -> str:
    """The expression that reads a field from `record` (shown as the API shows it)."""
    if field.path is None:
        return "None"
    read = f"record.{field.path}"
    if not shown or field.kind.show is None:
        return read
    show = f"show_{len(names)}"
    names[show] = field.kind.show
    return f"{show}({read})"


def api_builder(fields: Sequence[Field]) -> Callable[[Any], dict[str, Any]]:
    """The function that shows a record as the API does: the fields with an `api` key, in
    the order of `fields`; "group.key" puts a field in an object under "group" (which sits
    where its first field is), and "group.*" merges a field's own keys into it."""
    names: dict[str, Any] = {}
    top: dict[str, Any] = {}  # key → expression, or (for a group) its own dict of them
    for field in fields:
        if field.api is None:
            continue
        group, _, key = field.api.rpartition(".")
        where = top.setdefault(group, {}) if group else top
        where[f"*{len(names)}" if key == "*" else key] = _value(field, names)

    def literal(items: dict[str, Any]) -> str:
        parts = []
        for key, value in items.items():
            if isinstance(value, dict):
                parts.append(f"{key!r}: {literal(value)}")
            elif key.startswith("*"):
                parts.append(f"**{value}")
            else:
                parts.append(f"{key!r}: {value}")
        return "{" + ", ".join(parts) + "}"

    return build("api_dict", literal(top), names)


def wire_dict(fields: Sequence[Field], record: Any) -> dict[str, Any]:
    """The fields of a record that a worker receives, by their wire keys."""
    return {field.wire: field.shown(record) for field in fields if field.wire is not None}
