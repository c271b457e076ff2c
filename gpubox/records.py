"""How a record travels as a msgpack map: its fields, each with the check its value gets on
arrival, and the checks themselves. gpubox.protocol declares its messages with these; this
module knows no message."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Self

from gpubox import errors

Check = Callable[[Any], bool]

# --- checks of a value as it arrives ---------------------------------------------------------


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def opt(check: Check) -> Check:
    return lambda value: value is None or check(value)


def int_in(low: int, high: int) -> Check:
    return lambda value: is_int(value) and low <= value <= high


def text(limit: int) -> Check:
    return lambda value: isinstance(value, str) and len(value) <= limit


def bounded_list(check: Check, limit: int) -> Check:
    return lambda value: (
        isinstance(value, list) and len(value) <= limit and all(check(item) for item in value)
    )


def list_of(check: Check) -> Check:
    return lambda value: isinstance(value, list) and all(check(item) for item in value)


def is_str(value: Any) -> bool:
    return isinstance(value, str)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_str_map(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )


def is_count_map(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and is_int(v) and v >= 0 for k, v in value.items()
    )


def is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def is_dict(value: Any) -> bool:
    return isinstance(value, dict)


# --- records ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WireField:
    """How one field of a record travels: its key, its check, whether it is left out when
    None, and the record type of its value when it is a map (or a list of maps) itself."""

    name: str
    check: Check
    omit: bool
    part: type[Record] | None  # a map with fields of its own (a Record), or a list of them
    many: bool


def wire(
    check: Check = is_dict,
    *,
    omit: bool = False,
    part: type[Record] | None = None,
    many: bool = False,
) -> Any:
    """A record's field, whose value `check` tests as it arrives. A `part` (a map, or with
    `many` a list of maps, with fields of their own) is checked by `check` as a whole, then
    field by field. With `omit`, the field is optional and left out of the map when None."""
    metadata = {"wire": (check, omit, part, many)}
    if omit:
        return dataclasses.field(default=None, metadata=metadata)
    return dataclasses.field(metadata=metadata)


class Record:
    """A msgpack map with known fields: a message body, or a part of one (the job in JOB)."""

    __slots__ = ()
    _fields: ClassVar[tuple[WireField, ...]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._fields = ()  # filled in by wire_fields, once the dataclass exists

    @classmethod
    def wire_fields(cls) -> tuple[WireField, ...]:
        """The record's fields as the wire has them, in order."""
        if not cls._fields:
            cls._fields = tuple(
                WireField(f.name, *f.metadata["wire"])
                for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            )
        return cls._fields

    @classmethod
    def from_body(cls, body: Any, where: str) -> Self:
        """The record a received map holds; ProtocolError if a field is missing or wrong.
        Keys it does not know are ignored (a newer peer's additions)."""
        if not isinstance(body, dict):
            raise errors.ProtocolError(f"{where} is not a map")
        values: dict[str, Any] = {}
        for field in cls.wire_fields():
            value = body.get(field.name)
            if not field.check(value):
                raise errors.ProtocolError(f"{where}.{field.name} is missing or has the wrong type")
            if field.part is not None and value is not None:
                inner = f"{where}.{field.name}"
                if field.many:
                    value = [field.part.from_body(item, inner) for item in value]
                else:
                    value = field.part.from_body(value, inner)
            values[field.name] = value
        return cls(**values)

    def to_body(self) -> dict[str, Any]:
        """The map this record is on the wire."""
        body: dict[str, Any] = {}
        for field in self.wire_fields():
            value = getattr(self, field.name)
            if value is None:
                if not field.omit:
                    body[field.name] = None
            elif field.part is not None:
                body[field.name] = (
                    [item.to_body() for item in value] if field.many else value.to_body()
                )
            else:
                body[field.name] = value
        return body
