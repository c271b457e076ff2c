"""API tokens: made here, shown once, stored only as a SHA-256 digest."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import socket
from pathlib import Path
from typing import Any

from gpubox import errors, models
from gpubox.store import Store

log = logging.getLogger(__name__)

ROLES = ("view", "submit", "admin")  # view: reads only (the API's GETs, the dashboard)
LOCAL_NAME = "local"
MAX_NAME = 100  # the longest token name


def digest(token: str | bytes) -> str:
    """The hex SHA-256 of a token: what the store keeps."""
    data = token.encode("utf-8") if isinstance(token, str) else token
    return hashlib.sha256(data).hexdigest()


MAX_CAP = 10**9  # the highest cap a token may carry


def caps_from(values: dict[str, Any]) -> dict[str, int | None]:
    """The caps named in `values` (models.Caps.NAMES; others are left out), checked: each a
    whole number from 0, or None to lift it. errors.BadInput names the one that is not."""
    caps: dict[str, int | None] = {}
    for name in models.Caps.NAMES:
        if name not in values:
            continue
        value = values[name]
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_CAP
        ):
            raise errors.BadInput(
                f"{name} must be a whole number from 0 to {MAX_CAP}, or null for no cap", name
            )
        caps[name] = value
    return caps


def create(
    store: Store,
    name: str,
    role: str = "submit",
    allow_process: bool = False,
    caps: models.Caps | None = None,
) -> str:
    """Make a new token, store its digest under `name`, and return the token itself. With
    `allow_process`, its jobs may also run on process-runtime workers (on their hosts);
    `caps` limit what its jobs take at once."""
    if role not in ROLES:
        raise errors.BadInput(f"role must be one of {', '.join(ROLES)}", "role")
    if not name or len(name) > MAX_NAME or "/" in name or not name.isprintable():
        # (a '/' could not be revoked over HTTP: DELETE /api/v1/tokens/NAME takes none)
        raise errors.BadInput(
            f"token name must be 1 to {MAX_NAME} printable characters, no '/'", "name"
        )
    token = "gpbx_" + secrets.token_urlsafe(32)
    store.add_token(
        models.Token(
            name, digest(token), role, models.utcnow(), allow_process, caps or models.Caps()
        )
    )
    return token


def check(store: Store, header: str | None) -> models.Token:
    """The token an `Authorization: Bearer …` header carries, or errors.Unauthorized."""
    if not header:
        raise errors.Unauthorized("missing Authorization: Bearer <token> header")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise errors.Unauthorized("the Authorization header must be 'Bearer <token>'")
    try:
        # WSGI hands headers over as latin-1; a token is ASCII, anything else is no token.
        raw = value.strip().encode("latin-1")
    except UnicodeEncodeError:
        raise errors.Unauthorized("invalid token") from None
    wanted = digest(raw)
    token = store.find_token(wanted)
    if token is None or not hmac.compare_digest(token.digest.encode(), wanted.encode()):
        raise errors.Unauthorized("invalid token")
    return token


def local_name(state_dir: str, shared: bool) -> str:
    """The name of the local admin token of the coordinator with this state folder: "local",
    or, on a store that several coordinators share, "local@HOST-HASH" (HASH: of the state
    folder's path), so that each has its own and a start replaces only its own."""
    if not shared:
        return LOCAL_NAME
    folder = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:8]
    return f"{LOCAL_NAME}@{socket.gethostname()[:60]}-{folder}"


def ensure_local(store: Store, state_dir: str, name: str = LOCAL_NAME) -> Path:
    """Make sure `<state_dir>/token` (mode 0600) holds a valid admin token, named `name`
    (see local_name); its path."""
    path = Path(state_dir) / "token"
    with contextlib.suppress(OSError):
        existing = path.read_text().strip()
        if existing and store.find_token(digest(existing)) is not None:
            return path
    store.revoke_token(name)
    token = create(store, name, "admin")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written aside, then renamed over it: a client reading it meanwhile (gpubox on this
    # box, a test waiting for it) sees the old token or the new one, never an empty file.
    aside = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    os.chmod(aside, 0o600)
    os.replace(aside, path)
    log.info("wrote a local admin token to %s", path)
    return path
