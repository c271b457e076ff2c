"""The web dashboard over real HTTP against a real coordinator: sign-in and sessions, roles,
what a page shows, what it refuses (cross-site forms, a view token's cancel), the security
headers, and that nothing a job says becomes markup. (Browser tests: next issue's part.)"""

from __future__ import annotations

import html
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from http.cookiejar import CookieJar
from typing import Any

import pytest

from gpubox.worker.gpu import write_fake_readings
from tests.conftest import Cluster, wait_until

EVIL = "<img src=x onerror=alert(1)>"


class Browser:
    """What a browser does that matters here: cookies, forms with their Origin, no script."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.jar = CookieJar()
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect()
        )

    def get(self, path: str) -> tuple[int, dict[str, str], str]:
        return self._open(urllib.request.Request(self.url + path))

    def post(
        self, path: str, fields: dict[str, str], origin: str | None = "same"
    ) -> tuple[int, dict[str, str], str]:
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if origin is not None:
            headers["Origin"] = self.url if origin == "same" else origin
        data = urllib.parse.urlencode(fields).encode()
        return self._open(urllib.request.Request(self.url + path, data, headers))

    def _open(self, request: urllib.request.Request) -> tuple[int, dict[str, str], str]:
        try:
            with self.opener.open(request, timeout=10) as answer:
                return answer.status, dict(answer.headers), answer.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read().decode()

    def sign_in(self, token: str) -> None:
        status, headers, _ = self.post("/login", {"token": token, "next": "/"})
        assert status == 303, status

    def csrf(self, path: str = "/") -> str:
        _, _, page = self.get(path)
        found = re.search(r'name="csrf" value="([^"]+)"', page)
        assert found, page[:500]
        return found.group(1)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the test looks at the 303 itself


def token(cluster: Cluster, name: str, role: str) -> str:
    made = cluster.client.call("POST", "/api/v1/tokens", {"name": name, "role": role})
    return str(made["token"])


@pytest.fixture()
def dash(make_cluster: Callable[..., Cluster]) -> tuple[Cluster, Browser]:
    cluster = make_cluster(workers=0)
    browser = Browser(cluster.url)
    browser.sign_in(cluster.token)
    return cluster, browser


def test_signing_in_turns_a_token_into_a_strict_http_only_session(make_cluster) -> None:
    cluster: Cluster = make_cluster(workers=0)
    browser = Browser(cluster.url)
    status, headers, _ = browser.get("/")
    assert status == 303 and headers["Location"].endswith("/login?next=/")
    assert browser.post("/login", {"token": "gpbx_wrong"})[0] == 401
    # A sign-in form posted from another site is refused, even with a good token.
    assert browser.post("/login", {"token": cluster.token}, origin="https://evil.example")[0] == 403
    status, headers, _ = browser.post("/login", {"token": cluster.token, "next": "//evil.example"})
    assert status == 303 and headers["Location"].endswith("/")  # never another site
    cookie = headers["Set-Cookie"]
    assert "gpubox_session=" in cookie and "HttpOnly" in cookie
    assert "Secure" not in cookie  # plain HTTP, and no https public_url
    assert "samesite=strict" in cookie.lower() and "Path=/" in cookie
    status, headers, page = browser.get("/")
    assert status == 200 and "Queue" in page
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    # Signing out ends the session.
    assert browser.post("/logout", {"csrf": browser.csrf()})[0] == 303
    assert browser.get("/")[0] == 303


def test_behind_a_tls_proxy_the_public_url_is_an_origin_and_the_cookie_is_secure(
    make_cluster,
) -> None:
    # The proxy speaks plain HTTP to the coordinator; people use https://gpubox.example.
    cluster: Cluster = make_cluster(workers=0, public_url="https://gpubox.example/")
    browser = Browser(cluster.url)
    fields = {"token": cluster.token, "next": "/"}
    status, headers, _ = browser.post("/login", fields, origin="https://gpubox.example")
    assert status == 303 and "Secure" in headers["Set-Cookie"]
    assert browser.post("/login", fields, origin="https://evil.example")[0] == 403
    assert browser.post("/login", fields, origin="http://gpubox.example")[0] == 403
    # Reached directly (an SSH tunnel), the dashboard's own origin still works.
    assert browser.post("/login", fields)[0] == 303
    # A form of a signed-in page, sent from the public origin. (The cookie is Secure, which
    # Python's cookie jar keeps from plain HTTP, as browsers do except on loopback: sent here
    # by hand.)
    session = headers["Set-Cookie"].split(";")[0]
    request = urllib.request.Request(cluster.url + "/", headers={"Cookie": session})
    page = urllib.request.urlopen(request, timeout=10).read().decode()
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf is not None
    form = urllib.parse.urlencode({"csrf": csrf.group(1)}).encode()
    for origin, status in (("https://evil.example", 403), ("https://gpubox.example", 303)):
        sent = urllib.request.Request(
            cluster.url + "/logout", form, {"Cookie": session, "Origin": origin}
        )
        assert browser._open(sent)[0] == status, origin


def test_the_queue_lists_jobs_in_start_order_with_why_they_wait_as_text(dash) -> None:
    cluster, browser = dash
    low = cluster.submit("img", ["true"], name=EVIL, gpus=1, labels={"team": "a"})
    high = cluster.submit("img", ["true"], name="urgent", priority=5)
    _, _, page = browser.get("/")
    assert EVIL not in page and html.escape(EVIL) in page
    rows = browser.get("/ui/queue")[2]
    assert rows.index(f'/jobs/{high["id"]}"') < rows.index(f'/jobs/{low["id"]}"')
    assert "no connected worker" in rows.lower() or "no worker" in rows.lower(), rows
    # The page refreshes its rows without a reload: a job submitted now is in the fragment.
    later = cluster.submit("img", ["true"], name="later")
    assert f'/jobs/{later["id"]}"' in browser.get("/ui/queue")[2]
    filtered = browser.get("/ui/queue?label=team%3Da")[2]
    assert f'/jobs/{low["id"]}"' in filtered and f'/jobs/{high["id"]}"' not in filtered
    assert 'hx-get="/ui/queue?' in browser.get("/?name=urg")[2]


def test_a_long_queue_says_how_much_of_it_is_listed_and_searched(dash, monkeypatch) -> None:
    from gpubox.coordinator.web import pages

    monkeypatch.setattr(pages, "QUEUE_ROWS", 2)
    cluster, browser = dash
    for name in ("first", "second", "third"):
        cluster.submit("img", ["true"], name=name)
    page = browser.get("/ui/queue")[2]
    assert "The first 2 of 3 queued jobs are listed." in page and "third" not in page
    page = browser.get("/ui/queue?name=third")[2]
    assert "No queued job matches the filters." in page
    assert "The first 2 of 3 queued jobs are searched." in page


def test_a_job_page_and_its_cancel_by_role(dash) -> None:
    cluster, admin = dash
    job = cluster.submit("img", ["true"], name="to-cancel")
    status, _, page = admin.get(f"/jobs/{job['id']}")
    assert status == 200
    assert f'data-job="{job["id"]}"' in page and 'id="log"' in page
    assert 'id="charts"' not in page and "asked for no GPU" in page  # nothing to chart
    with_gpu = cluster.submit("img", ["true"], name="with a GPU", gpus=1)
    assert 'id="charts"' in admin.get(f"/jobs/{with_gpu['id']}")[2]
    assert f'action="/jobs/{job["id"]}/cancel"' in page
    # A view token reads the page but is offered no cancel, and one it forges is refused.
    viewer = Browser(cluster.url)
    viewer.sign_in(token(cluster, "wall", "view"))
    _, _, seen = viewer.get(f"/jobs/{job['id']}")
    assert "to-cancel" in seen and "/cancel" not in seen
    csrf = viewer.csrf(f"/jobs/{job['id']}")
    assert viewer.post(f"/jobs/{job['id']}/cancel", {"csrf": csrf})[0] == 403
    # Without its CSRF token, or from another site, the admin's cancel is refused too.
    assert admin.post(f"/jobs/{job['id']}/cancel", {})[0] == 403
    csrf = admin.csrf(f"/jobs/{job['id']}")
    cross = admin.post(f"/jobs/{job['id']}/cancel", {"csrf": csrf}, origin="https://evil.example")
    assert cross[0] == 403
    assert admin.post(f"/jobs/{job['id']}/cancel", {"csrf": csrf}, origin=None)[0] == 403
    assert cluster.client.job(job["id"])["status"] == "QUEUED"
    assert admin.post(f"/jobs/{job['id']}/cancel", {"csrf": csrf})[0] == 303
    assert cluster.client.job(job["id"])["status"] == "CANCELLED"
    # A submit token may cancel its own jobs only.
    submitter = Browser(cluster.url)
    submitter.sign_in(token(cluster, "ci", "submit"))
    other = cluster.submit("img", ["true"])
    assert "/cancel" not in submitter.get(f"/jobs/{other['id']}")[2]
    assert submitter.get("/tokens")[0] == 403


def test_the_api_reads_with_a_session_but_never_writes_with_one(dash) -> None:
    cluster, browser = dash
    job = cluster.submit("img", ["true"])
    status, _, body = browser.get(f"/api/v1/jobs/{job['id']}")
    assert status == 200 and f'"id": {job["id"]}' in body
    assert browser.get(f"/api/v1/jobs/{job['id']}/telemetry")[0] == 200
    data = b'{"name": "x", "docker": {"image": "i"}}'
    request = urllib.request.Request(
        cluster.url + "/api/v1/jobs", data, {"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        browser.opener.open(request)
    assert refused.value.code == 401
    # A view token reads the API and may not write to it.
    viewer = token(cluster, "reader", "view")
    from gpubox.client import ApiError, Client

    reader = Client(cluster.url, viewer)
    assert reader.job(job["id"])["id"] == job["id"]
    with pytest.raises(ApiError) as forbidden:
        reader.submit({"name": "x", "docker": {"image": "i"}})
    assert forbidden.value.status == 403


def test_a_session_ends_with_its_token(dash) -> None:
    cluster, admin = dash
    viewer = Browser(cluster.url)
    viewer.sign_in(token(cluster, "temp", "view"))
    assert viewer.get("/")[0] == 200
    cluster.client.call("DELETE", "/api/v1/tokens/temp")
    assert viewer.get("/")[0] == 303
    status, headers, _ = viewer.get("/ui/queue")
    # The live page goes there (header names are case-insensitive; Bottle writes Hx-).
    assert status == 401 and {k.lower(): v for k, v in headers.items()}["hx-redirect"] == "/login"


def test_tokens_page_makes_a_token_shown_once_and_revokes(dash) -> None:
    cluster, admin = dash
    csrf = admin.csrf("/tokens")
    status, _, page = admin.post("/tokens", {"csrf": csrf, "name": "new-ci", "role": "submit"})
    assert status == 200
    made = re.search(r'<code class="token">(gpbx_[^<]+)</code>', page)
    assert made is not None
    assert made.group(1) not in admin.get("/tokens")[2]  # shown that once only
    from gpubox.client import Client

    assert Client(cluster.url, made.group(1)).jobs()["jobs"] == []
    assert admin.post("/tokens/new-ci/revoke", {"csrf": csrf})[0] == 303
    assert "new-ci" not in admin.get("/tokens")[2]
    # caps: made with the token, shown in the list; a bad one refused, naming it
    form = {"csrf": csrf, "name": "capped", "role": "submit", "max_gpus": "8", "max_queued": ""}
    assert admin.post("/tokens", form)[0] == 200
    assert "<td>max_gpus 8</td>" in admin.get("/tokens")[2]
    assert [
        t["max_gpus"]
        for t in cluster.client.call("GET", "/api/v1/tokens")["tokens"]
        if t["name"] == "capped"
    ] == [8]
    status, _, page = admin.post("/tokens", {**form, "name": "bad", "max_running": "-1"})
    assert status == 400 and "max_running must be a whole number" in page


def test_workers_and_history_show_gpus_their_jobs_and_gpu_hours(dash) -> None:
    cluster, browser = dash
    cluster.add_worker(
        runtime="process", fake_gpus="2", telemetry_interval_s=0.1, telemetry_point_s=0.3
    )
    write_fake_readings(cluster.coordinator.config.state_dir, {"*": {"utilization": 70}})
    held = cluster.submit("img", ["sleep", "30"], gpus=1, name="holder")
    gpu = cluster.wait(held["id"], ("RUNNING",))["result"]["gpus"][0]

    def shown() -> str | None:
        page = browser.get("/ui/workers")[2]
        return page if ">70<" in page else None

    page = wait_until(shown, 10, "the GPU's reading on the workers page")
    row = next(r for r in page.split("<tr>") if gpu in r)
    assert f'/jobs/{held["id"]}"' in row and ">70<" in row
    short = cluster.submit("img", ["sleep", "1"], gpus=1, name="short")
    assert cluster.wait(short["id"])["status"] == "FINISHED"
    history = browser.get("/history")[2]
    assert f'/jobs/{short["id"]}"' in history and "GPU-hours" in history
    assert browser.get("/history?status=FINISHED")[2].count("/jobs/") >= 1
    cluster.client.cancel(held["id"])
    cluster.wait(held["id"])


def test_static_files_come_with_the_same_headers(dash) -> None:
    _, browser = dash
    status, headers, body = browser.get("/static/app.js")
    assert status == 200 and "Content-Security-Policy" in headers and body
    for vendored in ("htmx.min.js", "uPlot.iife.min.js", "uPlot.min.css", "README.md"):
        assert browser.get(f"/static/vendor/{vendored}")[0] == 200, vendored
    assert browser.get("/static/../pages.py")[0] in (403, 404)


def test_the_dashboard_can_be_turned_off(make_cluster) -> None:
    cluster: Cluster = make_cluster(workers=0, dashboard=False)
    assert Browser(cluster.url).get("/login")[0] == 404
    assert cluster.client.jobs()["jobs"] == []


def test_an_error_page_escapes_its_message(dash) -> None:
    _, browser = dash
    status, _, page = browser.get("/history?status=" + urllib.parse.quote(EVIL))
    assert status == 400 and EVIL not in page


def test_job_names_in_every_page_are_text(dash) -> None:
    cluster, browser = dash
    job = cluster.submit("img", ["true"], name=EVIL, labels={"k": EVIL})
    for path in ("/", "/ui/queue", f"/jobs/{job['id']}", "/history"):
        page = browser.get(path)[2]
        assert EVIL not in page, path
