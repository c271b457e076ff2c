"""The CI recipes in docs/ci run as written: docs/ci/shell.sh against a real coordinator with
a process-runtime worker, with GPUBOX_URL and GPUBOX_TOKEN set as CI sets them."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from gpubox import exits
from tests.conftest import Cluster, wait_until

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "docs" / "ci"
# The recipes use the HTTP API alone: the store under it is test_ci_api.py's, on both.
SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


class Step:
    """A recipe's shell text running as a CI step does: in a process group of its own, stdin
    not a terminal, its output read as it comes."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [
            threading.Thread(target=self._read, args=(stream, lines), daemon=True)
            for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(stream: IO[str] | None, lines: list[str]) -> None:
        lines.extend(stream or [])

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def said(self, text: str) -> None:
        wait_until(lambda: text in self.stdout + self.stderr, 20, lambda: f"{text!r}: {self}")

    def finish(self) -> int:
        """Its exit status, once it and what it started have closed their output."""
        code = self.proc.wait(30)
        for reader in self.readers:
            reader.join(30)
        return code

    def __repr__(self) -> str:
        return f"stdout {self.stdout!r}, stderr {self.stderr!r}"


@pytest.fixture()
def cluster(make_cluster: Callable[..., Cluster]) -> Cluster:
    return make_cluster(workers=1, worker_settings={"runtime": "process", "fake_gpus": "2"})


@pytest.fixture()
def run_step(cluster: Cluster, tmp_path: Path) -> Iterator[Callable[..., Step]]:
    """run_step(argv, **env) → a started Step: `gpubox` on its PATH is this checkout's, and
    its environment holds what CI would set (GPUBOX_URL, GPUBOX_TOKEN, CI ids)."""
    for tool in ("curl", "jq", "bash"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: scripts/setup-host installs it")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gpubox").write_text(f'#!/bin/sh\nexec {sys.executable} -m gpubox "$@"\n')
    (bin_dir / "gpubox").chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("GPUBOX_", "CI_"))}
    base.update(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        PYTHONPATH=str(REPO),
        GPUBOX_URL=cluster.url,
        GPUBOX_TOKEN=cluster.token,
        IMAGE="-",  # the process runtime runs no image
        CI_PIPELINE_ID="p42",
    )
    steps: list[Step] = []

    def start(argv: list[str], **env: str) -> Step:
        steps.append(Step(argv, {**base, **env}))
        return steps[-1]

    yield start
    for step in steps:  # what a test that failed half-way left running
        with contextlib.suppress(ProcessLookupError):
            os.killpg(step.proc.pid, signal.SIGKILL)
        step.proc.wait(10)


def jobs_of(cluster: Cluster, **metadata: str) -> list[dict[str, Any]]:
    return list(cluster.client.jobs(metadata=metadata)["jobs"])


@SQLITE
@pytest.mark.parametrize("how", ["cli", "http"])
def test_the_shell_step_waits_tells_failures_apart_and_cancels_when_stopped(
    cluster: Cluster, run_step: Callable[..., Step], how: str
) -> None:
    def shell_step(ci_job_id: str, *command: str) -> Step:
        argv = ["sh", str(RECIPES / "shell.sh"), how, "-", *command]
        return run_step(argv, CI_JOB_ID=ci_job_id)

    ok = shell_step("801", "sh", "-c", "echo hello from the job")
    assert ok.finish() == 0, ok
    assert ok.stdout == "hello from the job\n" and "the job succeeded" in ok.stderr
    (job,) = jobs_of(cluster, pipeline="p42")
    assert job["status"] == "FINISHED" and job["gpus"] == 1
    if how == "http":  # the same CI job sending its request again: the same job
        again = shell_step("801", "sh", "-c", "echo hello from the job")
        assert again.finish() == 0, again
        assert [j["id"] for j in jobs_of(cluster, pipeline="p42")] == [job["id"]]
    failed = shell_step("802", "sh", "-c", "echo trying; exit 3")
    assert failed.finish() == 3, failed
    assert failed.stdout == "trying\n" and "the job failed (exit 3)" in failed.stderr
    # A signal to the shell alone, as GitHub stops a step: the shell's trap cancels the job.
    stopped = shell_step("803", "sh", "-c", "sleep 60")
    stopped.said("waiting for job")
    job_id = int(stopped.stderr.split("waiting for job ", 1)[1].split()[0])
    cluster.wait(job_id, ("RUNNING",), timeout_s=20)
    how_stopped = signal.SIGTERM if how == "cli" else signal.SIGINT
    stopped.proc.send_signal(how_stopped)
    assert stopped.finish() == 128 + how_stopped, stopped
    assert f"cancelling job {job_id}" in stopped.stderr
    assert cluster.wait(job_id, timeout_s=20)["status"] == "CANCELLED"
    if how == "http":  # a refused token is not gpubox being away: 77, not retried
        refused = run_step(["sh", str(RECIPES / "shell.sh"), how, "-", "true"], GPUBOX_TOKEN="x")
        assert refused.finish() == exits.REFUSED, refused
