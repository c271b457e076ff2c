"""The Celery app whose worker reference_rows starts (`celery -A benchlib.celery_tasks worker`):
its two tasks run the same processes as gpubox's bench jobs. The broker is Redis database 0
and the result backend database 1 of the server GPUBOX_BENCH_REDIS names. Celery and redis-py
are benchmark extras (pip install -e '.[bench]'): only the worker and the Celery rows import
this module."""

from __future__ import annotations

import os
import subprocess
import time

from celery import Celery

REDIS = os.environ.get("GPUBOX_BENCH_REDIS", "redis://127.0.0.1:6379")

app = Celery("gpubox_bench", broker=f"{REDIS}/0", backend=f"{REDIS}/1")
app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)


@app.task(name="bench.true")
def run_true() -> None:
    """What a gpubox bench job does: run `true`."""
    subprocess.run(["true"], check=True)


@app.task(name="bench.stamp")
def stamp() -> tuple[float, float]:
    """The time this task started and the time its process (`date +%s.%N`) read, Unix
    seconds."""
    started = time.time()
    out = subprocess.run(["date", "+%s.%N"], capture_output=True, check=True, text=True)
    return started, float(out.stdout)
