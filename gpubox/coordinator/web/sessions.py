"""Dashboard sessions: an API token, given once at sign-in, becomes a session cookie.

A session is kept in the store, so that every HTTP process of the coordinator knows it; a
coordinator's start drops them all (a restart signs everyone out). The store holds the
SHA-256 of the cookie, never the cookie, and the digest of the token it was opened with,
never the token. Every request looks the token up again, so a session ends with its token:
revoke the token, and its sessions are gone at their next request. A session also ends
SESSION_S after sign-in, or at sign-out. Each session has its own CSRF token, which every
form that changes something must send back.
"""

from __future__ import annotations

import dataclasses
import hmac
import secrets
from datetime import timedelta

from gpubox import models
from gpubox.coordinator import tokens
from gpubox.store import Store

COOKIE = "gpubox_session"
SESSION_S = 12 * 3600  # how long a sign-in lasts


@dataclasses.dataclass(frozen=True)
class Session:
    id: str  # the cookie's value
    token_digest: str
    csrf: str


class Sessions:
    """The open sessions of one coordinator, in its store. Any thread, any process."""

    def __init__(self, store: Store, lifetime_s: float = SESSION_S, public_url: str = "") -> None:
        """`public_url`: the address people open the dashboard at when a proxy (TLS, most
        often) stands in front of the coordinator: sign-in and forms are accepted from that
        origin as well as from the one the request names, and an https one marks the session
        cookie Secure even though the proxy speaks plain HTTP to the coordinator."""
        self.store = store
        self.lifetime_s = lifetime_s
        self.public_origin = public_url.rstrip("/")
        self.secure_cookie = self.public_origin.startswith("https://")

    def open(self, token: str) -> tuple[Session, models.Token]:
        """Sign in with an API token: a new session, or errors.Unauthorized."""
        found = tokens.check(self.store, f"Bearer {token.strip()}")
        session = Session(secrets.token_urlsafe(32), found.digest, secrets.token_urlsafe(32))
        expires = models.utcnow() + timedelta(seconds=self.lifetime_s)
        self.store.add_session(
            models.WebSession(tokens.digest(session.id), found.digest, session.csrf, expires)
        )
        return session, found

    def find(self, session_id: str | None) -> tuple[Session, models.Token] | None:
        """The session a cookie names and its token, or None: unknown, expired, or its token
        revoked."""
        if not session_id or len(session_id) > 100:
            return None
        stored = self.store.find_session(tokens.digest(session_id))
        if stored is None:
            return None
        token = self.store.find_token(stored.token_digest)
        if stored.expires_at < models.utcnow() or token is None:
            self.close(session_id)
            return None
        return Session(session_id, stored.token_digest, stored.csrf), token

    def close(self, session_id: str) -> None:
        self.store.drop_sessions(tokens.digest(session_id))


def csrf_ok(session: Session, sent: str | None) -> bool:
    """Whether a form sent back its session's CSRF token."""
    return bool(sent) and hmac.compare_digest(session.csrf.encode(), str(sent).encode())
