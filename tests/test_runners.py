"""The worker's job runner threads (gpubox.worker.runners): kept between jobs, one more only
when none is idle, each sending on its own socket, all gone after stop()."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import zmq

from gpubox.worker.runners import Runners
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(30)


@pytest.fixture()
def link() -> Iterator[tuple[zmq.Context, zmq.Socket, Runners]]:
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.bind("inproc://runners-test")
    runners = Runners(context, "inproc://runners-test")
    try:
        yield context, pull, runners
    finally:
        runners.stop()
        pull.close(0)
        context.term()  # hangs if a runner's socket were left open


def report(tag: str, release: threading.Event | None = None):  # type: ignore[no-untyped-def]
    def work(push: zmq.Socket) -> None:
        if release is not None:
            release.wait(10)
        push.send_pyobj((tag, threading.get_ident(), threading.current_thread().name))

    return work


def until_idle(runners: Runners, count: int) -> None:
    """Wait until `count` runner threads are idle (they count themselves so after their work)."""
    wait_until(
        lambda: runners._idle == count,
        10,
        lambda: f"{count} idle runners ({runners._idle} are)",
        every_s=0.001,
    )


def test_a_runner_is_reused_once_idle_and_a_second_starts_only_when_needed(link) -> None:  # type: ignore[no-untyped-def]
    _, pull, runners = link
    runners.start("job-1", report("one"))
    tag, first, name = pull.recv_pyobj()
    assert (tag, name) == ("one", "job-1")
    until_idle(runners, 1)  # it goes back to idle
    runners.start("job-2", report("two"))
    tag, second, name = pull.recv_pyobj()
    assert (tag, name, second) == ("two", "job-2", first)  # the same thread, renamed
    until_idle(runners, 1)  # (it sends before it counts itself idle again)
    release = threading.Event()
    runners.start("job-3", report("three", release))  # holds the only runner
    runners.start("job-4", report("four"))  # so a second thread starts (either may take it)
    tag, fourth, _ = pull.recv_pyobj()
    assert tag == "four"  # while "three" still holds its runner
    release.set()
    tag, third, _ = pull.recv_pyobj()
    assert tag == "three" and third != fourth and first in (third, fourth)


def test_a_failing_work_keeps_its_runner(link) -> None:  # type: ignore[no-untyped-def]
    _, pull, runners = link

    ran_on: list[int] = []

    def broken(push: zmq.Socket) -> None:
        ran_on.append(threading.get_ident())
        raise RuntimeError("a bug in the runtime")

    runners.start("job-1", broken)
    until_idle(runners, 1)
    runners.start("job-2", report("after"))
    tag, ident, _ = pull.recv_pyobj()
    assert tag == "after" and [ident] == ran_on  # the same thread, still serving


def test_stop_ends_every_runner(link) -> None:  # type: ignore[no-untyped-def]
    _, pull, runners = link
    before = threading.active_count()
    release = threading.Event()
    runners.start("job-1", report("a", release))
    runners.start("job-2", report("b", release))
    assert threading.active_count() == before + 2
    runners.stop()
    release.set()  # they finish their work, then end
    assert sorted(pull.recv_pyobj()[0] for _ in range(2)) == ["a", "b"]
    for thread in threading.enumerate():
        if thread.name.startswith("job-") or thread.name == "gpubox-runner-idle":
            thread.join(5)
    assert threading.active_count() == before
