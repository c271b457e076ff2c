"""scripts/bench --quick runs through once, so the benchmark keeps working (its figures are
printed, never asserted: timing belongs to scripts/bench, not to the tests)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PG_URL

ROOT = Path(__file__).resolve().parent.parent
# The quick bench in three parts, so that the suite's workers run them side by side; each
# part lists the rows it must print. The Docker rows stay in one part: they sweep the
# bench's containers by label, which would remove another part's.
PARTS = {
    "docker,logs,tail,browser": (
        "Docker overhead",
        "log throughput",
        "tail latency",
        "dashboard: the page of a job with a",
        "dashboard: a printed line reaches",
    ),
    "submit,bigstore,throughput,dispatch,idle": (
        "submit rate",
        "big store",
        "throughput, 1 worker",
        "throughput, 2 workers (",
        "throughput, 2 workers, queue filled first",
        "CPU per no-op job",
        "dispatch latency",
        "idle cost",
    ),
    "telemetry,scheduling,http_processes,references": (
        "worker telemetry CPU",
        "worker telemetry, agent side",
        "telemetry store cost per point, SQLite",
        "scheduling decision, SQLite",
        "submit rate (8 keep-alive clients, no worker), HTTP in 2 processes",
        # gpubox's column of the reference rows: Celery's and task-spooler's may be "not
        # measured"
        "same work as Celery + Redis: throughput",
        "same work as task-spooler: throughput",
        "same work as Celery + Redis: submit → process start p50",
        "same work as task-spooler: submit → process start p50",
    ),
    # On PostgreSQL (the test database), which the failover rows need.
    "failover": (
        "takeover after the leader is killed (SIGKILL)",
        "takeover after the leader stops cleanly (SIGTERM)",
        "submit rate through two coordinators at once",
    ),
    "fleet,followers": (
        "fleet scheduling round",
        "fleet scheduling decision",
        "fleet heartbeats alone",
        "fleet coordinator RSS",
        "fleet growth per step",
        "submit rate, with 100 followers",
        "/healthz with 100 followers",
        "coordinator RSS with 100 followers",
        "log lines received by 100 followers",
    ),
}


# Not serial: its figures are printed, never asserted, so other tests beside it change
# nothing this test checks.
@pytest.mark.slow
@pytest.mark.docker
@pytest.mark.timeout(300)
@pytest.mark.parametrize("groups", list(PARTS))
def test_the_quick_benchmark_prints_every_row(groups: str) -> None:
    command = [sys.executable, str(ROOT / "scripts" / "bench"), "--quick", "--only", groups]
    if groups == "failover":
        command += ["--db", PG_URL]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    table = result.stdout.splitlines()
    assert table[0].startswith("gpubox bench --quick:")
    assert table[2] == "| figure | gpubox | reference, same run | target |"
    rows = [line for line in table[4:] if line.startswith("| ")]
    for name in PARTS[groups]:
        assert any(row.startswith(f"| {name}") for row in rows), name
    assert not any("failed" in row for row in rows)
    if groups == "failover":  # measured, with the database given
        assert not any("not measured" in row for row in rows), rows


def test_the_parts_cover_every_group() -> None:
    """A group added to scripts/bench must be added to a part, or the tests never run it."""
    listed = {group for part in PARTS for group in part.split(",")}
    for module in ROOT.glob("scripts/benchlib/*_rows.py"):
        source = module.read_text()
        block = source[source.index("\nROWS") :]
        names = set(re.findall(r'"([a-z_]+)": ', block))
        assert names <= listed, (module.name, names - listed)
