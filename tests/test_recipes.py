"""The CI recipes in docs/ci run as written: docs/ci/shell.sh, and the shell blocks of the
GitLab and GitHub YAML files (`script:`, `after_script:`, `run:`), against a real coordinator
with a process-runtime worker, with GPUBOX_URL and GPUBOX_TOKEN set as CI sets them. The YAML
recipes run `python train.py`; the tests put a command of their own in its place, and
change nothing else of the text."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from gpubox import exits
from tests.conftest import Cluster, wait_until

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "docs" / "ci"
TRAIN = "python train.py"  # the YAML recipes' job command
SECRET = "wandb-secret-from-ci"
SLEEPER = "sh -c 'echo up; sleep 60'"
# The recipes use the HTTP API alone: the store under it is test_ci_api.py's, on both.
SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def shell_block(path: Path, key: str) -> str:
    """The shell text of the YAML block `key: |`, or of `key:` whose one item is `- |`."""
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip() == f"{key}: |":
            start, indent = i + 1, len(line) - len(line.lstrip())
            break
        if line.strip() == f"{key}:":
            item = i + 1
            while lines[item].lstrip().startswith("#"):
                item += 1
            assert lines[item].strip() == "- |", f"{path.name}: {key}'s item is not `- |`"
            start, indent = item + 1, len(lines[item]) - len(lines[item].lstrip())
            break
    else:
        raise AssertionError(f"{path.name} has no `{key}:` block")
    body: list[str] = []
    for line in lines[start:]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        body.append(line)
    return textwrap.dedent("\n".join(body)).strip() + "\n"


def with_command(script: str, command: str) -> str:
    assert script.count(TRAIN) == 1, f"the recipe no longer runs `{TRAIN}` once:\n{script}"
    return script.replace(TRAIN, command)


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
    its environment holds what CI would set (GPUBOX_URL, GPUBOX_TOKEN, CI ids, a secret)."""
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
        GITHUB_RUN_ID="r42",
        GITHUB_RUN_ATTEMPT="1",
        WANDB_API_KEY=SECRET,
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


def test_the_recipes_retry_on_the_codes_gpubox_calls_retryable() -> None:
    retryable = sorted(int(c.code) for c in exits.TABLE if c.retry)
    gitlab = (RECIPES / "gitlab-ci.yml").read_text()
    found = re.search(r"^\s*exit_codes: \[([\d, ]+)\]$", gitlab, re.M)
    assert found and [int(c) for c in found[1].split(",")] == retryable
    shell = (RECIPES / "shell.sh").read_text()
    assert " | ".join(map(str, retryable)) + ")" in shell
    yaml = pytest.importorskip("yaml")  # where PyYAML is there: the files are YAML, read alike
    job = yaml.safe_load(gitlab)["train"]
    assert job["retry"]["exit_codes"] == retryable
    assert job["script"] == [shell_block(RECIPES / "gitlab-ci.yml", "script")]
    assert job["after_script"] == [shell_block(RECIPES / "gitlab-ci.yml", "after_script")]
    workflow = yaml.safe_load((RECIPES / "github-actions.yml").read_text())
    (step,) = workflow["jobs"]["train"]["steps"]
    assert step["run"] == shell_block(RECIPES / "github-actions.yml", "run")


@SQLITE
def test_the_gitlab_job_follows_fails_is_cancelled_and_cleans_up(
    cluster: Cluster, run_step: Callable[..., Step]
) -> None:
    gitlab = RECIPES / "gitlab-ci.yml"
    script, after = shell_block(gitlab, "script"), shell_block(gitlab, "after_script")

    def ci_job(ci_job_id: str, command: str) -> Step:
        return run_step(["sh", "-e", "-c", with_command(script, command)], CI_JOB_ID=ci_job_id)

    # Success: the job's output is the step's, its secret masked, its CI ids in its metadata.
    ok = ci_job("701", "sh -c 'echo \"training with $WANDB_API_KEY\"'")
    assert ok.finish() == 0, ok
    assert "training with [MASKED]" in ok.stdout and SECRET not in ok.stdout + ok.stderr
    (job,) = jobs_of(cluster, ci_job="701")
    assert job["metadata"] == {"pipeline": "p42", "ci_job": "701"}
    assert job["status"] == "FINISHED"
    # Failure: the job's own exit code is the step's (not one that GitLab retries).
    failed = ci_job("702", "sh -c 'echo trying; exit 3'")
    assert failed.finish() == 3, failed
    assert "ERROR: exit code 3" in failed.stderr
    # The runner stops the step (SIGTERM to its process group): gpubox cancels the job.
    stopped = ci_job("703", SLEEPER)
    stopped.said("up\n")
    os.killpg(stopped.proc.pid, signal.SIGTERM)
    stopped.finish()
    (job,) = jobs_of(cluster, ci_job="703")
    assert f"SIGTERM: job {job['id']} cancel" in stopped.stderr, stopped
    assert cluster.wait(job["id"], timeout_s=20)["status"] == "CANCELLED"
    # The runner kills the step outright: after_script cancels what it left running.
    killed = ci_job("704", SLEEPER)
    killed.said("up\n")
    os.killpg(killed.proc.pid, signal.SIGKILL)
    killed.finish()
    (job,) = jobs_of(cluster, ci_job="704")
    assert cluster.client.job(job["id"])["status"] == "RUNNING"
    cleanup = run_step(["sh", "-c", after], CI_JOB_ID="704")
    assert cleanup.finish() == 0, cleanup
    assert cluster.wait(job["id"], timeout_s=20)["status"] == "CANCELLED"
    nothing_left = run_step(["sh", "-c", after], CI_JOB_ID="701")  # the job had ended
    assert nothing_left.finish() == 0 and nothing_left.stdout == "", nothing_left


@SQLITE
def test_the_github_step_follows_and_is_cancelled_by_githubs_sigint(
    cluster: Cluster, run_step: Callable[..., Step], tmp_path: Path
) -> None:
    run = shell_block(RECIPES / "github-actions.yml", "run")

    def step(command: str, attempt: str) -> Step:
        script = tmp_path / f"step-{attempt}.sh"
        script.write_text(with_command(run, command))
        # GitHub's `bash -e {0}` on Linux; its SIGINT reaches the step's shell alone.
        return run_step(["bash", "-e", str(script)], GITHUB_RUN_ATTEMPT=attempt)

    ok = step("sh -c 'echo \"training with $WANDB_API_KEY\"'", "1")
    assert ok.finish() == 0, ok
    assert "training with [MASKED]" in ok.stdout and SECRET not in ok.stdout + ok.stderr
    (job,) = jobs_of(cluster, pipeline="r42", attempt="1")
    assert job["status"] == "FINISHED"
    stopped = step(SLEEPER, "2")
    stopped.said("up\n")
    stopped.proc.send_signal(signal.SIGINT)  # to the shell's process only, as GitHub does
    assert stopped.finish() == 128 + signal.SIGINT, stopped
    (job,) = jobs_of(cluster, pipeline="r42", attempt="2")
    assert cluster.wait(job["id"], timeout_s=20)["status"] == "CANCELLED"


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
