"""The API's OpenAPI 3.1 document (GET /api/v1/openapi.json): served without a token, valid,
complete (every route of the app, every field of a job, every error code, every query
parameter a route takes), true (every answer of every route matches it: tests/openapi_check.py,
which tests/test_api.py's request() also runs with GPUBOX_TEST_OPENAPI=1), and, fuzzed with
schemathesis from the served document, never answered with a 500 or with anything it does not
describe. Real HTTP against a real coordinator."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from gpubox import errors, jobfilter, keys, models, telemetry, validate
from gpubox.coordinator import api, tokens
from gpubox.coordinator.api import http_errors, openapi
from gpubox.coordinator.api import openapi_schemas as schemas
from gpubox.coordinator.events import Changes
from gpubox.store import Store
from tests import openapi_check
from tests.conftest import Cluster
from tests.test_api import JOBS, request

SPEC = {"name": "openapi", "docker": {"image": "img", "command": ["true"]}}


@pytest.fixture()
def checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every answer request() receives is checked against the document."""
    monkeypatch.setattr(openapi_check, "ENABLED", True)


@pytest.fixture()
def bare(make_cluster: Callable[..., Cluster]) -> Cluster:
    return make_cluster(workers=0)


def operations() -> Iterator[tuple[str, str]]:
    """(METHOD, path) of every operation the document lists."""
    for path, item in openapi.document()["paths"].items():
        for method in item:
            yield method.upper(), path


# --- served and valid -------------------------------------------------------------------------


def test_the_document_is_served_without_a_token_and_is_valid_openapi_3_1(bare: Cluster):
    from openapi_spec_validator import validate as validate_spec

    answer = request(bare, "GET", openapi.PATH, auth=None)
    assert answer.status == 200, answer.raw[:300]
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.body == json.loads(json.dumps(openapi.document()))
    assert answer.body["openapi"].startswith("3.1.")
    validate_spec(answer.body)  # raises OpenAPIValidationError when it is not


def test_the_document_refuses_an_unknown_query_parameter(bare: Cluster, checked: None):
    answer = request(bare, "GET", f"{openapi.PATH}?pretty=1", auth=None)
    assert answer.status == 400 and answer.body["error"]["field"] == "pretty"


# --- complete ---------------------------------------------------------------------------------


def test_every_route_of_the_api_is_in_the_document_and_nothing_else(store: Store, tmp_path: Path):
    app = api.make_app(store, Changes(), mock.Mock(), mock.Mock(), str(tmp_path))
    served = {
        (route.method, re.sub(r"<(\w+)(:[^>]*)?>", r"{\1}", route.rule), route.callback.__name__)
        for route in app.routes
        if route.rule.startswith("/api/") or route.rule in ("/healthz", "/metrics")
    }
    assert ("GET", "/api/v1/jobs/{job_id}/logs", "job_logs") in served  # the rules read right
    # each with the name of the function that serves it as its operationId
    documented = {
        (method, path, openapi.document()["paths"][path][method.lower()]["operationId"])
        for method, path in operations()
    }
    assert documented == served


def _job(status: models.Status = models.Status.QUEUED, **fields: Any) -> models.Job:
    now = models.utcnow()
    return models.Job(7, models.JobSpec("n", "i"), status, now, now, **fields)


GROUPS = {field.api.rpartition(".")[0] for field in models.JOB_FIELDS if field.api} - {""}


def _api_keys() -> Iterator[str]:
    """Every key of a job as the API shows it, "group.key" inside a group."""
    for field in models.JOB_FIELDS:
        if field.api is None:
            continue
        group, _, key = field.api.rpartition(".")
        if key == "*":  # a record whose own keys are merged into the group
            yield from (f"{group}.{name}" for name in field.shown(_job()))
        else:
            yield field.api


def _schema_keys(schema: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, inner in schema["properties"].items():
        if key in GROUPS and not prefix:
            yield from _schema_keys(inner, f"{key}.")
        else:
            yield f"{prefix}{key}"


def test_the_job_schema_has_every_api_field_of_job_fields_and_no_other():
    job = openapi.document()["components"]["schemas"]["Job"]
    assert {"docker", "result"} == GROUPS
    assert sorted(_schema_keys(job)) == sorted(_api_keys())
    # and a real job's answer has exactly these keys, each one described
    assert sorted(_job().to_dict()) == sorted(job["properties"]) == sorted(job["required"])
    for key in _schema_keys(job):
        group, _, name = key.rpartition(".")
        where = job["properties"][group] if group else job
        assert where["properties"][name].get("description"), key


def test_a_job_that_ran_on_gpus_matches_the_job_schema():
    # The API tests' jobs hold no GPUs: a result with telemetry is checked here.
    point = telemetry.Point("GPU-1", 100.0, 110.0, 10, 50.0, 90.0, 1000, 80000, 250.0, 60.0)
    now = models.utcnow()
    ran = _job(
        status=models.Status.FINISHED,
        worker="w1",
        attempts=1,
        executed_at=now,
        finished_at=now,
        exit_code=0,
        gpu_ids=["GPU-1"],
        log_seq=3,
        image_id="sha256:ab",
        telemetry=telemetry.summarize([point]),
    )
    openapi_check.valid(("components", "schemas", "Job"), ran.to_dict(), "a job that ran")
    page = {"job_id": 7, "status": "FINISHED", "next": 110.0, "more": False}
    page["points"] = [{"attempt": 1, **point.to_dict()}]
    openapi_check.valid(("components", "schemas", "Telemetry"), page, "a telemetry page")


def test_the_job_spec_schema_has_every_key_that_validate_takes():
    spec = openapi.document()["components"]["schemas"]["JobSpec"]
    docker = spec["properties"]["docker"]
    assert set(spec["properties"]) == validate.JOB_KEYS
    assert set(docker["properties"]) == validate.DOCKER_KEYS
    assert set(docker["properties"]["auth"]["properties"]) == validate.AUTH_KEYS
    for schema in (*spec["properties"].values(), *docker["properties"].values()):
        assert schema.get("description"), schema


def test_every_error_code_is_in_the_error_code_enum():
    classes = [
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.GpuboxError)
    ]
    codes = {cls.code for cls in classes} | set(http_errors.BOTTLE_CODES.values())
    codes |= {http_errors.OTHER_CODE, "internal"}
    assert "not_your_job" in codes and "method_not_allowed" in codes
    assert set(openapi.document()["components"]["schemas"]["ErrorCode"]["enum"]) == codes
    # each status's answers name the codes that come with it
    assert schemas.error_codes(403) == ["forbidden", "not_your_job"]
    assert schemas.error_codes(503) == ["busy", "store_unavailable"]
    assert schemas.error_codes(404) == ["not_found"]


def _documented_query(method: str, path: str) -> set[str]:
    parameters = openapi.document()["paths"][path][method.lower()].get("parameters", [])
    names = {p["name"] for p in parameters if p["in"] == "query"}
    # metadata.KEY parameters are one object parameter (style form, explode)
    return {jobfilter.METADATA if name == "metadata" else name for name in names}


def test_each_route_takes_exactly_the_query_parameters_the_document_lists(bare: Cluster):
    job = request(bare, "POST", JOBS, SPEC).body
    keys.add_worker(bare.coordinator.config.state_dir, "w1")
    for method, template in operations():
        path = template.format(job_id=job["id"], name="w1")
        answer = request(bare, method, f"{path}?zz_unknown=1")
        assert answer.status == 400, (method, path, answer.raw[:300])
        message = answer.body["error"]["message"]
        takes = message.partition("it takes ")[2]
        served = set() if takes == "none" else set(takes.split(", "))
        assert served == _documented_query(method, template), (method, template, message)


# --- true: every route's answers match the document -------------------------------------------


def test_answers_of_every_route_match_the_document(bare: Cluster, checked: None):
    """Each operation answered, its usual answers and its errors: request() checks each one."""
    seen: set[tuple[str, str, int]] = set()

    def send(method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        answer = request(bare, method, path, body, **kwargs)
        template = next(t for r, t in openapi_check._routes() if r.match(path.split("?")[0]))
        seen.add((method, template, answer.status))
        return answer

    state = bare.coordinator.config.state_dir
    once = {"Idempotency-Key": "k"}
    job = send("POST", JOBS, {**SPEC, "metadata": {"n": 1}}, headers=once).body
    assert send("POST", JOBS, SPEC, headers=once).status == 422
    assert send("POST", JOBS, {**SPEC, "metadata": {"n": 1}}, headers=once).status == 200
    assert send("POST", JOBS, {**SPEC, "gpus": -1}).status == 400
    other = send("POST", JOBS, SPEC).body
    assert send("GET", f"{JOBS}/{job['id']}?wait=0.1").body["status"] == "QUEUED"
    assert send("GET", f"{JOBS}?status=queued&label=a%3Db&metadata.n=1&limit=1").status == 200
    assert send("GET", f"{JOBS}?limit=1").body["next"] == other["id"]
    assert send("POST", f"{JOBS}/{job['id']}/cancel").status == 200
    assert send("POST", f"{JOBS}/{job['id']}/cancel").status == 409
    assert send("GET", f"{JOBS}/{job['id']}/logs").status == 200
    assert send("GET", f"{JOBS}/{job['id']}/logs?limit=5&since=0").status == 200
    ended = send("GET", f"{JOBS}/{job['id']}/logs?follow=1&format=ndjson")
    assert json.loads(ended.raw.decode().split("\n")[-2]) == {
        "end": True,
        "id": job["id"],
        "status": "CANCELLED",
        "exit_code": None,
        "error": "cancelled while queued",
    }
    assert send("GET", f"{JOBS}/{job['id']}/logs?format=xml").status == 400
    assert send("GET", f"{JOBS}/{job['id']}/telemetry?since=1").status == 200
    assert send("GET", f"{JOBS}/424242/telemetry").status == 404
    assert send("GET", f"{JOBS}/{job['id']}/webhooks").body["deliveries"] == []
    assert send("GET", f"{JOBS}/424242/webhooks").status == 404
    assert send("GET", "/api/v1/workers").status == 200
    assert send("GET", "/api/v1/usage?since=1d&by=label").body["total"]["jobs"]["CANCELLED"] == 1
    assert send("GET", "/api/v1/usage?by=gpu").status == 400
    assert send("GET", "/healthz", auth=None).status == 200
    assert send("GET", "/metrics").status == 200
    assert send("GET", "/metrics", auth=None).status == 401
    assert send("GET", "/api/v1/coordinators").status == 200
    assert send("GET", openapi.PATH, auth=None).status == 200
    # tokens and roles
    made = send("POST", "/api/v1/tokens", {"name": "viewer", "role": "view"})
    assert made.status == 201
    assert send("POST", "/api/v1/tokens", {"name": "viewer"}).status == 409
    assert send("POST", "/api/v1/tokens", {"name": "x", "role": "root"}).status == 400
    viewer = f"Bearer {made.body['token']}"
    assert send("POST", JOBS, SPEC, auth=viewer).status == 403
    assert send("GET", "/api/v1/tokens", auth=viewer).status == 403
    assert send("GET", "/api/v1/tokens").status == 200
    submitter = tokens.create(bare.coordinator.store, "ci", "submit")  # type: ignore[arg-type]
    assert send("POST", f"{JOBS}/{other['id']}/cancel", auth=f"Bearer {submitter}").status == 403
    # caps: a submit past max_queued is 429, naming the cap
    assert send("PATCH", "/api/v1/tokens/ci", {"max_queued": 0}).body["max_queued"] == 0
    refused = send("POST", JOBS, SPEC, auth=f"Bearer {submitter}")
    assert (refused.status, refused.body["error"]["field"]) == (429, "max_queued")
    assert send("PATCH", "/api/v1/tokens/ci", {"max_queued": -1}).status == 400
    assert send("PATCH", "/api/v1/tokens/nobody", {"max_gpus": 1}).status == 404
    assert send("DELETE", "/api/v1/tokens/viewer").status == 200
    assert send("DELETE", "/api/v1/tokens/viewer").status == 404
    keys.add_worker(state, "w1")
    assert send("POST", "/api/v1/workers/w1/revoke").status == 200
    assert send("POST", "/api/v1/workers/w1/revoke").status == 404
    assert send("POST", "/api/v1/workers/-bad/revoke").status == 400
    # every operation answered at least once with a success
    succeeded = {(method, template) for method, template, status in seen if status < 300}
    assert succeeded == set(operations())


def test_a_follower_past_the_cap_gets_a_503_the_document_describes(
    make_cluster: Callable[..., Cluster], checked: None
):
    cluster = make_cluster(workers=0, http_streams=1)  # one follow stream at most
    job = request(cluster, "POST", JOBS, SPEC).body
    from http.client import HTTPConnection

    url = urllib.parse.urlsplit(cluster.url)
    held = HTTPConnection(url.hostname or "", url.port, timeout=10)
    path = f"{JOBS}/{job['id']}/logs?follow=1&format=ndjson"
    held.request("GET", path, headers={"Authorization": f"Bearer {cluster.token}"})
    try:
        # Kept: the answer holds the connection, which closes when it is collected.
        following = held.getresponse()
        assert following.status == 200
        answer = request(cluster, "GET", path)
        assert answer.status == 503 and answer.body["error"]["code"] == "busy"
    finally:
        held.close()


def test_the_check_refuses_an_answer_the_document_does_not_describe():
    json_type = {"Content-Type": "application/json"}
    job = _job().to_dict()
    shown = json.dumps(job).encode()
    located = {**json_type, "Location": "/api/v1/jobs/1"}
    openapi_check.check("POST", JOBS, 201, located, shown)  # as it should be
    cases = [
        ("POST", JOBS, 201, json_type, shown),  # no Location
        ("POST", JOBS, 202, located, shown),  # a status not listed
        ("GET", f"{JOBS}/1", 200, {"Content-Type": "text/html"}, shown),
        ("GET", f"{JOBS}/1", 200, json_type, json.dumps({**job, "extra": 1}).encode()),
        ("GET", f"{JOBS}/1", 200, json_type, json.dumps({**job, "id": "1"}).encode()),
        ("GET", f"{JOBS}/1", 404, json_type, b'{"error": {"code": "busy", "message": "m"}}'),
        ("GET", "/api/v1/nope", 200, json_type, b"{}"),
    ]
    for case in cases:
        with pytest.raises(openapi_check.Mismatch):
            openapi_check.check(*case)


# --- fuzzed ------------------------------------------------------------------------------------

# Cases per operation and generation mode (valid data, and data the document rules out), the
# same ones each run: about 8 s per store on 2 cores (the suite's 10 minutes are tight).
# GPUBOX_FUZZ_EXAMPLES=500 fuzzes longer; GPUBOX_FUZZ_RANDOM=1 draws new cases each run.
FUZZ_EXAMPLES = int(os.environ.get("GPUBOX_FUZZ_EXAMPLES", "25"))
FUZZ_RANDOM = os.environ.get("GPUBOX_FUZZ_RANDOM", "") not in ("", "0")


@dataclasses.dataclass
class FuzzFailure:
    operation: str
    mode: str
    error: str


def _told(exc: BaseException) -> str:
    """An exception and those inside it: Hypothesis' "unreliable" error holds the failure of
    the first call, which is what there is to see."""
    told = [f"{type(exc).__name__}: {exc}"]
    for inner in [*getattr(exc, "exceptions", ()), exc.__cause__]:
        if inner is not None and inner is not exc:
            told.append(_told(inner))
    return "\n  caused by ".join(told)


# schemathesis draws from the `random` module inside its strategies; Hypothesis warns of that
# now and then (HypothesisDeprecationWarning), and the suite's warnings-as-errors made a first
# call fail that its replay passed: a flaky failure about the fuzzer, not about gpubox.
@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
def test_fuzzed_requests_get_no_500_and_only_answers_the_document_describes(bare: Cluster):
    import hypothesis
    import requests
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    auth = {"Authorization": f"Bearer {bare.token}"}
    session = requests.Session()
    # (from_url would leave out the operation at the document's own URL)
    schema = schemathesis.openapi.from_dict(session.get(f"{bare.url}{openapi.PATH}").json())
    failures: list[FuzzFailure] = []
    answered: set[str] = set()

    def call(case: schemathesis.Case) -> None:
        if case.path_parameters and case.path_parameters.get("name") == bare.local_token_name:
            return  # revoking the fuzz's own token would leave it nothing but 401s to see
        response = case.call(base_url=bare.url, headers=auth, session=session, timeout=20)
        if case.method == "POST" and case.path == "/api/v1/jobs" and response.status_code == 201:
            # With no worker a job stays QUEUED: a long poll of it (?wait=) would hold 60 s and
            # a follow stream never end. An ended job answers both at once.
            session.post(f"{bare.url}{JOBS}/{response.json()['id']}/cancel", headers=auth)
        answered.add(f"{case.method} {case.path}")
        case.validate_response(response, checks=checks)

    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in schemathesis.GenerationMode:
            run = hypothesis.settings(
                max_examples=FUZZ_EXAMPLES,
                deadline=None,
                database=None,
                derandomize=not FUZZ_RANDOM,
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
                suppress_health_check=list(hypothesis.HealthCheck),
            )(hypothesis.given(case=operation.as_strategy(generation_mode=mode))(call))
            try:
                run()
            except hypothesis.errors.Unsatisfiable:
                pass  # nothing to make invalid: an operation without parameters or body
            except (Exception, BaseExceptionGroup) as exc:  # schemathesis' FailureGroup too
                failures.append(FuzzFailure(operation.label, mode.value, _told(exc)[:3000]))
    assert answered == {f"{method} {path}" for method, path in operations()}
    assert not failures, "\n\n".join(f"{f.operation} ({f.mode}): {f.error}" for f in failures)
