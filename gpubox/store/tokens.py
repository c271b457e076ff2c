"""API tokens in SQL: only their digests are stored, and a token found is taken on trust
for a moment (TOKEN_CACHE_S) rather than read again for every request."""

from __future__ import annotations

import threading
import time
from typing import Any

from gpubox import errors, models
from gpubox.store import backend

# How long a token found is taken on trust without asking the database again. Every request
# looks its token up: without this, that read costs the coordinator more than the job's own
# insert (a database round trip, and on SQLite a read transaction that wakes other threads).
# A revoke through this store takes effect at once; one by another process (`gpubox token
# revoke`) within this many seconds.
TOKEN_CACHE_S = 1.0


class TokenStore(backend.Backend):
    """The store's operations on API tokens."""

    def __init__(self) -> None:
        super().__init__()
        # Tokens found lately (find_token): digest -> (token, monotonic time it was read).
        self._tokens_found: dict[str, tuple[models.Token, float]] = {}
        self._tokens_generation = 0
        self._tokens_lock = threading.Lock()

    def _tokens_changed(self) -> None:
        """After a token was added or revoked here: forget the tokens found, and keep a lookup
        that read the database before the change from keeping what it read."""
        with self._tokens_lock:
            self._tokens_generation += 1
            self._tokens_found = {}

    def add_token(self, token: models.Token) -> None:
        with self._write() as cur:
            cur.execute("SELECT name FROM tokens WHERE name = ?", (token.name,))
            if cur.fetchone() is not None:
                raise errors.WrongState(f"a token named {token.name!r} exists already")
            cur.execute(
                "INSERT INTO tokens (name, digest, role, created_at, allow_process, max_gpus,"
                " max_running, max_queued) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    token.name,
                    token.digest,
                    token.role,
                    models.format_time(token.created_at),
                    int(token.allow_process),
                    token.caps.max_gpus,
                    token.caps.max_running,
                    token.caps.max_queued,
                ),
            )
        self._tokens_changed()

    def set_caps(self, name: str, caps: dict[str, int | None]) -> models.Token:
        with self._write() as cur:
            if caps:
                assignments = ", ".join(f"{key} = ?" for key in caps if key in models.Caps.NAMES)
                cur.execute(
                    f"UPDATE tokens SET {assignments} WHERE name = ?", (*caps.values(), name)
                )
            cur.execute("SELECT * FROM tokens WHERE name = ?", (name,))
            row = cur.fetchone()
        if row is None:
            raise errors.NotFound(f"no token named {name!r}")
        self._tokens_changed()
        return _token(row)

    def add_session(self, session: models.WebSession) -> None:
        with self._write() as cur:
            cur.execute("DELETE FROM web_sessions WHERE expires_at < ?", (_now(),))
            cur.execute(
                "INSERT INTO web_sessions (id, token_digest, csrf, expires_at) VALUES (?, ?, ?, ?)",
                (
                    session.id,
                    session.token_digest,
                    session.csrf,
                    models.format_time(session.expires_at),
                ),
            )

    def find_session(self, session_id: str) -> models.WebSession | None:
        with self._read() as cur:
            cur.execute("SELECT * FROM web_sessions WHERE id = ?", (session_id,))
            row = cur.fetchone()
        if row is None:
            return None
        expires = models.parse_time(row["expires_at"])
        assert expires is not None
        return models.WebSession(row["id"], row["token_digest"], row["csrf"], expires)

    def drop_sessions(self, session_id: str | None = None) -> None:
        with self._write() as cur:
            if session_id is None:
                cur.execute("DELETE FROM web_sessions")
            else:
                cur.execute("DELETE FROM web_sessions WHERE id = ?", (session_id,))

    def token_caps(self) -> dict[str, models.Caps]:
        with self._read() as cur:
            cur.execute(
                "SELECT name, max_gpus, max_running, max_queued FROM tokens WHERE"
                " max_gpus IS NOT NULL OR max_running IS NOT NULL OR max_queued IS NOT NULL"
            )
            return {row["name"]: _caps(row) for row in cur.fetchall()}

    def find_token(self, digest: str) -> models.Token | None:
        """The token with this digest; one found less than TOKEN_CACHE_S ago is not read
        again (an unknown digest always is: a new token works at once)."""
        found = self._tokens_found.get(digest)
        now = time.monotonic()
        if found is not None and now - found[1] < TOKEN_CACHE_S:
            return found[0]
        generation = self._tokens_generation
        with self._read() as cur:
            cur.execute("SELECT * FROM tokens WHERE digest = ?", (digest,))
            row = cur.fetchone()
        if row is None:
            return None
        token = _token(row)
        with self._tokens_lock:
            if generation == self._tokens_generation:
                self._tokens_found[digest] = (token, now)
        return token

    def revoke_token(self, name: str) -> bool:
        with self._write() as cur:
            cur.execute("DELETE FROM tokens WHERE name = ?", (name,))
            revoked = bool(cur.rowcount == 1)
        self._tokens_changed()
        return revoked

    def list_tokens(self) -> list[models.Token]:
        with self._read() as cur:
            cur.execute("SELECT * FROM tokens ORDER BY name")
            return [_token(row) for row in cur.fetchall()]


def _token(row: dict[str, Any]) -> models.Token:
    return models.Token(
        name=row["name"],
        digest=row["digest"],
        role=row["role"],
        created_at=models.parse_time(row["created_at"]),  # type: ignore[arg-type]
        allow_process=bool(row["allow_process"]),
        caps=_caps(row),
    )


def _caps(row: dict[str, Any]) -> models.Caps:
    return models.Caps(row["max_gpus"], row["max_running"], row["max_queued"])


def _now() -> str | None:
    return models.format_time(models.utcnow())
