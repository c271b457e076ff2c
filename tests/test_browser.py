"""The dashboard in a real browser: headless Chromium (Debian's chromium and chromium-driver,
driven by Selenium) against a real coordinator and a real worker running real processes.
A person's path through it: sign in, watch the queue and a live log, cancel from the page,
and an attacker's: a cross-site form, a job whose name and output are markup and escape codes.

The timed checks here (a queued job in the queue within 2 s, a printed line on the page
within 1 s) are what the dashboard promises, with room to spare on a loaded machine; the
figures themselves are measured by `scripts/bench --only browser`.

Each test leaves screenshots of what it saw in test-output/screens/ (GPUBOX_TEST_SCREENS
names another folder), kept after the run, for a person to look at."""

from __future__ import annotations

import http.server
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpubox.worker.gpu import write_fake_readings
from tests.conftest import Cluster, wait_until
from tests.proxy import CuttableProxy

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from benchlib import chromium  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    # The store behind the pages is tested on both backends in test_dashboard.py.
    pytest.mark.parametrize("db_url", ["sqlite"], indirect=True),
]

EVIL = "<img src=x onerror=alert(1)>"
SCREENS = Path(os.environ.get("GPUBOX_TEST_SCREENS", ROOT / "test-output" / "screens"))
WORKER = {"runtime": "process", "telemetry_interval_s": 0.1, "telemetry_point_s": 0.3}
# A job's process runs as "nobody": the folder it watches for its triggers must be readable.
TRIGGERED = (
    "i=0; while [ ! -e {d}/stop ]; do"
    " if [ -e {d}/go-$i ]; then echo printed-$i; i=$((i+1)); else sleep 0.02; fi; done"
)


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    why = chromium.missing()
    if why:
        pytest.fail(f"no browser for the dashboard's tests: {why}", pytrace=False)
    made = chromium.start()
    yield made
    made.quit()


class Page:
    """The browser, on one coordinator's dashboard."""

    def __init__(self, driver: Any, url: str) -> None:
        self.driver, self.url = driver, url

    def open(self, path: str) -> None:
        self.driver.get(self.url + path)

    def run(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def text(self, selector: str) -> str:
        return str(self.run("return document.querySelector(arguments[0])?.textContent", selector))

    def count(self, selector: str) -> int:
        return int(self.run("return document.querySelectorAll(arguments[0]).length", selector))

    def log_lines(self) -> list[tuple[int, str]]:
        """(seq, text) of every line in the job page's log, top to bottom."""
        rows = self.run(
            "return [...document.querySelectorAll('#log .line')]"
            ".map(e => [Number(e.dataset.seq), e.querySelector('.text').textContent])"
        )
        return [(int(seq), str(text)) for seq, text in rows]

    def alert(self) -> str | None:
        """The text of an open dialog (alert, confirm), or None."""
        from selenium.common.exceptions import NoAlertPresentException

        try:
            return str(self.driver.switch_to.alert.text)
        except NoAlertPresentException:
            return None

    def console_errors(self) -> list[dict[str, Any]]:
        """Console messages of level SEVERE since the last call: script errors and the
        Content-Security-Policy's refusals among them."""
        return [e for e in self.driver.get_log("browser") if e.get("level") == "SEVERE"]

    def screenshot(self, what: str) -> None:
        SCREENS.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(SCREENS / f"{what}.png"))


@pytest.fixture()
def page(driver: Any) -> Callable[[Cluster], Page]:
    """page(cluster) → the browser at that cluster's dashboard, signed out, console empty."""

    def make(cluster: Cluster, url: str | None = None) -> Page:
        made = Page(driver, url or cluster.url)
        made.open("/login")
        driver.delete_all_cookies()
        driver.set_window_size(1280, 900)
        made.console_errors()  # what earlier tests left
        return made

    return make


def token(cluster: Cluster, name: str, role: str) -> str:
    body = {"name": name, "role": role, "allow_process": role != "view"}
    return str(cluster.client.call("POST", "/api/v1/tokens", body)["token"])


def trigger_folder() -> Path:
    """A folder the job's user ("nobody") may look into, for the files that tell it to print."""
    folder = Path(tempfile.mkdtemp(prefix="gpubox-browser-"))
    folder.chmod(0o755)
    return folder


def test_signed_in_the_queue_shows_a_submitted_job_within_2_s_without_a_reload(
    make_cluster, page
) -> None:
    worker = {**WORKER, "fake_gpus": "1", "labels": "team=nlp"}
    cluster: Cluster = make_cluster(workers=1, worker_settings=worker)
    browser = page(cluster)
    browser.open("/")
    assert browser.driver.title.startswith("Sign in")  # not signed in: sent to the form
    chromium.sign_in(browser.driver, cluster.url, cluster.token)
    browser.run("window.gpuboxNotReloaded = true")
    running = cluster.submit("-", "sleep 60", gpus=1, name="holds the GPU")
    cluster.wait(running["id"], ("RUNNING",))
    submitted = time.monotonic()
    queued = cluster.submit("-", "true", gpus=1, name="waits for it", labels={"team": "nlp"})
    row = f"#queue table.queued a[href='/jobs/{queued['id']}']"
    chromium.wait(lambda: browser.count(row), 2 - (time.monotonic() - submitted), "the row")
    assert browser.run("return window.gpuboxNotReloaded") is True
    text = browser.text("#queue table.queued tbody tr")
    assert "waits for it" in text and "team=nlp" in text
    assert "not enough free GPUs: 0 of the 1 it needs" in text, text  # the scheduler's reason
    assert f"/jobs/{running['id']}" in browser.run(
        "return document.querySelector('#queue table.running').innerHTML"
    )
    browser.screenshot("queue")
    # A phone's width: the page scrolls down, never sideways (wide tables scroll in place).
    browser.driver.set_window_size(400, 860)
    browser.open("/")
    width = browser.run("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], width
    browser.screenshot("queue-phone")
    assert browser.console_errors() == []


def test_a_long_log_opens_at_its_newest_lines_and_loads_earlier_ones_on_demand(
    make_cluster, page
) -> None:
    cluster: Cluster = make_cluster(workers=1, worker_settings=WORKER)
    job = cluster.submit("-", "seq 1 2500", name="long")
    assert cluster.wait(job["id"])["log_lines"] == 2500
    browser = page(cluster)
    chromium.sign_in(browser.driver, cluster.url, cluster.token)
    browser.open(f"/jobs/{job['id']}")
    chromium.wait(lambda: browser.log_lines(), 10, "the log")
    assert browser.log_lines() == [(i, str(i)) for i in range(1501, 2501)]
    # Opened at its end, scrolled to the bottom.
    assert browser.run(
        "const l = document.getElementById('log');"
        " return l.scrollHeight - l.scrollTop - l.clientHeight < 4"
    )
    for first in (501, 1):
        browser.driver.find_element("id", "log-earlier").click()
        chromium.wait(lambda f=first: browser.log_lines()[0][0] == f, 10, f"lines from {first}")
    assert browser.log_lines() == [(i, str(i)) for i in range(1, 2501)]
    assert not browser.driver.find_element("id", "log-earlier").is_displayed()
    link = browser.driver.find_element("link text", "Download the whole log")
    assert link.get_attribute("href").endswith(f"/api/v1/jobs/{job['id']}/logs")
    whole = browser.driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        " fetch(arguments[0]).then(r => r.text()).then(done, e => done(String(e)));",
        link.get_attribute("href"),
    )
    assert whole.splitlines() == [str(i) for i in range(1, 2501)]  # as text, with the cookie


def test_a_live_log_shows_each_printed_line_within_1_s_and_stays_whole_across_a_cut(
    make_cluster, page
) -> None:
    cluster: Cluster = make_cluster(workers=1, worker_settings=WORKER)
    # The browser reaches the coordinator through a proxy that the test cuts.
    host, port = cluster.url.removeprefix("http://").rsplit(":", 1)
    proxy = CuttableProxy(host, int(port))
    url = f"http://127.0.0.1:{proxy.port}"
    folder = trigger_folder()
    try:
        browser = page(cluster, url)
        chromium.sign_in(browser.driver, url, cluster.token)
        job = cluster.submit("-", ["sh", "-c", TRIGGERED.format(d=folder)], name="printer")
        cluster.wait(job["id"], ("RUNNING",))
        browser.open(f"/jobs/{job['id']}")
        chromium.wait(lambda: browser.text("#log-state") == "following", 10, "the log stream")
        waited = []
        for i in range(5):
            printed = time.monotonic()
            (folder / f"go-{i}").touch()
            chromium.wait(
                lambda i=i: (i + 1, f"printed-{i}") in browser.log_lines(), 1.0, f"line {i}"
            )
            waited.append(time.monotonic() - printed)
        # The stream is cut, and the link stays down while the job prints five more lines.
        cut = threading.Thread(target=proxy.pause, args=(2.0,))
        cut.start()
        time.sleep(0.2)
        for i in range(5, 10):
            (folder / f"go-{i}").touch()
            wait_until(lambda i=i: len(cluster.lines(job["id"])) == i + 1, 5, f"line {i}")
        cut.join()
        chromium.wait(lambda: len(browser.log_lines()) == 10, 15, "the lines printed meanwhile")
        (folder / "go-10").touch()
        chromium.wait(lambda: len(browser.log_lines()) == 11, 5, "a line after the reconnect")
        browser.screenshot("job-log")
        (folder / "stop").touch()
        cluster.wait(job["id"])
        chromium.wait(
            lambda: browser.text("#log-state") == "job ended: FINISHED", 10, "the end shown"
        )
        assert browser.log_lines() == [(i + 1, f"printed-{i}") for i in range(11)]
        assert proxy.accepted > 1  # the page did connect again
        print(f"printed line to page: {', '.join(f'{s * 1000:.0f} ms' for s in waited)}")
    finally:
        proxy.close()
        (folder / "stop").touch()


def test_submit_and_admin_cancel_from_the_keyboard_and_view_is_neither_offered_nor_obeyed(
    make_cluster, page
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    cluster: Cluster = make_cluster(workers=1, worker_settings=WORKER)
    submitter = token(cluster, "ci", "submit")
    viewer = token(cluster, "wall", "view")
    from gpubox.client import Client

    for who, secret in (("submit", submitter), ("admin", cluster.token)):
        job = Client(cluster.url, submitter).submit(
            {"name": f"cancelled by {who}", "docker": {"image": "-", "command": "sleep 60"}}
        )
        cluster.wait(job["id"], ("RUNNING",))
        browser = page(cluster)
        chromium.sign_in(browser.driver, cluster.url, secret)
        browser.open(f"/jobs/{job['id']}")

        # From the keyboard: Tab until the Cancel button has the focus, then Enter.
        def press(key: str, driver: Any = browser.driver) -> None:
            ActionChains(driver).send_keys(key).perform()

        for _ in range(30):
            if browser.run("return document.activeElement.textContent") == "Cancel":
                break
            press(Keys.TAB)
        assert browser.run("return document.activeElement.textContent") == "Cancel"
        press(Keys.ENTER)
        asked = chromium.wait(browser.alert, 5, "the confirmation")
        assert asked == f"Cancel job {job['id']}?"
        if who == "submit":  # declined first: nothing happens
            browser.driver.switch_to.alert.dismiss()
            time.sleep(0.3)
            assert cluster.client.job(job["id"])["status"] == "RUNNING"
            press(Keys.ENTER)
            chromium.wait(browser.alert, 5, "the confirmation again")
        browser.driver.switch_to.alert.accept()
        assert cluster.wait(job["id"], timeout_s=15)["status"] == "CANCELLED"
        # The page after the form: the cancel asked for, then the job's end, without a reload.
        chromium.wait(lambda b=browser: b.text("h1 .status") == "CANCELLED", 10, "the status")
        assert browser.count("form[action$='/cancel']") == 0

    job = cluster.submit("-", "sleep 60", name="not for viewers")
    cluster.wait(job["id"], ("RUNNING",))
    browser = page(cluster)
    chromium.sign_in(browser.driver, cluster.url, viewer)
    browser.open(f"/jobs/{job['id']}")
    assert browser.count("form[action$='/cancel']") == 0
    assert "Tokens" not in browser.text("nav")
    # Forged from the viewer's own page, with its own valid CSRF token: refused.
    status = browser.driver.execute_async_script(
        """const done = arguments[arguments.length - 1];
        const csrf = document.querySelector("input[name=csrf]").value;
        fetch(arguments[0], {method: "POST", body: new URLSearchParams({csrf})})
          .then(r => done(r.status), e => done(String(e)));""",
        f"/jobs/{job['id']}/cancel",
    )
    assert status == 403
    assert cluster.client.job(job["id"])["status"] == "RUNNING"
    cluster.client.cancel(job["id"])


def test_a_cross_site_form_cannot_cancel_a_signed_in_users_job(make_cluster, page) -> None:
    cluster: Cluster = make_cluster(workers=1, worker_settings=WORKER)
    job = cluster.submit("-", "sleep 60", name="target")
    cluster.wait(job["id"], ("RUNNING",))
    browser = page(cluster)
    chromium.sign_in(browser.driver, cluster.url, cluster.token)
    # Another site (another port: another origin, the same "site" to SameSite, so the
    # session cookie goes along) whose page posts a form to the dashboard as it loads.
    attack = (
        f'<form method="post" action="{cluster.url}/jobs/{job["id"]}/cancel">'
        '<input name="csrf" value="guessed"></form>'
        "<script>document.forms[0].submit()</script>"
    ).encode()

    class Evil(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(attack)

        def log_message(self, *args: Any) -> None:
            pass

    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Evil)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    try:
        browser.driver.get(f"http://127.0.0.1:{evil.server_address[1]}/")
        chromium.wait(
            lambda: browser.driver.current_url.startswith(cluster.url), 10, "the form sent"
        )
        assert "the form did not come from this dashboard" in browser.text("main")
        assert cluster.client.job(job["id"])["status"] == "RUNNING"
    finally:
        evil.shutdown()
        cluster.client.cancel(job["id"])


def test_markup_in_a_name_label_and_log_is_text_colours_are_colours_and_no_script_runs(
    make_cluster, page
) -> None:
    cluster: Cluster = make_cluster(workers=1, worker_settings=WORKER)
    printed = (
        "echo '<script>alert(2)</script>'; printf '\\033[31mred\\033[0m plain\\n';"
        " printf '\\033[1;32mbold green\\033[0m\\n'; sleep 60"
    )
    job = cluster.submit("-", ["sh", "-c", printed], name=EVIL)
    # Labels choose workers: a job with this one waits, no worker having it.
    waiting = cluster.submit("-", "true", name=EVIL, labels={"k": EVIL})
    cluster.wait(job["id"], ("RUNNING",))
    wait_until(lambda: len(cluster.lines(job["id"])) == 3, 10, "the three lines")
    browser = page(cluster)
    chromium.sign_in(browser.driver, cluster.url, cluster.token)
    assert browser.text("#queue table.running td.name") == EVIL
    assert browser.text("#queue table.queued td.name") == EVIL
    assert f"k={EVIL}" in browser.text("#queue table.queued")  # the label, and the reason
    browser.open(f"/jobs/{job['id']}")
    chromium.wait(lambda: len(browser.log_lines()) == 3, 10, "the log")
    assert browser.text("h1 .name") == EVIL
    assert browser.log_lines()[0] == (1, "<script>alert(2)</script>")
    assert browser.log_lines()[1] == (2, "red plain")
    # No element came from the job: no image, no script in the log, only the page's own.
    assert browser.count("main img") == 0 and browser.count("#log script") == 0
    colours = browser.run(
        """const text = document.querySelectorAll('#log .line .text');
        const colour = e => getComputedStyle(e).color;
        const red = text[1].querySelector('.ansi-fg-1');
        const green = text[2].querySelector('.ansi-fg-2.ansi-bold');
        return [colour(red), colour(text[1]), colour(green), red.textContent,
                getComputedStyle(green).fontWeight];"""
    )
    red, plain, green, red_text, weight = colours
    assert red_text == "red" and red != plain and green not in (plain, red), colours
    assert int(weight) >= 600
    browser.screenshot("job-markup")
    browser.open("/history")
    assert browser.alert() is None
    assert browser.console_errors() == []
    for made in (job, waiting):
        cluster.client.cancel(made["id"])


def test_charts_draw_made_up_gpu_readings_and_workers_show_which_job_holds_which_gpu(
    make_cluster, page
) -> None:
    cluster: Cluster = make_cluster(workers=1, worker_settings={**WORKER, "fake_gpus": "3"})
    state = cluster.coordinator.config.state_dir
    gpus = [f"GPU-fake-worker-1-{i:04d}" for i in range(3)]
    readings = {
        gpus[0]: {"utilization": 90, "memory_used_mb": 60000, "power_w": 500.0},
        gpus[1]: {"utilization": 20, "memory_used_mb": 10000, "power_w": 150.0},
        gpus[2]: {"utilization": 55, "memory_used_mb": 30000, "power_w": 300.0},
    }
    write_fake_readings(state, readings)
    job = cluster.submit("-", "sleep 60", gpus=2, name="two GPUs")
    held = cluster.wait(job["id"], ("RUNNING",))["result"]["gpus"]
    other = cluster.submit("-", "sleep 60", gpus=1, name="one GPU")
    alone = cluster.wait(other["id"], ("RUNNING",))["result"]["gpus"]
    wait_until(lambda: len(cluster.client.telemetry(job["id"])["points"]) >= 6, 20, "points")
    browser = page(cluster)
    chromium.sign_in(browser.driver, cluster.url, cluster.token)
    browser.open(f"/jobs/{job['id']}")
    chromium.wait(lambda: browser.count("#charts canvas") >= 3, 10, "three charts")
    time.sleep(0.5)  # the first draw
    # In the utilization chart, the line of the job's first GPU (by uuid) is drawn in the
    # first colour, the second's in the second; the busier GPU's line sits higher.
    first, second = sorted(held)
    busy = {g: readings[g]["utilization"] for g in held}
    rows = browser.run(
        """const canvas = document.querySelector('#charts .chart canvas');
        const {width, height} = canvas;
        const data = canvas.getContext('2d').getImageData(0, 0, width, height).data;
        const rows = colour => {
          const found = [];
          for (let i = 0; i < data.length; i += 4) {
            const d = Math.abs(data[i] - colour[0]) + Math.abs(data[i + 1] - colour[1])
              + Math.abs(data[i + 2] - colour[2]);
            if (d < 40 && data[i + 3] > 200) found.push(Math.floor(i / 4 / width));
          }
          return found;
        };
        return [rows([0x09, 0x69, 0xda]), rows([0xcf, 0x22, 0x2e])];"""
    )
    blue, red = rows
    assert len(blue) > 50 and len(red) > 50, (len(blue), len(red))
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    higher = first if busy[first] > busy[second] else second
    # canvas rows grow downwards: the busier line has the smaller row
    assert (median(blue) < median(red)) == (higher == first), (median(blue), median(red), busy)
    legend = browser.text("#charts .chart")
    assert first[:12] in legend
    browser.run("document.getElementById('charts').scrollIntoView()")
    browser.screenshot("job-charts")

    browser.open("/workers")

    def holder(uuid: str) -> str:
        return str(
            browser.run(
                """for (const row of document.querySelectorAll('#workers table.gpus tbody tr')) {
                  if (row.querySelector('code').textContent === arguments[0]) {
                    return row.lastElementChild.textContent.trim();
                  }
                }
                return null;""",
                uuid,
            )
        )

    chromium.wait(lambda: holder(alone[0]) == str(other["id"]), 5, "the GPUs' holders")
    assert [holder(g) for g in held] == [str(job["id"])] * 2
    assert "connected" in browser.text("#workers .state")
    browser.screenshot("workers")
    assert browser.console_errors() == []
    for made in (job, other):
        cluster.client.cancel(made["id"])
