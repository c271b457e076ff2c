"""Whether an answer of the API is one that its OpenAPI document (GET /api/v1/openapi.json)
describes: its status listed for that route and method, its content type, its body valid
against the schema given for them (each record of an NDJSON body against the records'
schema), and its headers. tests/test_api.py's request() checks every answer this way when
GPUBOX_TEST_OPENAPI=1; tests/test_openapi.py checks answers with it too."""

from __future__ import annotations

import functools
import json
import os
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

from gpubox.coordinator.api import openapi

# On unless GPUBOX_TEST_OPENAPI=0: every answer the API tests get must be one the document
# describes.
ENABLED = os.environ.get("GPUBOX_TEST_OPENAPI", "1") != "0"
BASE = "urn:gpubox:openapi"  # where the schemas' references find the document
# The paths the document is about: the dashboard's pages are not part of the API.
API = re.compile(r"^(/api(/.*)?|/healthz|/metrics)$")


class Mismatch(AssertionError):
    """An answer that the document does not describe."""


@functools.cache
def _registry() -> Any:
    # Imported here: jsonschema is needed only where answers are checked (the test extra).
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    resource = Resource.from_contents(openapi.document(), default_specification=DRAFT202012)
    return Registry().with_resource(BASE, resource)


@functools.cache
def _validator(pointer: tuple[str, ...]) -> Any:
    """A validator for the schema at `pointer` in the document (its references resolved)."""
    from jsonschema import Draft202012Validator

    escaped = (part.replace("~", "~0").replace("/", "~1") for part in pointer)
    fragment = "/" + "/".join(urllib.parse.quote(part, safe="~") for part in escaped)
    return Draft202012Validator({"$ref": f"{BASE}#{fragment}"}, registry=_registry())


@functools.cache
def _routes() -> list[tuple[re.Pattern[str], str]]:
    """Each path of the document, and the pattern of the paths it stands for."""
    routes = []
    for template in openapi.document()["paths"]:
        pattern = re.sub(r"\\\{[^}]*\\\}", "[^/]+", re.escape(template))
        routes.append((re.compile(f"^{pattern}$"), template))
    return routes


def _resolve(pointer: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, Any]]:
    """The object at `pointer`, following a $ref, and where it is."""
    found: Any = openapi.document()
    for part in pointer:
        found = found[part]
    if "$ref" in found:
        return _resolve(tuple(found["$ref"].removeprefix("#/").split("/")))
    return pointer, found


def valid(pointer: tuple[str, ...], value: Any, what: str) -> None:
    """Mismatch unless `value` is valid against the schema at `pointer` in the document."""
    errors = sorted(_validator(pointer).iter_errors(value), key=lambda e: list(e.path))
    if errors:
        shown = "; ".join(
            f"at {'/'.join(map(str, e.absolute_path)) or 'the top'}: {e.message[:300]}"
            for e in errors[:5]
        )
        raise Mismatch(f"{what} does not match {'/'.join(pointer)}: {shown}")


def check(method: str, target: str, status: int, headers: Mapping[str, str], raw: bytes) -> None:
    """Mismatch unless the document describes this answer to `method` `target` (a path
    with its query string)."""
    path = urllib.parse.urlsplit(target).path
    if not API.match(path):
        return
    what = f"{method} {target[:200]} → {status}"
    template = next((template for route, template in _routes() if route.match(path)), None)
    item = openapi.document()["paths"].get(template or "", {})
    if method.lower() not in item:
        # No such route, or not with this method: Bottle's own 404 or 405.
        if status not in (404, 405):
            raise Mismatch(f"{what}: the document has no such operation")
        valid(("components", "schemas", "Error"), json.loads(raw), what)
        return
    answers = item[method.lower()]["responses"]
    if str(status) not in answers:
        raise Mismatch(f"{what}: the document lists {sorted(answers)} for {method} {template}")
    pointer, answer = _resolve(("paths", template, method.lower(), "responses", str(status)))
    _check_headers(pointer, answer, headers, what)
    content = answer.get("content", {})
    if not content:
        if raw:
            raise Mismatch(f"{what}: the document says no body, this one has {raw[:100]!r}")
        return
    media = headers.get("Content-Type", "").split(";")[0].strip().lower()
    if media not in content:
        raise Mismatch(f"{what}: Content-Type {media!r} is not one of {sorted(content)}")
    pointer = (*pointer, "content", media)
    if media == "application/json":
        valid((*pointer, "schema"), json.loads(raw), what)
    elif media == "application/x-ndjson":
        for line in raw.decode().splitlines():
            if line.strip():
                valid((*pointer, "x-itemSchema"), json.loads(line), f"{what}, record {line[:80]}")
    else:
        valid((*pointer, "schema"), raw.decode(), what)


def _check_headers(
    pointer: tuple[str, ...], answer: dict[str, Any], headers: Mapping[str, str], what: str
) -> None:
    for name, header in answer.get("headers", {}).items():
        value = headers.get(name)
        if value is None:
            if header.get("required"):
                raise Mismatch(f"{what}: the header {name} is missing")
            continue
        valid((*pointer, "headers", name, "schema"), value, f"{what}, header {name}")
