"""The dashboard's routes: sign-in and out, the queue, a job, the workers, the history and
the tokens, each a server-rendered page (templates/, escaped by default) that the scripts in
static/ make live. The data they read is the API's (the store and the broker); what they may
do is the API's too (api.jobs.cancel, coordinator.tokens)."""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Any

import bottle

from gpubox import errors, models, validate
from gpubox.coordinator import tokens
from gpubox.coordinator.api import context
from gpubox.coordinator.api import jobs as api_jobs
from gpubox.coordinator.web import guard, views
from gpubox.coordinator.web.sessions import COOKIE, SESSION_S, Sessions

HERE = Path(__file__).parent
TEMPLATES = str(HERE / "templates")
STATIC = str(HERE / "static")
QUEUE_ROWS = 200  # queued jobs a queue page lists (its counts cover them all)
HISTORY_PAGE = 50


def render(name: str, **values: Any) -> str:
    """A template of templates/, with the signed-in user and the CSRF token when there is a
    session. Every {{value}} is HTML-escaped; the templates use no raw output of data."""
    found = bottle.request.environ.get(guard.SESSION_KEY)
    session, token = found if found else (None, None)
    values.setdefault("user", token)
    values.setdefault("csrf", session.csrf if session else "")
    values.setdefault("quote", lambda text: urllib.parse.quote(str(text), safe=""))
    return str(bottle.template(name, template_lookup=[TEMPLATES], **values))


def add_routes(app: bottle.Bottle, ctx: context.Context, sessions: Sessions) -> None:
    """Add the dashboard's routes to `app` (at /, beside the API under /api/v1)."""
    store, live = ctx.store, ctx.live
    guard.install_api_sessions(app, sessions)
    if TEMPLATES not in bottle.TEMPLATE_PATH:  # for the error page's lookup by name
        bottle.TEMPLATE_PATH.insert(0, TEMPLATES)

    @app.get("/static/<path:path>")
    def static(path: str) -> Any:
        answer = bottle.static_file(path, root=STATIC)  # (a response of its own: headers here)
        for name, value in guard.HEADERS.items():
            answer.set_header(name, value)
        answer.set_header("Cache-Control", "max-age=300")
        return answer

    @app.get("/login")
    def login_page() -> str:
        guard.secure_headers()
        return render("login", next=_local(bottle.request.query.get("next")), failed="")

    @app.post("/login")
    def login() -> str:
        guard.secure_headers()
        target = _local(bottle.request.forms.get("next"))
        if not guard.same_origin(sessions.public_origin):
            bottle.response.status = 403
            return render("login", next=target, failed="refused: not from this dashboard")
        try:
            session, _ = sessions.open(bottle.request.forms.get("token") or "")
        except errors.Unauthorized:
            bottle.response.status = 401
            return render("login", next=target, failed="That token is not valid.")
        bottle.response.set_cookie(
            COOKIE,
            session.id,
            path="/",
            httponly=True,
            samesite="strict",
            secure=sessions.secure_cookie or bottle.request.urlparts.scheme == "https",
            max_age=SESSION_S,
        )
        bottle.redirect(target, 303)
        raise AssertionError  # (redirect raises)

    @app.post("/logout")
    @guard.page(sessions)
    def logout() -> None:
        session, _ = guard.current()
        sessions.close(session.id)
        bottle.response.delete_cookie(COOKIE, path="/")
        bottle.redirect("/login", 303)

    @app.get("/")
    @guard.page(sessions)
    def queue_page() -> str:
        filters = views.QueueFilters.from_query(bottle.request.query)
        return render("queue", queue=_queue(filters), filters=filters, query=filters.query())

    @app.get("/ui/queue")
    @guard.page(sessions, fragment=True)
    def queue_rows() -> str:
        return render(
            "queue_rows", queue=_queue(views.QueueFilters.from_query(bottle.request.query))
        )

    def _queue(filters: views.QueueFilters) -> views.Queue:
        reason = live.queue_reason if live is not None else (lambda _job: "")
        return views.queue(
            store.running_jobs(),
            live.queue_in_order(QUEUE_ROWS) if live is not None else store.queued_jobs(QUEUE_ROWS),
            store.jobs_by_status(),
            reason,
            filters,
            models.utcnow(),
        )

    @app.get("/jobs/<job_id:int>")
    @guard.page(sessions)
    def job_page(job_id: int) -> str:
        _, token = guard.current()
        job = store.get_job(job_id)
        models_by_uuid = views.gpu_models(store.list_workers())
        return render(
            "job",
            job=views.job_view(job, models_by_uuid, models.utcnow()),
            may_cancel=api_jobs.may_cancel(token, job),
            reason=live.queue_reason(job) if live and job.status is models.Status.QUEUED else "",
        )

    @app.post("/jobs/<job_id:int>/cancel")
    @guard.page(sessions, role="submit")
    def cancel(job_id: int) -> None:
        _, token = guard.current()
        api_jobs.cancel(ctx, token, job_id)
        bottle.redirect(f"/jobs/{job_id}", 303)

    @app.get("/workers")
    @guard.page(sessions)
    def workers_page() -> str:
        return render("workers", workers=_workers())

    @app.get("/ui/workers")
    @guard.page(sessions, fragment=True)
    def workers_rows() -> str:
        return render("workers_rows", workers=_workers())

    def _workers() -> list[views.WorkerView]:
        usage = live.gpu_usage if live is not None else (lambda _name: {})
        return views.workers(store.list_workers(), store.placements(), usage)

    @app.get("/history")
    @guard.page(sessions)
    def history_page() -> str:
        query = bottle.request.query
        status = validate.parse_status(query["status"]) if query.get("status") else None
        before = _int(query.get("before"))
        found = store.list_jobs(status, HISTORY_PAGE + 1, before)
        more = len(found) > HISTORY_PAGE
        shown = found[:HISTORY_PAGE]
        recent = [j for j in store.list_jobs(None, views.USAGE_JOBS) if j.status.terminal]
        return render(
            "history",
            jobs=[views.job_view(job, {}, models.utcnow()) for job in shown],
            status=status.value if status else "",
            next=shown[-1].id if more and shown else None,
            usage=views.usage(recent),
        )

    @app.get("/tokens")
    @guard.page(sessions, role="admin")
    def tokens_page() -> str:
        return render("tokens", tokens=store.list_tokens(), made=None)

    @app.post("/tokens")
    @guard.page(sessions, role="admin")
    def create_token() -> str:
        forms = bottle.request.forms
        name, role = forms.get("name") or "", forms.get("role") or "submit"
        caps = {}
        for cap in models.Caps.NAMES:
            given = (forms.get(cap) or "").strip()
            if given and not given.isdigit():
                raise errors.BadInput(f"{cap} must be a whole number from 0, or empty", cap)
            caps[cap] = int(given) if given else None
        caps_made = models.Caps(**tokens.caps_from(caps))
        value = tokens.create(store, name, role, forms.get("allow_process") == "1", caps_made)
        made = {"name": name, "role": role, "token": value}
        return render("tokens", tokens=store.list_tokens(), made=made)

    @app.post("/tokens/<name>/revoke")
    @guard.page(sessions, role="admin")
    def revoke_token(name: str) -> None:
        if not store.revoke_token(name):
            raise errors.BadInput(f"no token named {name!r}", "name")
        bottle.redirect("/tokens", 303)


def _local(target: str | None) -> str:
    """Where to go after sign-in: a path of this site, never another one ("//host")."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return urllib.parse.quote(target, safe="/?=&%")


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        raise errors.BadInput("before must be a job id", "before") from None
