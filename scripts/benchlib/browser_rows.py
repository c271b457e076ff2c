"""Rows about the dashboard as a browser shows it (headless Chromium, scripts/benchlib/chromium):
how soon the page of a job with a 1,000,000-line log is usable, and how soon a line a job
prints is on its page."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from benchlib import chromium
from benchlib.common import Context, Row, cluster, ms, percentile
from benchlib.docker_rows import docker_cluster, follow_delays, sdk, sweep, ts_ns
from benchlib.http_rows import big_store, timed

# Each added log line's Docker timestamp and the moment it entered the page (Unix ms, the
# browser's precise clock), kept in window.gpuboxArrivals for the bench to read.
WATCH_LOG = """
window.gpuboxArrivals = [];
new MutationObserver((changes) => {
  const now = performance.timeOrigin + performance.now();
  for (const change of changes) {
    for (const row of change.addedNodes) {
      if (row.classList && row.classList.contains("line")) {
        window.gpuboxArrivals.push([row.querySelector(".seq").title, now]);
      }
    }
  }
}).observe(document.getElementById("log"), {childList: true});
"""


def browser(ctx: Context) -> list[Row]:
    why = chromium.missing()
    if why:
        return [Row("dashboard in a browser", f"not measured: {why}")]
    driver = chromium.start()
    try:
        return [long_log_page(ctx, driver), line_to_page(ctx, driver)]
    finally:
        driver.quit()


def long_log_page(ctx: Context, driver: Any) -> Row:
    """From asking for the page of a job with a long log to its newest lines on screen and the
    page answering a script (its main thread free): p50 of several loads."""
    lines, loads = ctx.size(1_000_000, 20_000), ctx.size(9, 3)
    with big_store(ctx, 1, lines) as (url, log_job), cluster(ctx, GPUBOX_DB=url) as made:
        chromium.sign_in(driver, made.url, made.token)
        ready = (
            "const log = document.getElementById('log');"
            " return log.childElementCount > 0 &&"
            " Number(log.lastElementChild.dataset.seq) === arguments[0] &&"
            " document.getElementById('log-state').textContent === ''"
        )
        times = []
        for _ in range(loads + 1):
            began = time.perf_counter()
            driver.get(f"{made.url}/jobs/{log_job}")
            chromium.wait(lambda: driver.execute_script(ready, lines), 30, "the newest lines")
            times.append(time.perf_counter() - began)
        times = times[1:]  # the first load fills the browser's cache of the scripts
        session = {"Authorization": f"Bearer {made.token}"}
        last_page = f"/api/v1/jobs/{log_job}/logs?format=ndjson&since={lines - 1000}&limit=1000"
        api = timed(ctx.size(50, 10), made.url, session, "GET", last_page)
    p50 = percentile(times, 50)
    return Row(
        f"dashboard: the page of a job with a {lines:,}-line log, asked for → newest lines shown"
        " and the page responsive, p50",
        f"{ms(p50)} (slowest {ms(max(times))}, {loads} loads)",
        f"the API's last 1,000 lines alone: p50 {ms(percentile(api, 50))}",
        "≤ 1 s",
        p50 <= 1.0,
    )


def line_to_page(ctx: Context, driver: Any) -> Row:
    """From a line's Docker timestamp (when the job printed it) to its arrival in the job's
    page, next to its arrival at an API follow stream open at the same time."""
    count = ctx.size(200, 40)
    every_s = 0.05
    # The page is open and watching before the first line is printed.
    command = ["sh", "-c", f"sleep 4; for i in $(seq 1 {count}); do echo $i; sleep {every_s}; done"]
    try:
        with docker_cluster(ctx, 1) as box:
            chromium.sign_in(driver, box.url, box.token)
            job = box.submit(command)
            driver.get(f"{box.url}/jobs/{job['id']}")
            chromium.wait(
                lambda: (
                    driver.execute_script("return document.getElementById('log-state').textContent")
                    == "following"
                ),
                30,
                "the page to follow the log",
            )
            driver.execute_script(WATCH_LOG)
            api: list[float] = []
            follower = threading.Thread(
                target=lambda: api.extend(follow_delays(box, job["id"])), daemon=True
            )
            follower.start()
            follower.join(120)  # its stream ends with the job
            arrivals = chromium.wait(lambda: _arrivals(driver, count), 10, "every line on the page")
    finally:
        sweep(sdk())
    delays = [(seen_ms * 1e6 - ts_ns(ts)) / 1e9 for ts, seen_ms in arrivals]
    p50, p95 = percentile(delays, 50), percentile(delays, 95)
    return Row(
        "dashboard: a printed line reaches the job's page (Docker worker, live log)",
        f"p50 {ms(p50)}, p95 {ms(p95)} ({len(delays)} lines)",
        f"the API's follow stream: p50 {ms(percentile(api, 50))}, p95 {ms(percentile(api, 95))}",
        "p50 ≤ 250 ms",
        p50 <= 0.250,
    )


def _arrivals(driver: Any, count: int) -> list[tuple[str, float]] | None:
    """The (timestamp, arrival) of the `count` lines once all are in the page."""
    found = driver.execute_script("return window.gpuboxArrivals")
    return [(str(ts), float(at)) for ts, at in found] if len(found) >= count else None


ROWS: dict[str, Callable[[Context], list[Row]]] = {"browser": browser}
