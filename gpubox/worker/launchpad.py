"""The launch pad: a small process that already runs as a process worker's job user and
starts each job's command for it (worker.launcher is the worker's side).

A worker running as root starts its jobs as another user. Python cannot vfork when it must
switch user in the child, and forking the whole worker cost ~3 ms a job; exec'ing setpriv
first costs a second exec, ~1.1 ms of CPU a job on this 2-core VM, more than a short job's
own process. This process switches once (the worker starts it through setpriv) and then
starts jobs with vfork and one exec each.

It is run by path (`python3 -I -S launchpad.py FD`), so it imports the standard library
only. FD is a SOCK_SEQPACKET socket shared with the worker; each packet is one JSON map:

    worker → pad   {"argv": [...], "cwd": str, "env": {str: str}} with two file
                   descriptors (SCM_RIGHTS): the job's stdout and stderr
    pad → worker   {"ready": PID} once, when it is set up
                   {"pid": N}, or {"errno": N, "error": str} when it could not start
                   {"exit": N, "code": C}  when process N ended (C as Popen.returncode:
                   -SIGNAL for a signal)

Each job starts in its own session (its process group is stopped as one), with stdin on
/dev/null. The pad makes itself non-dumpable, so a job running as the same user cannot
ptrace it or read its memory, and it says nothing (the worker falls back to setpriv) if one
attached to it before it could forbid it. It exits when the worker's end of the socket
closes.
"""

from __future__ import annotations

import ctypes
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
from typing import Any

PR_SET_DUMPABLE = 4
MAX_PACKET = 4 * 1024 * 1024  # one request: a command and its environment


def main(fd: int) -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    link = socket.socket(fileno=fd)
    if _traced():
        # Attached to before it could forbid it: whoever did may speak for it. It says
        # nothing and ends; the worker starts each job through setpriv instead.
        return
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the selector
    selector = selectors.DefaultSelector()
    selector.register(link, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    running: dict[int, subprocess.Popen[bytes]] = {}
    link.send(json.dumps({"ready": os.getpid()}).encode())
    while True:
        for key, _ in selector.select():
            if key.fileobj is link:
                message, fds, _, _ = socket.recv_fds(link, MAX_PACKET, 2)
                if not message:
                    return  # the worker is gone
                link.send(json.dumps(_start(json.loads(message), fds, running)).encode())
            else:
                os.read(wake_read, 4096)
        for pid, proc in list(running.items()):
            if proc.poll() is not None:
                del running[pid]
                link.send(json.dumps({"exit": pid, "code": proc.returncode}).encode())


def _traced() -> bool:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("TracerPid:"):
                return line.split()[1] != "0"
    return False


def _start(
    request: dict[str, Any], fds: list[int], running: dict[int, subprocess.Popen[bytes]]
) -> dict[str, object]:
    try:
        if len(fds) != 2:
            return {"errno": 22, "error": "a request must carry stdout and stderr"}
        proc = subprocess.Popen(
            list(request["argv"]),
            cwd=str(request["cwd"]),
            env=dict(request["env"]),
            stdin=subprocess.DEVNULL,
            stdout=fds[0],
            stderr=fds[1],
            start_new_session=True,
        )
    except OSError as exc:
        return {"errno": exc.errno or 0, "error": exc.strerror or str(exc)}
    except Exception as exc:  # a malformed request: said, not fatal
        return {"errno": 22, "error": f"bad request: {exc}"}
    finally:
        for fd in fds:
            os.close(fd)
    running[proc.pid] = proc
    return {"pid": proc.pid}


if __name__ == "__main__":
    main(int(sys.argv[1]))
