"""Telling systemd how a `Type=notify` service is doing (sd_notify), in a few lines of our own.

systemd passes the address of a datagram socket in NOTIFY_SOCKET; a service writes
"READY=1" there once it serves, "RELOADING=1"/"READY=1" around a reload and "STOPPING=1"
when it begins to stop. Outside systemd NOTIFY_SOCKET is unset and notify() does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(*states: str) -> bool:
    """Send states like "READY=1" to systemd; False (and nothing sent) outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(states).encode(), address)
        return True
    except OSError as exc:
        log.warning("could not notify systemd at %s: %s", address, exc)
        return False
