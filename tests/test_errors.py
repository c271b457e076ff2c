"""The error hierarchy: one root, StoreUnavailable under StoreError, and HTTP statuses that only
the API chooses (api.STATUS), which the client reports as they were sent."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from http.client import HTTPConnection
from urllib.parse import urlsplit

import pytest

from gpubox import errors
from gpubox.client import ApiError, OutputClosed
from gpubox.coordinator import api
from gpubox.worker.docker_runtime import JobRefused
from tests.conftest import IMAGE, Cluster

# Every class in gpubox.errors and the HTTP status the API answers it with. A new error class
# makes test_every_error_has_a_chosen_status fail until its status is chosen here and in STATUS.
EXPECTED_STATUS: dict[type[errors.GpuboxError], int] = {
    errors.BadInput: 400,
    errors.Unauthorized: 401,
    errors.Forbidden: 403,
    errors.NotYourJob: 403,
    errors.NotFound: 404,
    errors.JobNotFound: 404,
    errors.WrongState: 409,
    errors.TooLarge: 413,
    errors.IdempotencyConflict: 422,
    errors.OverCap: 429,
    errors.StoreUnavailable: 503,
    errors.Busy: 503,
    errors.Deposed: 503,
    # These are faults of gpubox or its store, never of the request: a 500 on purpose.
    errors.GpuboxError: 500,
    errors.StoreError: 500,
    errors.ProtocolError: 500,
    errors.ConfigError: 500,
}


def error_classes() -> list[type[BaseException]]:
    """The exception classes defined in gpubox.errors."""
    return [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, BaseException) and cls.__module__ == errors.__name__
    ]


def test_store_unavailable_is_a_store_error():
    # A caller that handles store failures with `except StoreError` must see outages too.
    assert issubclass(errors.StoreUnavailable, errors.StoreError)
    with pytest.raises(errors.StoreError):
        raise errors.StoreUnavailable("the database is down")


@pytest.mark.parametrize("cls", [*error_classes(), ApiError, OutputClosed, JobRefused])
def test_every_error_is_a_gpubox_error(cls: type[BaseException]):
    assert issubclass(cls, errors.GpuboxError)
    # The API chooses the status; an error class carries none (ApiError has `status` only).
    assert not hasattr(cls, "http_status")


def test_every_error_has_a_chosen_status():
    assert set(EXPECTED_STATUS) == set(error_classes())
    for cls, status in EXPECTED_STATUS.items():
        # __new__ makes an instance without the arguments that some constructors need.
        assert api.status_for(cls.__new__(cls)) == status, cls.__name__


def test_status_table_lists_each_class_before_its_parent():
    # status_for takes the first class that matches, so a parent listed first would hide the
    # status of its subclass (StoreUnavailable must not become a 500 like StoreError).
    classes = list(api.STATUS)
    for i, earlier in enumerate(classes):
        for later in classes[i + 1 :]:
            assert not issubclass(later, earlier), f"{later.__name__} after {earlier.__name__}"


def http_status(cluster: Cluster, method: str, path: str) -> int:
    """The status line of a raw request, read without the client."""
    url = urlsplit(cluster.url)
    connection = HTTPConnection(url.hostname or "", url.port, timeout=30)
    try:
        connection.request(method, path, headers={"Authorization": f"Bearer {cluster.token}"})
        return connection.getresponse().status
    finally:
        connection.close()


def test_client_error_has_the_http_status(make_cluster: Callable[..., Cluster]):
    cluster = make_cluster(workers=0)  # without workers, a job stays QUEUED until cancelled

    missing = "/api/v1/jobs/424242"
    assert http_status(cluster, "GET", missing) == 404
    with pytest.raises(ApiError) as not_found:
        cluster.client.job(424242)
    assert not_found.value.status == 404 and not_found.value.code == "not_found"

    job = cluster.client.submit({"name": "errors-test", "docker": {"image": IMAGE}})
    cluster.client.cancel(job["id"])
    assert http_status(cluster, "POST", f"/api/v1/jobs/{job['id']}/cancel") == 409
    with pytest.raises(ApiError) as wrong_state:
        cluster.client.cancel(job["id"])  # already CANCELLED
    assert wrong_state.value.status == 409 and wrong_state.value.code == "wrong_state"
