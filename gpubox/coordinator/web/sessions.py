"""Dashboard sessions: an API token, given once at sign-in, becomes a session cookie.

A session is kept in this process's memory (a coordinator restart signs everyone out) and
holds the digest of the token it was opened with, never the token. Every request looks the
token up again, so a session ends with its token: revoke the token, and its sessions are
gone at their next request. A session also ends SESSION_S after sign-in, or at sign-out.
Each session has its own CSRF token, which every form that changes something must send back.
"""

from __future__ import annotations

import dataclasses
import hmac
import secrets
import threading
import time

from gpubox import models
from gpubox.coordinator import tokens
from gpubox.store import Store

COOKIE = "gpubox_session"
SESSION_S = 12 * 3600  # how long a sign-in lasts
MAX_SESSIONS = 10_000  # past it, the oldest sessions are dropped (each needs a valid token)


@dataclasses.dataclass(frozen=True)
class Session:
    id: str
    token_digest: str
    csrf: str
    expires: float  # time.monotonic()


class Sessions:
    """The open sessions of one coordinator. Any thread."""

    def __init__(self, store: Store, lifetime_s: float = SESSION_S, public_url: str = "") -> None:
        """`public_url`: the address people open the dashboard at when a proxy (TLS, most
        often) stands in front of the coordinator: sign-in and forms are accepted from that
        origin as well as from the one the request names, and an https one marks the session
        cookie Secure even though the proxy speaks plain HTTP to the coordinator."""
        self.store = store
        self.lifetime_s = lifetime_s
        self.public_origin = public_url.rstrip("/")
        self.secure_cookie = self.public_origin.startswith("https://")
        self._open: dict[str, Session] = {}
        self._lock = threading.Lock()

    def open(self, token: str) -> tuple[Session, models.Token]:
        """Sign in with an API token: a new session, or errors.Unauthorized."""
        found = tokens.check(self.store, f"Bearer {token.strip()}")
        session = Session(
            secrets.token_urlsafe(32),
            found.digest,
            secrets.token_urlsafe(32),
            time.monotonic() + self.lifetime_s,
        )
        with self._lock:
            if len(self._open) >= MAX_SESSIONS:
                oldest = min(self._open.values(), key=lambda s: s.expires)
                del self._open[oldest.id]
            self._open[session.id] = session
        return session, found

    def find(self, session_id: str | None) -> tuple[Session, models.Token] | None:
        """The session a cookie names and its token, or None: unknown, expired, or its token
        revoked."""
        if not session_id:
            return None
        with self._lock:
            session = self._open.get(session_id)
        if session is None:
            return None
        token = self.store.find_token(session.token_digest)
        if session.expires < time.monotonic() or token is None:
            self.close(session_id)
            return None
        return session, token

    def close(self, session_id: str) -> None:
        with self._lock:
            self._open.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._open)


def csrf_ok(session: Session, sent: str | None) -> bool:
    """Whether a form sent back its session's CSRF token."""
    return bool(sent) and hmac.compare_digest(session.csrf.encode(), str(sent).encode())
