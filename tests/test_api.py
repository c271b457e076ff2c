"""The HTTP API (v1) over real HTTP: status codes, the one JSON error shape, auth, paging, logs.

Raw `http.client` requests, so bodies and headers are exactly what a test says. Most tests need
no worker: checks that leave no trace (bad input, bad tokens, unknown ids) share one
coordinator per module (`api`), to keep the file fast; tests that need a clean or specially
configured store use `make_cluster(workers=0)` (`bare`); those that run a container use the
`cluster` fixture.
"""

from __future__ import annotations

import copy
import json
import urllib.parse
from collections.abc import Callable, Iterator
from datetime import datetime
from http.client import HTTPConnection, HTTPMessage
from typing import Any, NamedTuple

import pytest
import zmq

from gpubox import config as cfg
from gpubox import keys, models
from gpubox.client import Client
from gpubox.coordinator import tokens
from gpubox.coordinator.server import Coordinator
from tests import openapi_check
from tests.conftest import IMAGE, Cluster, wait_until

JOBS = "/api/v1/jobs"
DEFAULT = object()  # "the cluster's admin token" / "do not check"
DELETE = object()  # "remove this field" in spec() and docker_spec()
BASE_SPEC: dict[str, Any] = {"name": "api-test", "docker": {"image": IMAGE}}


class Response(NamedTuple):
    status: int
    headers: HTTPMessage
    body: Any  # decoded JSON when the answer is strict JSON, else the text
    raw: bytes


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def request(
    cluster: Cluster,
    method: str,
    path: str,
    body: bytes | str | dict[str, Any] | list[Any] | None = None,
    headers: dict[str, str | bytes] | None = None,
    auth: Any = DEFAULT,
) -> Response:
    """One HTTP request to the cluster's coordinator.

    `auth` is the whole Authorization value (str or raw bytes), None for no header, or the
    default `Bearer <cluster.token>`. A dict or list body is sent as JSON. An answer that the
    API's OpenAPI document does not describe fails the test (tests/openapi_check.py; off with
    GPUBOX_TEST_OPENAPI=0).
    """
    url = urllib.parse.urlsplit(cluster.url)
    if isinstance(body, dict | list):
        data: bytes | None = json.dumps(body).encode()
    elif isinstance(body, str):
        data = body.encode()
    else:
        data = body
    all_headers: dict[str, str | bytes] = {}
    if auth is DEFAULT:
        all_headers["Authorization"] = f"Bearer {cluster.token}"
    elif auth is not None:
        all_headers["Authorization"] = auth
    if data is not None:
        all_headers["Content-Type"] = "application/json"
        all_headers["Content-Length"] = str(len(data))
    elif method in ("POST", "PUT"):
        all_headers["Content-Length"] = "0"
    all_headers.update(headers or {})
    conn = HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=15)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in all_headers.items():
            conn.putheader(name, value)
        conn.endheaders(data)
        response = conn.getresponse()
        raw = response.read()
        status, message = response.status, response.headers
    finally:
        conn.close()
    if openapi_check.ENABLED:  # the answer is one the API's OpenAPI document describes
        openapi_check.check(method, path, status, message, raw)
    try:
        parsed: Any = json.loads(raw, parse_constant=_reject_constant)
    except ValueError:
        parsed = raw.decode("utf-8", "replace")
    return Response(status, message, parsed, raw)


def assert_error(
    response: Response, status: int, code: str | None = None, field: Any = DEFAULT
) -> dict[str, Any]:
    """The answer is `status` with a body {"error": {"code", "message", "field"?}}.

    `field`: a name, a tuple of acceptable names, or DEFAULT to not check it."""
    assert response.status == status, (response.status, response.raw[:500])
    content_type = response.headers.get("Content-Type", "")
    assert content_type.startswith("application/json"), (content_type, response.raw[:500])
    body = response.body
    assert isinstance(body, dict) and set(body) == {"error"}, response.raw[:500]
    error = body["error"]
    assert isinstance(error, dict), error
    assert set(error) <= {"code", "message", "field"}, error
    assert isinstance(error.get("code"), str) and error["code"], error
    assert isinstance(error.get("message"), str) and error["message"], error
    if "field" in error:
        assert isinstance(error["field"], str) and error["field"], error
    if code is not None:
        assert error["code"] == code, error
    if field is not DEFAULT:
        allowed = field if isinstance(field, tuple) else (field,)
        assert error.get("field") in allowed, error
    return error  # type: ignore[no-any-return]


def spec(**changes: Any) -> dict[str, Any]:
    """A valid submission with top-level fields changed (a value of DELETE removes it)."""
    result = copy.deepcopy(BASE_SPEC)
    for key, value in changes.items():
        if value is DELETE:
            result.pop(key, None)
        else:
            result[key] = value
    return result


def docker_spec(**changes: Any) -> dict[str, Any]:
    """A valid submission with fields of `docker` changed (DELETE removes one)."""
    result = copy.deepcopy(BASE_SPEC)
    for key, value in changes.items():
        if value is DELETE:
            result["docker"].pop(key, None)
        else:
            result["docker"][key] = value
    return result


def submit(cluster: Cluster, body: Any = None, **changes: Any) -> dict[str, Any]:
    response = request(cluster, "POST", JOBS, body if body is not None else spec(**changes))
    assert response.status == 201, response.raw[:500]
    return response.body  # type: ignore[no-any-return]


def newest_id(cluster: Cluster) -> int:
    """The highest job id so far, 0 if none."""
    ids = list_ids(cluster, "?limit=1")
    return ids[0] if ids else 0


def list_ids(cluster: Cluster, query: str = "") -> list[int]:
    response = request(cluster, "GET", f"{JOBS}{query}")
    assert response.status == 200, response.raw[:500]
    return [job["id"] for job in response.body["jobs"]]


def contains_key(value: Any, key: str) -> bool:
    if isinstance(value, dict):
        return key in value or any(contains_key(item, key) for item in value.values())
    if isinstance(value, list):
        return any(contains_key(item, key) for item in value)
    return False


@pytest.fixture()
def bare(make_cluster: Callable[..., Cluster]) -> Cluster:
    """A fresh coordinator without workers: jobs stay QUEUED."""
    return make_cluster(workers=0)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One coordinator without workers for the whole module, set up like conftest's clusters.

    Stopping a coordinator can take up to a second (Waitress's poll timeout), so tests whose
    requests change nothing share this one instead of each starting their own."""
    state = tmp_path_factory.mktemp("api-state")
    config = cfg.CoordinatorConfig(
        state_dir=str(state),
        db=f"sqlite:///{state}/gpubox.db",
        http="127.0.0.1:0",
        bind="tcp://127.0.0.1:*",
        http_threads=8,
        heartbeat_interval_s=0.5,
        liveness_s=3.0,
    )
    config.validate()
    context = zmq.Context()
    keys.init(str(state))
    coordinator = Coordinator(config)
    coordinator.start()
    token = (state / "token").read_text().strip()
    url = coordinator.http_url
    cluster = Cluster(coordinator, Client(url, token), url, token, context)
    try:
        yield cluster
    finally:
        cluster.stop()
        context.destroy(linger=0)


# --- POST /jobs: success ----------------------------------------------------------------------


def test_create_returns_201_with_job_location_and_queued_status(api: Cluster):
    response = request(
        api,
        "POST",
        JOBS,
        spec(
            description="d",
            priority=5,
            gpus=0,
            labels={"pool": "ci"},
            timeout=30,
            max_retries=2,
            metadata={"commit": "abc", "n": [1, 2.5, None]},
            docker={"image": IMAGE, "command": "sh -c 'echo hi'", "env": {"A_1": "x y"}},
        ),
    )
    assert response.status == 201, response.raw
    assert response.headers["Content-Type"].startswith("application/json")
    job = response.body
    assert isinstance(job["id"], int) and job["id"] >= 1
    assert job["status"] == "QUEUED"
    assert job["name"] == "api-test" and job["description"] == "d"
    assert job["priority"] == 5 and job["gpus"] == 0 and job["max_retries"] == 2
    assert job["labels"] == {"pool": "ci"} and job["timeout"] == 30
    assert job["metadata"] == {"commit": "abc", "n": [1, 2.5, None]}
    assert job["docker"]["image"] == IMAGE
    assert job["docker"]["command"] == ["sh", "-c", "echo hi"]
    assert job["docker"]["env"] == {"A_1": "x y"}
    assert job["created_at"].endswith("Z") and job["updated_at"].endswith("Z")
    location = response.headers["Location"]
    assert location.endswith(f"/api/v1/jobs/{job['id']}")
    again = request(api, "GET", urllib.parse.urlsplit(location).path)
    assert again.status == 200
    # A queued job says why it waits (no worker here), from the moment it is made
    assert isinstance(job.pop("queue_reason"), str) and isinstance(
        again.body.pop("queue_reason"), str
    )
    assert again.body == job


def test_ids_increase(api: Cluster):
    ids = [submit(api)["id"] for _ in range(4)]
    assert ids == sorted(ids) and len(set(ids)) == 4


@pytest.mark.parametrize(
    "body",
    [
        spec(name="n" * 200),
        spec(gpus=0),
        spec(gpus=64),
        spec(priority=-3),
        spec(timeout=0.5),
        spec(timeout=None),
        spec(max_retries=0),
        spec(labels={}),
        docker_spec(command=["echo", "a b"]),
        docker_spec(command="echo 'a b'"),
        docker_spec(env={"_X": ""}),
    ],
    ids=[
        "name-200",
        "gpus-0",
        "gpus-64",
        "priority-negative",
        "timeout-float",
        "timeout-null",
        "max_retries-0",
        "labels-empty",
        "command-list",
        "command-string",
        "env-underscore",
    ],
)
def test_valid_boundaries_are_accepted(api: Cluster, body: dict[str, Any]):
    response = request(api, "POST", JOBS, body)
    assert response.status == 201, response.raw


def test_auth_is_write_only(api: Cluster):
    password = "s3cr3t-pa55w0rd-xyz"
    body = docker_spec(auth={"username": "robot", "password": password})
    created = request(api, "POST", JOBS, body)
    assert created.status == 201, created.raw
    job_id = created.body["id"]
    answers = [
        created,
        request(api, "GET", f"{JOBS}/{job_id}"),
        request(api, "GET", JOBS),
        request(api, "POST", f"{JOBS}/{job_id}/cancel"),
    ]
    for answer in answers:
        assert answer.status in (200, 201), answer.raw
        assert not contains_key(answer.body, "auth"), answer.body
        assert password.encode() not in answer.raw
        assert b"robot" not in answer.raw


# --- POST /jobs: bad input --------------------------------------------------------------------

BAD_SPECS = [
    ("gpus-string", spec(gpus="2"), "gpus"),
    ("gpus-true", spec(gpus=True), "gpus"),
    ("gpus-negative", spec(gpus=-1), "gpus"),
    ("gpus-float", spec(gpus=1.5), "gpus"),
    ("gpus-65", spec(gpus=65), "gpus"),
    ("priority-string", spec(priority="high"), "priority"),
    ("docker-missing", spec(docker=DELETE), "docker"),
    ("docker-string", spec(docker=IMAGE), "docker"),
    ("docker-list", spec(docker=[IMAGE]), "docker"),
    ("image-missing", docker_spec(image=DELETE), "docker.image"),
    ("image-empty", docker_spec(image=""), "docker.image"),
    ("image-not-string", docker_spec(image=5), "docker.image"),
    ("name-missing", spec(name=DELETE), "name"),
    ("name-201", spec(name="n" * 201), "name"),
    ("name-empty", spec(name=""), "name"),
    ("unknown-top-level", spec(gpu=1), "gpu"),
    ("unknown-docker-privileged", docker_spec(privileged=True), "docker.privileged"),
    ("unknown-docker-volumes", docker_spec(volumes=["/:/host"]), "docker.volumes"),
    ("env-value-int", docker_spec(env={"A": 1}), ("docker.env", "docker.env.A")),
    ("env-value-null", docker_spec(env={"A": None}), ("docker.env", "docker.env.A")),
    ("env-bad-name-digit", docker_spec(env={"1A": "x"}), ("docker.env", "docker.env.1A")),
    ("env-bad-name-dash", docker_spec(env={"A-B": "x"}), ("docker.env", "docker.env.A-B")),
    ("env-bad-name-equals", docker_spec(env={"A=B": "x"}), ("docker.env", "docker.env.A=B")),
    ("env-list", docker_spec(env=["A=1"]), "docker.env"),
    ("labels-list", spec(labels=["gpu"]), "labels"),
    ("labels-string", spec(labels="pool=ci"), "labels"),
    ("timeout-0", spec(timeout=0), "timeout"),
    ("timeout-negative", spec(timeout=-1), "timeout"),
    ("timeout-string", spec(timeout="10"), "timeout"),
    ("max_retries-negative", spec(max_retries=-1), "max_retries"),
    ("metadata-list", spec(metadata=[1, 2]), "metadata"),
    ("command-non-string", docker_spec(command=["echo", 1]), "docker.command"),
    ("command-unclosed-quote", docker_spec(command="echo 'unclosed"), "docker.command"),
    ("command-object", docker_spec(command={"a": "b"}), "docker.command"),
]


@pytest.mark.parametrize(
    ("body", "field"),
    [pytest.param(body, field, id=name) for name, body, field in BAD_SPECS],
)
def test_bad_spec_is_400_naming_the_field(api: Cluster, body: dict[str, Any], field: Any):
    before = newest_id(api)
    assert_error(request(api, "POST", JOBS, body), 400, "bad_input", field)
    assert newest_id(api) == before  # nothing was created


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b'{"name": "a", "docker": ', id="truncated"),
        pytest.param(b"\xff\xfe\xfa", id="invalid-utf8"),
        pytest.param(
            b'{"name": "caf\xe9", "docker": {"image": "busybox"}}', id="invalid-utf8-in-string"
        ),
        pytest.param(b"[]", id="array"),
        pytest.param(b'"x"', id="string"),
        pytest.param(b"3", id="number"),
        pytest.param(b"null", id="null"),
        pytest.param(b"", id="empty"),
    ],
)
def test_body_that_is_not_a_json_object_is_400(api: Cluster, raw: bytes):
    before = newest_id(api)
    assert_error(request(api, "POST", JOBS, raw), 400, "bad_input")
    assert newest_id(api) == before


# Text no store or worker link can hold, as JSON can carry it: a lone surrogate escape (what
# a shell argument that is not UTF-8 becomes) or NUL. Before, each was a 500 at the insert (NUL
# on PostgreSQL only), or, in a command, a job that failed at every dispatch and never ran.
BAD_TEXT = [
    ("surrogate-name", spec(name="\ud800"), "name"),
    ("surrogate-description", spec(description="caf\udce9"), "description"),
    ("surrogate-image", docker_spec(image="\udce9"), "docker.image"),
    ("surrogate-command", docker_spec(command=["echo", "caf\udce9"]), "docker.command[1]"),
    ("surrogate-env", docker_spec(env={"A": "\ud800"}), "docker.env.A"),
    ("surrogate-label-key", spec(labels={"\ud800": "x"}), "labels"),
    ("surrogate-secret", docker_spec(secrets={"TOKEN": "s\ud800cret"}), "docker.secrets.TOKEN"),
    ("surrogate-metadata", spec(metadata={"a": ["\ud800"]}), "metadata.a[0]"),
    ("surrogate-field-name", {**BASE_SPEC, "\ud800": 1}, None),
    ("nul-name", spec(name="a\x00b"), "name"),
    ("nul-description", spec(description="\x00"), "description"),
    ("nul-label", spec(labels={"pool": "a\x00"}), "labels.pool"),
    ("nul-command", docker_spec(command=["echo", "a\x00"]), "docker.command[1]"),
]


def test_text_no_store_can_hold_is_400_naming_the_field(bare: Cluster):
    # one coordinator per store for every case: starting one per case cost ~20 s
    for name, body, field in BAD_TEXT:
        raw = json.dumps(body).encode()  # ASCII: the surrogates travel as \\ud800 escapes
        error = assert_error(request(bare, "POST", JOBS, raw), 400, "bad_input")
        assert error.get("field") == field, (name, error)
    assert newest_id(bare) == 0  # nothing was created
    # NUL in metadata is stored as JSON, so it is kept, on every backend
    made = request(bare, "POST", JOBS, spec(metadata={"raw": "a\x00b"}))
    assert made.status == 201, made.raw[:300]
    assert request(bare, "GET", f"{JOBS}/{made.body['id']}").body["metadata"] == {"raw": "a\x00b"}


def test_followers_hold_no_thread_and_past_the_stream_cap_get_503(
    make_cluster: Callable[..., Cluster],
):
    # 2 HTTP threads and 20 follow streams: were a stream to hold a thread, the third would
    # hang, and /healthz and cancel with it. Past --http-streams a follower gets 503 busy.
    cluster = make_cluster(workers=0, http_threads=2, http_streams=20)
    job = request(cluster, "POST", JOBS, spec()).body  # queued for good: no worker
    url = urllib.parse.urlsplit(cluster.url)
    path = f"{JOBS}/{job['id']}/logs?follow=1&format=ndjson"
    streams = []

    def follow() -> tuple[HTTPConnection, Any]:
        conn = HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=15)
        conn.request("GET", path, headers={"Authorization": f"Bearer {cluster.token}"})
        return conn, conn.getresponse()

    try:
        for _ in range(20):
            conn, answer = follow()
            assert answer.status == 200 and answer.readline() == b"\n"
            streams.append((conn, answer))
        refused = request(cluster, "GET", path)
        error = assert_error(refused, 503, "busy")
        assert "20 log followers and 0 waiters are connected" in error["message"]
        assert request(cluster, "GET", "/healthz", auth=None).status == 200
        assert request(cluster, "GET", f"{JOBS}/{job['id']}").status == 200
        gone, gone_answer = streams.pop()  # one goes: its place is given back once noticed
        gone_answer.close()
        gone.close()
        conn, answer = wait_until(
            lambda: (made := follow())[1].status == 200 and made, 10, "a free follower place"
        )
        streams.append((conn, answer))
        assert request(cluster, "POST", f"{JOBS}/{job['id']}/cancel").status == 200
        for _, answer in streams:  # every stream ends, cleanly, with the job's end
            records = [json.loads(line) for line in answer.read().splitlines() if line]
            assert records[-1]["end"] is True and records[-1]["status"] == "CANCELLED"
    finally:
        for conn, _ in streams:
            conn.close()


def test_a_number_too_long_to_read_is_400_not_500(api: Cluster):
    raw = b'{"name": "a", "priority": 1' + b"0" * 5000 + b', "docker": {"image": "x"}}'
    assert_error(request(api, "POST", JOBS, raw), 400, "bad_input")


def test_deeply_nested_json_is_400_not_500(api: Cluster):
    # 100 kB, well under the 1 MiB limit, but deeper than Python's json module recurses.
    assert_error(request(api, "POST", JOBS, b"[" * 100_000), 400, "bad_input")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_json_number_constants_are_400(bare: Cluster, constant: str):
    # NaN/Infinity are not JSON (RFC 8259); echoing them back would make every later
    # GET /jobs answer unparseable by strict JSON clients.
    raw = json.dumps(spec(metadata={"x": "PLACEHOLDER"})).replace('"PLACEHOLDER"', constant)
    assert_error(request(bare, "POST", JOBS, raw), 400, "bad_input")
    listing = request(bare, "GET", JOBS)
    assert listing.status == 200 and isinstance(listing.body, dict), listing.raw[:500]


def _body_of_size(size: int) -> bytes:
    """A JSON job submission of exactly `size` bytes (padded in its description)."""
    empty = json.dumps(spec(description="")).encode()
    raw = json.dumps(spec(description="x" * (size - len(empty)))).encode()
    assert len(raw) == size
    return raw


@pytest.mark.parametrize("size", [1001, 1500, 2000, 5000])
def test_body_over_the_limit_is_413(make_cluster: Callable[..., Cluster], size: int):
    # Waitress answers it itself (plain text), from the Content-Length alone: see
    # test_http_attacks.py for a body it is never made to read.
    cluster = make_cluster(workers=0, max_body_bytes=1000)
    assert request(cluster, "POST", JOBS, _body_of_size(size)).status == 413
    assert list_ids(cluster) == []


def test_body_at_the_limit_is_accepted(make_cluster: Callable[..., Cluster]):
    cluster = make_cluster(workers=0, max_body_bytes=1000)
    response = request(cluster, "POST", JOBS, _body_of_size(1000))
    assert response.status == 201, response.raw


# --- authentication ---------------------------------------------------------------------------

BAD_AUTH = [
    pytest.param(None, id="no-header"),
    pytest.param("Basic dXNlcjpwYXNz", id="basic-scheme"),
    pytest.param("Bearer ", id="bearer-nothing"),
    pytest.param("Bearer", id="bearer-no-space"),
    pytest.param("Bearer gpbx_not-a-real-token", id="wrong-token"),
    pytest.param("Token gpbx_x", id="other-scheme"),
    pytest.param("Bearer tök".encode("latin-1"), id="non-ascii-latin1"),
    pytest.param("Bearer tök".encode(), id="non-ascii-utf8"),
]
AUTH_ENDPOINTS = [
    ("GET", JOBS),
    ("POST", JOBS),
    ("GET", JOBS + "/{id}"),
    ("POST", JOBS + "/{id}/cancel"),
    ("GET", JOBS + "/{id}/logs"),
    ("GET", "/api/v1/workers"),
]


def assert_unauthorized(response: Response) -> None:
    assert_error(response, 401, "unauthorized")
    assert response.headers.get("WWW-Authenticate", "").lower().startswith("bearer")


@pytest.mark.parametrize("auth", BAD_AUTH)
def test_bad_or_missing_token_is_401_on_every_endpoint(api: Cluster, auth: Any):
    job_id = submit(api)["id"]
    for method, template in AUTH_ENDPOINTS:
        path = template.format(id=job_id)
        body = spec() if method == "POST" and path == JOBS else None
        assert_unauthorized(request(api, method, path, body, auth=auth))
    # Nothing happened: no job created, the job not cancelled.
    assert newest_id(api) == job_id
    assert request(api, "GET", f"{JOBS}/{job_id}").body["status"] == "QUEUED"


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_bearer_scheme_is_case_insensitive(api: Cluster, scheme: str):
    response = request(api, "GET", JOBS, auth=f"{scheme} {api.token}")
    assert response.status == 200, response.raw


def test_revoked_token_is_401(api: Cluster):
    store = api.coordinator.store
    assert store is not None
    token = tokens.create(store, "ci", "submit")
    ok = request(api, "POST", JOBS, spec(), auth=f"Bearer {token}")
    assert ok.status == 201, ok.raw
    assert request(api, "GET", JOBS, auth=f"Bearer {token}").status == 200
    assert store.revoke_token("ci")
    assert_unauthorized(request(api, "GET", JOBS, auth=f"Bearer {token}"))
    assert_unauthorized(request(api, "POST", JOBS, spec(), auth=f"Bearer {token}"))
    # The admin token is untouched.
    assert request(api, "GET", JOBS).status == 200


def test_healthz_needs_no_token(api: Cluster):
    response = request(api, "GET", "/healthz", auth=None)
    assert response.status == 200, response.raw
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.body["status"] == "ok"


# --- GET /jobs/<id>, unknown paths and methods ------------------------------------------------


def test_get_job(api: Cluster):
    job = submit(api)
    response = request(api, "GET", f"{JOBS}/{job['id']}")
    assert response.status == 200
    assert isinstance(response.body.pop("queue_reason"), str)  # queued: says why
    job.pop("queue_reason")
    # Where it stands: the submit's answer may count the queue as it was up to 0.1 s before.
    assert response.body.pop("queue_place")["place"] >= 1
    assert job.pop("queue_place")["place"] >= 1
    assert response.body == job


def test_a_queued_job_says_no_worker_is_connected(api: Cluster):
    job = submit(api)
    wait_until(
        lambda: (
            request(api, "GET", f"{JOBS}/{job['id']}").body["queue_reason"]
            == "no worker is connected"
        ),
        10,
        "the reason from the broker's next round",
    )
    assert api.client.jobs()["jobs"][0]["queue_reason"] == "no worker is connected"  # the list too


@pytest.mark.parametrize("job_id", [999_999, 2**63 - 1, 2**63, 10**30])
def test_unknown_job_id_is_404_everywhere(api: Cluster, job_id: int):
    assert_error(request(api, "GET", f"{JOBS}/{job_id}"), 404, "not_found")
    assert_error(request(api, "POST", f"{JOBS}/{job_id}/cancel"), 404, "not_found")
    assert_error(request(api, "GET", f"{JOBS}/{job_id}/logs"), 404, "not_found")


@pytest.mark.parametrize(
    "path", [f"{JOBS}/abc", f"{JOBS}/-1", f"{JOBS}/1.5", "/api/v1/nope", "/api/v2/jobs", "/api"]
)
def test_unknown_path_is_404_json(api: Cluster, path: str):
    assert_error(request(api, "GET", path), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "template"),
    [
        ("DELETE", JOBS + "/{id}"),
        ("PUT", JOBS + "/{id}"),
        ("PATCH", JOBS + "/{id}"),
        ("DELETE", JOBS),
        ("GET", JOBS + "/{id}/cancel"),
    ],
)
def test_wrong_method_is_405_json(api: Cluster, method: str, template: str):
    job_id = submit(api)["id"]
    assert_error(request(api, method, template.format(id=job_id)), 405, "method_not_allowed")
    assert request(api, "GET", f"{JOBS}/{job_id}").body["status"] == "QUEUED"


# --- GET /jobs --------------------------------------------------------------------------------


def test_list_is_newest_first(bare: Cluster):
    ids = [submit(bare, name=f"j{i}")["id"] for i in range(3)]
    response = request(bare, "GET", JOBS)
    assert response.status == 200, response.raw
    assert [job["id"] for job in response.body["jobs"]] == ids[::-1]
    assert response.body["next"] is None


@pytest.mark.parametrize("status", ["CANCELLED", "cancelled", "Cancelled"])
def test_status_filter_is_case_insensitive(bare: Cluster, status: str):
    ids = [submit(bare)["id"] for _ in range(4)]
    for job_id in ids[1::2]:
        assert request(bare, "POST", f"{JOBS}/{job_id}/cancel").status == 200
    assert list_ids(bare, f"?status={status}") == ids[1::2][::-1]
    assert list_ids(bare, "?status=queued") == ids[0::2][::-1]
    assert list_ids(bare, "?status=Queued&limit=1") == ids[2:3]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("status=BOGUS", "status"),
        ("limit=0", "limit"),
        ("limit=-1", "limit"),
        ("limit=abc", "limit"),
        ("limit=1001", "limit"),
        ("limit=1.5", "limit"),
        ("before=x", "before"),
        ("before=0", "before"),
        ("name=%ff", "name"),  # not UTF-8: was a 500 from Bottle's decode()
        ("label=zone%3D%c3", "label"),
    ],
)
def test_bad_list_query_is_400_naming_the_field(api: Cluster, query: str, field: str):
    assert_error(request(api, "GET", f"{JOBS}?{query}"), 400, "bad_input", field)


def test_paging_gives_every_job_once_and_ends_with_null_next(bare: Cluster):
    ids = [submit(bare, name=f"p{i}")["id"] for i in range(5)]
    seen: list[int] = []
    pages: list[list[int]] = []
    query = "?limit=2"
    for _ in range(10):
        response = request(bare, "GET", f"{JOBS}{query}")
        assert response.status == 200, response.raw
        page = [job["id"] for job in response.body["jobs"]]
        assert len(page) <= 2
        pages.append(page)
        seen.extend(page)
        nxt = response.body["next"]
        if nxt is None:
            break
        assert isinstance(nxt, int)
        query = f"?limit=2&before={nxt}"
    else:
        pytest.fail(f"paging never ended: {pages}")
    assert seen == sorted(ids, reverse=True)
    assert pages == [ids[4:2:-1], ids[2:0:-1], ids[:1]]


def test_a_full_last_page_says_there_is_no_next(bare: Cluster):
    ids = [submit(bare, name=f"p{i}")["id"] for i in range(4)]
    response = request(bare, "GET", f"{JOBS}?limit=4")
    assert [job["id"] for job in response.body["jobs"]] == ids[::-1]
    assert response.body["next"] is None  # exactly a page: nothing follows


# --- POST /jobs/<id>/cancel ------------------------------------------------------------------


def test_cancel_queued_then_again_is_409(api: Cluster):
    job = submit(api)
    response = request(api, "POST", f"{JOBS}/{job['id']}/cancel")
    assert response.status == 200, response.raw
    assert response.body["id"] == job["id"] and response.body["status"] == "CANCELLED"
    assert request(api, "GET", f"{JOBS}/{job['id']}").body["status"] == "CANCELLED"
    assert_error(request(api, "POST", f"{JOBS}/{job['id']}/cancel"), 409, "wrong_state")
    assert request(api, "GET", f"{JOBS}/{job['id']}").body["status"] == "CANCELLED"


def test_cancel_unknown_job_is_404(api: Cluster):
    assert_error(request(api, "POST", f"{JOBS}/424242/cancel"), 404, "not_found")


# --- with a worker: a finished job ------------------------------------------------------------


@pytest.mark.docker
def test_cancel_finished_job_is_409(cluster: Cluster):
    job = cluster.submit(IMAGE, ["true"])
    assert cluster.wait(job["id"])["status"] == "FINISHED"
    assert_error(request(cluster, "POST", f"{JOBS}/{job['id']}/cancel"), 409, "wrong_state")
    assert request(cluster, "GET", f"{JOBS}/{job['id']}").body["status"] == "FINISHED"


@pytest.mark.docker
def test_logs_of_a_finished_job(cluster: Cluster):
    # The sleeps make the order of stdout and stderr lines well defined: Docker timestamps
    # each stream's lines as it reads its pipe, so lines written microseconds apart to
    # different streams can carry timestamps in the other order.
    job = cluster.submit(IMAGE, ["sh", "-c", "echo a; sleep 0.1; echo b >&2; sleep 0.1; echo c"])
    assert cluster.wait(job["id"])["status"] == "FINISHED"
    path = f"{JOBS}/{job['id']}/logs"

    text = request(cluster, "GET", path)
    assert text.status == 200, text.raw
    assert text.headers["Content-Type"].startswith("text/plain")
    assert text.raw == b"a\nb\nc\n"

    ndjson = request(cluster, "GET", f"{path}?format=ndjson")
    assert ndjson.status == 200, ndjson.raw
    assert "ndjson" in ndjson.headers["Content-Type"]
    records = [json.loads(line) for line in ndjson.raw.decode().splitlines() if line.strip()]
    assert [set(record) for record in records] == [{"seq", "ts", "stream", "line"}] * 3
    assert [(r["seq"], r["stream"], r["line"]) for r in records] == [
        (1, "stdout", "a"),
        (2, "stderr", "b"),
        (3, "stdout", "c"),
    ]
    assert all(isinstance(r["ts"], str) and r["ts"].endswith("Z") for r in records)

    assert request(cluster, "GET", f"{path}?since=2").raw == b"c\n"
    tail = request(cluster, "GET", f"{path}?since=2&format=ndjson")
    assert [json.loads(line)["line"] for line in tail.raw.decode().splitlines()] == ["c"]
    assert request(cluster, "GET", f"{path}?since=3").raw == b""
    # one page: at most `limit` lines after `since`
    assert request(cluster, "GET", f"{path}?since=0&limit=2").raw == b"a\nb\n"
    assert request(cluster, "GET", f"{path}?since=1&limit=1").raw == b"b\n"


# --- GET /jobs/<id>/logs: bad input -----------------------------------------------------------


def test_logs_of_unknown_job_is_404(api: Cluster):
    assert_error(request(api, "GET", f"{JOBS}/31337/logs"), 404, "not_found")


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("format=xml", "format"),
        ("since=-1", "since"),
        ("since=abc", "since"),
        ("follow=maybe", "follow"),
        ("limit=0", "limit"),
        ("limit=5001", "limit"),
        ("limit=10&follow=1", "limit"),
    ],
)
def test_bad_logs_query_is_400_naming_the_field(api: Cluster, query: str, field: str):
    job = submit(api)
    assert_error(request(api, "GET", f"{JOBS}/{job['id']}/logs?{query}"), 400, "bad_input", field)


def test_logs_of_a_queued_job_are_empty(api: Cluster):
    job = submit(api)
    response = request(api, "GET", f"{JOBS}/{job['id']}/logs")
    assert response.status == 200 and response.raw == b""


# --- GET /workers -----------------------------------------------------------------------------


def _check_worker(worker: dict[str, Any], name: str, labels: dict[str, str], gpus: int) -> None:
    assert worker["name"] == name
    assert worker["connected"] is True
    assert worker["labels"] == labels
    assert isinstance(worker["gpus"], list) and len(worker["gpus"]) == gpus
    assert worker["running_jobs"] == []
    assert isinstance(worker["last_heartbeat"], str) and worker["last_heartbeat"].endswith("Z")
    seen = models.parse_time(worker["last_heartbeat"])
    assert seen is not None and abs((models.utcnow() - seen).total_seconds()) < 30


@pytest.fixture()
def with_worker(make_cluster: Callable[..., Cluster]) -> Cluster:
    """A coordinator with one worker of the process runtime (what /workers says needs no
    Docker)."""
    return make_cluster(workers=1, worker_settings={"runtime": "process"})


def test_workers_lists_the_connected_worker(with_worker: Cluster):
    cluster = with_worker
    response = request(cluster, "GET", "/api/v1/workers")
    assert response.status == 200, response.raw
    workers = response.body["workers"]
    assert [w["name"] for w in workers] == ["worker-1"]
    _check_worker(workers[0], "worker-1", {}, 0)
    assert workers[0]["quarantined"] is None  # it confirms the jobs it is sent


def test_a_connected_workers_last_heartbeat_moves(with_worker: Cluster):
    cluster = with_worker

    def heard() -> datetime:
        (worker,) = request(cluster, "GET", "/api/v1/workers").body["workers"]
        seen = models.parse_time(worker["last_heartbeat"])
        assert seen is not None
        return seen

    first = heard()
    wait_until(lambda: heard() > first, 10, "a later heartbeat")  # they come every 0.5 s here


def test_workers_shows_labels_and_gpus(make_cluster: Callable[..., Cluster]):
    cluster = make_cluster(
        workers=1,
        worker_settings={"runtime": "process", "labels": "pool=ci,zone=a", "fake_gpus": "2"},
    )
    response = request(cluster, "GET", "/api/v1/workers")
    assert response.status == 200, response.raw
    (worker,) = response.body["workers"]
    _check_worker(worker, "worker-1", {"pool": "ci", "zone": "a"}, 2)
    assert all(isinstance(gpu["uuid"], str) and gpu["uuid"] for gpu in worker["gpus"])


def test_ndjson_lines_are_exactly_what_json_dumps_writes():
    from gpubox.coordinator.api import _ndjson

    lines = [
        models.LogLine(1, "2026-01-01T00:00:00.000000001Z", "stdout", 'say "hi" \\ back'),
        models.LogLine(2, "2026-01-01T00:00:00.000000002Z", "stderr", "wörld ☃ \x01\t end"),
        models.LogLine(3, "2026-01-01T00:00:00.000000003Z", "stdout", ""),
    ]
    expected = "".join(json.dumps(line.to_dict(), ensure_ascii=False) + "\n" for line in lines)
    assert _ndjson(lines) == expected
