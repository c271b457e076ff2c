"""The routes for what an operator manages: the workers (listed for any token, removed from
the allow list by an admin) and the API tokens (admin tokens only)."""

from __future__ import annotations

import dataclasses
from typing import Any

import bottle

from gpubox import errors, keys, models
from gpubox.coordinator import tokens
from gpubox.coordinator.api import context, endpoints, params


def add_routes(app: bottle.Bottle, ctx: context.Context) -> None:
    """Add /api/v1/workers, its /revoke, and /api/v1/tokens (list, create, revoke) to `app`."""
    store, state_dir, live = ctx.store, ctx.state_dir, ctx.live
    max_body_bytes = ctx.max_body_bytes

    @app.get("/api/v1/workers")
    @endpoints.endpoint(store)
    def list_workers() -> dict[str, Any]:
        running: dict[str, list[int]] = {}
        for placed in store.placements():
            running.setdefault(placed.worker, []).append(placed.job_id)
        shown = []
        for worker in store.list_workers():
            quarantine = ""
            if live is not None and worker.connected:
                heard = live.last_heard(worker.name)
                if heard is not None:
                    worker = dataclasses.replace(worker, last_seen=heard)
                usage = live.gpu_usage(worker.name)
                quarantine = live.quarantine(worker.name)
            else:
                usage = None
            # Why it gets no jobs now, if it does not (see Broker._unconfirmed).
            item = {**worker.to_dict(running.get(worker.name, []), usage)}
            item["quarantined"] = quarantine or None
            shown.append(item)
        return {"workers": shown}

    @app.post("/api/v1/workers/<name>/revoke")
    @endpoints.endpoint(store, admin=True)
    def revoke_worker(name: str) -> dict[str, Any]:
        try:
            revoked = keys.revoke(state_dir, name)
        except errors.ConfigError as exc:
            raise errors.BadInput(str(exc), "name") from None
        if not revoked:
            raise errors.NotFound(f"worker {name!r} is not on the allow list")
        return {"name": name, "revoked": True}

    @app.get("/api/v1/tokens")
    @endpoints.endpoint(store, admin=True)
    def list_tokens() -> dict[str, Any]:
        return {"tokens": [_shown(t) for t in store.list_tokens()]}

    @app.post("/api/v1/tokens")
    @endpoints.endpoint(store, admin=True)
    def create_token() -> dict[str, Any]:
        body = params.json_body(max_body_bytes)
        if not isinstance(body, dict):
            raise errors.BadInput("the body must be a JSON object")
        for key in body:
            if key not in ("name", "role", "allow_process", *models.Caps.NAMES):
                raise errors.BadInput(f"unknown field {key!r}", key)
        name, role = body.get("name"), body.get("role", "submit")
        allow_process = body.get("allow_process", False)
        if not isinstance(name, str):
            raise errors.BadInput("name is required and must be a string", "name")
        if not isinstance(role, str):
            raise errors.BadInput("role must be a string", "role")
        if not isinstance(allow_process, bool):
            raise errors.BadInput("allow_process must be true or false", "allow_process")
        caps = models.Caps(**tokens.caps_from(body))
        value = tokens.create(store, name, role, allow_process, caps)
        bottle.response.status = 201
        return {
            "name": name,
            "role": role,
            "allow_process": allow_process,
            **caps.to_dict(),
            "token": value,
        }

    @app.patch("/api/v1/tokens/<name>")
    @endpoints.endpoint(store, admin=True)
    def change_token(name: str) -> dict[str, Any]:
        body = params.json_body(max_body_bytes)
        if not isinstance(body, dict) or not body:
            raise errors.BadInput(
                f"the body must be a JSON object with some of {', '.join(models.Caps.NAMES)}"
            )
        for key in body:
            if key not in models.Caps.NAMES:
                raise errors.BadInput(f"unknown field {key!r}: a token changes only its caps", key)
        if "\x00" in name:
            raise errors.NotFound(f"no token named {name!r}")
        return _shown(store.set_caps(name, tokens.caps_from(body)))

    @app.delete("/api/v1/tokens/<name>")
    @endpoints.endpoint(store, admin=True)
    def revoke_token(name: str) -> dict[str, Any]:
        # No token name holds NUL (tokens.create), and PostgreSQL text cannot: not asked.
        if "\x00" in name or not store.revoke_token(name):
            raise errors.NotFound(f"no token named {name!r}")
        return {"name": name, "revoked": True}


def _shown(token: models.Token) -> dict[str, Any]:
    """A token as the API lists it (never the token itself: only its digest is kept)."""
    return {
        "name": token.name,
        "role": token.role,
        "allow_process": token.allow_process,
        **token.caps.to_dict(),
        "created_at": models.format_time(token.created_at),
    }
