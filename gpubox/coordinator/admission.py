"""Whether the broker takes a worker's HELLO: the checks on what its key lets it claim."""

from __future__ import annotations

import logging

from gpubox import keys, protocol
from gpubox.coordinator.peers import Link
from gpubox.logfmt import fields

log = logging.getLogger(__name__)


def refusal(link: Link, hello: protocol.Hello, allow: keys.AllowList) -> str:
    """Why this HELLO is not taken ("" if it is), in words for the worker's own log: its key
    is another worker's, or it claims more than its key was enrolled with."""
    if hello.name != link.name:
        claimed = hello.name[:64]
        log.warning("refused HELLO: the key of worker %s claimed the name %r", link.name, claimed)
        return (
            f"it calls itself {claimed!r}, but its key is worker {link.name}'s: start it as"
            f" {link.name} (--name {link.name}), or give it a key of its own (gpubox keys"
            " worker NAME on the coordinator's box)"
        )
    claims = allow.claims_for(link.name)
    excess = claims.excess(hello.labels, hello.gpus, hello.mounts or []) if claims else ""
    if not excess:
        return ""
    # Misconfigured, or a key trying to look like the best place for jobs (and their
    # secrets) it was never meant to get.
    log.error(
        "refused HELLO of worker %s: it claims %s",
        link.name,
        excess,
        extra=fields(worker=link.name),
    )
    return (
        f"it claims {excess}: start it with no more than that, or enrol it again with what it"
        " has (gpubox keys worker NAME --labels … --gpus N --gpu-model X --mounts … on the"
        " coordinator's box)"
    )
