"""The test layers stay true: a test not marked docker cannot reach the Docker engine, so
`pytest -m "not docker"` passes where there is none (see conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import docker
import pytest

from tests.conftest import NO_DOCKER_HOST, Cluster

REFUSED = "is not marked docker: add @pytest.mark.docker"


def test_an_unmarked_test_gets_no_docker_client(request: pytest.FixtureRequest):
    with pytest.raises(pytest.fail.Exception, match=REFUSED):
        request.getfixturevalue("docker_client")


def test_an_unmarked_test_gets_no_client_from_the_sdk_either():
    with pytest.raises(pytest.fail.Exception, match=REFUSED):
        docker.from_env()


def test_the_programs_an_unmarked_test_starts_find_no_engine():
    assert os.environ["DOCKER_HOST"] == NO_DOCKER_HOST
    code = "import os; print(os.environ['DOCKER_HOST'])"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert child.stdout.strip() == NO_DOCKER_HOST


def test_a_cluster_asks_for_docker_only_for_a_docker_worker(
    make_cluster: Callable[..., Cluster],
):
    cluster = make_cluster(workers=1, worker_settings={"runtime": "process"})
    assert cluster._docker_client is None
    with pytest.raises(pytest.fail.Exception, match=REFUSED):
        cluster.add_worker(name="docker-worker")


@pytest.mark.docker
def test_a_marked_test_reaches_the_engine(docker_client: docker.DockerClient):
    assert os.environ.get("DOCKER_HOST") != NO_DOCKER_HOST
    assert docker_client.ping()
