"""Secrets stay secret: write-only credentials, masked output, sealed storage, token roles."""

from __future__ import annotations

import http.client
import io
import json
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from gpubox import errors
from gpubox.client import ApiError, Client
from gpubox.coordinator import tokens
from tests.conftest import IMAGE, PG_URL, Cluster

SECRET = "sk-live-0123456789"  # 18 characters
PASSWORD = "hunter2-registry-pw"


def everything_stored(cluster: Cluster, db_url: str) -> bytes:
    """Every byte the store holds: the SQLite files, or every row of every table."""
    if db_url.startswith("sqlite:///"):
        path = Path(db_url.removeprefix("sqlite://"))
        return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*") if p.is_file())
    import psycopg

    schema = db_url.rsplit("%3D", 1)[1]
    dump = []
    with psycopg.connect(PG_URL) as conn:
        for table in ("jobs", "job_labels", "logs", "workers", "tokens"):
            for row in conn.execute(f"SELECT * FROM {schema}.{table}"):  # type: ignore[arg-type]
                dump.append(repr(row))
    return "\n".join(dump).encode()


@pytest.mark.docker
def test_secrets_and_registry_password_appear_nowhere(cluster: Cluster, image: str, db_url: str):
    script = (
        'echo "key=$API_KEY"; '
        'printf "%s" "${API_KEY%?????????}"; sleep 0.3; printf "%s\\n" "${API_KEY#?????????}"; '
        'echo "pw=$PW_A$PW_B" >&2'
    )
    job = cluster.submit(
        image,
        ["sh", "-c", script],
        docker={
            "secrets": {"API_KEY": SECRET},
            # the password reaches the output only as the join of two harmless halves
            "env": {"PW_A": PASSWORD[:7], "PW_B": PASSWORD[7:]},
            "auth": {"registry": "registry.example.com", "username": "bot", "password": PASSWORD},
        },
    )
    assert SECRET not in json.dumps(job) and PASSWORD not in json.dumps(job)
    out, err = io.StringIO(), io.StringIO()
    assert cluster.client.tail(job["id"], out=out, err=err) == 0
    assert out.getvalue() == "key=[MASKED]\n[MASKED]\n"
    assert err.getvalue() == "pw=[MASKED]\n"
    shown = json.dumps(cluster.client.job(job["id"]))
    listed = json.dumps(cluster.client.jobs())
    stored_lines = json.dumps(cluster.lines(job["id"]))
    agent, _ = cluster.agents[0]
    worker_stderr = agent.runtime.tee.getvalue()  # type: ignore[attr-defined]
    assert "[MASKED]" in worker_stderr
    database = everything_stored(cluster, db_url)
    for place in (shown, listed, stored_lines, worker_stderr, database.decode("latin-1")):
        assert SECRET not in place
        assert PASSWORD not in place
        assert SECRET[:9] + SECRET[9:] not in place


@pytest.mark.docker
def test_the_container_gets_its_secret_values(cluster: Cluster, image: str):
    # The value reaches the process: it can use it, though its output shows it masked.
    job = cluster.submit(
        image,
        ["sh", "-c", f'[ "$API_KEY" = "{SECRET}" ] && echo ok'],
        docker={"secrets": {"API_KEY": SECRET}},
    )
    assert cluster.wait(job["id"])["status"] == "FINISHED"
    assert [r["line"] for r in cluster.lines(job["id"])] == ["ok"]


def test_sealed_credentials_are_erased_when_the_job_ends(make_cluster):
    cluster = make_cluster(workers=0)
    job = cluster.submit(IMAGE, ["true"], docker={"secrets": {"API_KEY": SECRET}})
    store = cluster.coordinator.store
    assert store is not None
    sealed = store.get_job(job["id"]).spec.sealed
    assert sealed and SECRET not in sealed
    cluster.client.cancel(job["id"])
    assert store.get_job(job["id"]).spec.sealed is None


@pytest.mark.parametrize(
    ("secrets", "field"),
    [
        ({"bad-name": "long enough"}, "docker.secrets"),
        ({"A": "abc"}, "docker.secrets.A"),
        ({"A": 1234}, "docker.secrets.A"),
        ({"SAME": "long enough"}, "docker.secrets"),
    ],
)
def test_bad_secrets_are_refused(make_cluster, secrets: dict[str, Any], field: str):
    cluster = make_cluster(workers=0)
    with pytest.raises(ApiError) as refused:
        cluster.submit(IMAGE, ["true"], docker={"secrets": secrets, "env": {"SAME": "x"}})
    assert refused.value.status == 400 and refused.value.field == field


@pytest.mark.parametrize(
    "field",
    [
        "privileged",
        "volumes",
        "mounts",
        "binds",
        "network_mode",
        "network",
        "devices",
        "device_requests",
        "cap_add",
        "cap_drop",
        "pid_mode",
        "ipc_mode",
        "security_opt",
        "host_config",
        "runtime",
        "userns_mode",
        "sysctls",
        "ulimits",
        "extra_hosts",
        "volumes_from",
        "tmpfs",
        "cgroup_parent",
        "port_bindings",
        "ports",
    ],
)
def test_no_container_option_reaches_the_host(make_cluster, field: str):
    cluster = make_cluster(workers=0)
    for where, value in (("docker", {"image": IMAGE, field: True}), ("top", None)):
        spec: dict[str, Any] = {"name": "x", "docker": {"image": IMAGE}}
        if where == "docker":
            spec["docker"] = value
            expected = f"docker.{field}"
        else:
            spec[field] = True
            expected = field
        with pytest.raises(ApiError) as refused:
            cluster.client.submit(spec)
        assert refused.value.status == 400
        assert refused.value.field == expected


def request(cluster: Cluster, method: str, path: str, token: str, body: Any = None) -> Any:
    url = urllib.parse.urlsplit(cluster.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    data = None if body is None else json.dumps(body)
    conn.request(method, path, body=data, headers={"Authorization": f"Bearer {token}"})
    response = conn.getresponse()
    raw = response.read()
    json_type = response.getheader("Content-Type", "").startswith("application/json")
    answer = json.loads(raw) if json_type else raw
    conn.close()
    return response.status, answer


def test_token_roles_submit_and_admin(make_cluster):
    cluster = make_cluster(workers=0)
    store = cluster.coordinator.store
    assert store is not None
    submit = tokens.create(store, "ci", "submit")
    # submit tokens create, read, cancel and tail jobs
    job = Client(cluster.url, submit).submit({"name": "n", "docker": {"image": IMAGE}})
    assert request(cluster, "GET", f"/api/v1/jobs/{job['id']}", submit)[0] == 200
    assert request(cluster, "GET", f"/api/v1/jobs/{job['id']}/logs", submit)[0] == 200
    assert request(cluster, "POST", f"/api/v1/jobs/{job['id']}/cancel", submit)[0] == 200
    assert request(cluster, "GET", "/api/v1/workers", submit)[0] == 200
    # ... but manage neither tokens nor workers
    for method, path, body in (
        ("GET", "/api/v1/tokens", None),
        ("POST", "/api/v1/tokens", {"name": "x"}),
        ("DELETE", "/api/v1/tokens/ci", None),
        ("POST", "/api/v1/workers/worker-1/revoke", None),
    ):
        status, answer = request(cluster, method, path, submit, body)
        assert status == 403, path
        assert answer["error"]["code"] == "forbidden"
    # admin tokens do
    admin = cluster.token
    status, made = request(
        cluster, "POST", "/api/v1/tokens", admin, {"name": "bot", "role": "submit"}
    )
    assert status == 201 and made["token"].startswith("gpbx_")
    assert Client(cluster.url, made["token"]).jobs()["jobs"]
    status, listed = request(cluster, "GET", "/api/v1/tokens", admin)
    names = {t["name"]: t["role"] for t in listed["tokens"]}
    assert names == {"bot": "submit", "ci": "submit", cluster.local_token_name: "admin"}
    assert "token" not in json.dumps(listed["tokens"]).replace('"tokens"', "")
    assert request(cluster, "DELETE", "/api/v1/tokens/bot", admin)[0] == 200
    with pytest.raises(ApiError) as gone:
        Client(cluster.url, made["token"]).jobs()
    assert gone.value.status == 401
    assert request(cluster, "DELETE", "/api/v1/tokens/bot", admin)[0] == 404
    status, answer = request(
        cluster, "POST", "/api/v1/tokens", admin, {"name": "z", "role": "root"}
    )
    assert status == 400 and answer["error"]["field"] == "role"
    # a name DELETE /api/v1/tokens/NAME could not take back is not given out
    for name in ("a/b", "", "tab\there", "x" * 101):
        status, answer = request(cluster, "POST", "/api/v1/tokens", admin, {"name": name})
        assert status == 400 and answer["error"]["field"] == "name", name
    status, made = request(cluster, "POST", "/api/v1/tokens", admin, {"name": "ci bot@eu-1"})
    assert status == 201
    assert request(cluster, "DELETE", "/api/v1/tokens/ci%20bot%40eu-1", admin)[0] == 200


def test_worker_key_revoked_over_http(make_cluster):
    cluster = make_cluster(worker_settings={"runtime": "process"})
    status, answer = request(cluster, "POST", "/api/v1/workers/worker-1/revoke", cluster.token)
    assert status == 200 and answer == {"name": "worker-1", "revoked": True}
    job = cluster.submit(IMAGE, ["true"])
    from tests.conftest import wait_until

    wait_until(
        lambda: not cluster.client.workers()["workers"][0]["connected"], 10, "the worker lost"
    )
    assert cluster.client.job(job["id"])["status"] == "QUEUED"
    assert request(cluster, "POST", "/api/v1/workers/worker-1/revoke", cluster.token)[0] == 404
    status, answer = request(cluster, "POST", "/api/v1/workers/..%2Fx/revoke", cluster.token)
    assert status in (400, 404)


def test_token_digest_only_is_stored(make_cluster):
    cluster = make_cluster(workers=0)
    store = cluster.coordinator.store
    assert store is not None
    value = tokens.create(store, "ci", "submit")
    stored = [t for t in store.list_tokens() if t.name == "ci"][0]
    assert stored.digest == tokens.digest(value) and value not in repr(stored)
    with pytest.raises(errors.Unauthorized):
        tokens.check(store, "Bearer " + value[:-1] + "x")


def test_oversized_headers_are_refused_without_reaching_the_app(make_cluster):
    cluster = make_cluster(workers=0)
    url = urllib.parse.urlsplit(cluster.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    conn.request(
        "GET",
        "/api/v1/jobs",
        headers={
            "Authorization": f"Bearer {cluster.token}",
            "X-Padding": "x" * 20_000,
        },
    )
    response = conn.getresponse()
    assert response.status == 431
    conn.close()
    assert cluster.client.jobs()["jobs"] == []  # and the server still serves
