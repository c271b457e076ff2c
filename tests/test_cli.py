"""The real `gpubox` command in subprocesses, as a new user runs it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpubox import exits, keys
from gpubox.store import open_store
from tests.conftest import IMAGE, remove_containers, wait_until

GPUBOX = [sys.executable, "-m", "gpubox"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GPUBOX, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture()
def up(tmp_path: Path, docker_client) -> Iterator[dict[str, str]]:
    """`gpubox up` running in a subprocess; yields the environment a client on the box has."""
    http_port, link_port = free_port(), free_port()
    env = {
        **os.environ,
        "GPUBOX_STATE_DIR": str(tmp_path / "state"),
        "GPUBOX_URL": f"http://127.0.0.1:{http_port}",
    }
    env.pop("GPUBOX_TOKEN", None)
    log = open(tmp_path / "up.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            *GPUBOX,
            "up",
            "--http",
            f"127.0.0.1:{http_port}",
            "--bind",
            f"tcp://127.0.0.1:{link_port}",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def healthy() -> bool:
        assert proc.poll() is None, (tmp_path / "up.log").read_text()
        try:
            with urllib.request.urlopen(f"{env['GPUBOX_URL']}/healthz", timeout=1) as answer:
                return answer.status == 200
        except OSError:
            return False

    wait_until(healthy, 30, "gpubox up to answer /healthz")
    wait_until(lambda: "connected" in run("workers", env=env).stdout, 30, "its worker")
    yield env
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=30) == 0, (tmp_path / "up.log").read_text()
    finally:
        proc.kill()
        log.close()
        # a plain stop leaves job containers for the next start: this box has no next start.
        # Only this coordinator's (its key's fingerprint): other tests run beside this one.
        owner = keys.fingerprint(
            keys.load_public(str(tmp_path / "state" / "keys" / "coordinator.key"))
        )
        remove_containers(docker_client, {socket.gethostname()}, owner)


@pytest.mark.docker
@pytest.mark.slow
def test_up_submit_follow_show_ls_tail_cancel(up: dict[str, str], tmp_path: Path):
    env = up
    # It says where its dashboard is, and how to sign in.
    said = (tmp_path / "up.log").read_text()
    token_file = Path(env["GPUBOX_STATE_DIR"]) / "token"
    assert f"dashboard: {env['GPUBOX_URL']}/ (sign in with the token in {token_file})" in said
    with urllib.request.urlopen(f"{env['GPUBOX_URL']}/login", timeout=5) as answer:
        assert answer.status == 200 and b"API token" in answer.read()
    result = run(
        "submit",
        "--follow",
        "--name",
        "cli job",
        "-e",
        "WHO=cli",
        IMAGE,
        "sh",
        "-c",
        'echo "hello $WHO"; echo oops >&2; exit 4',
        env=env,
    )
    assert result.returncode == 4, result.stderr
    assert result.stdout == "hello cli\n"  # the job's output alone: its id goes to stderr
    job_id = result.stderr.split()[1]
    assert result.stderr.startswith(f"job {job_id} queued; following its output\n")
    assert "oops" in result.stderr

    shown = run("show", job_id, env=env)
    assert shown.returncode == 0
    assert "ERROR" in shown.stdout and "exit code  4" in shown.stdout
    assert " submitter  local\n" in shown.stdout  # `up`'s local token submitted it

    listed = run("ls", env=env)
    assert "cli job" in listed.stdout and job_id in listed.stdout
    assert "SUBMITTER" in listed.stdout.splitlines()[0]
    header, *rows = listed.stdout.splitlines()
    column = header.split().index("SUBMITTER")
    # (CREATED takes two words: a date and a time)
    assert [line.split()[column + 1] for line in rows] == ["local"]

    tailed = run("tail", job_id, env=env)
    assert tailed.returncode == 4 and tailed.stdout == "hello cli\n"

    logs = run("logs", job_id, env=env)
    assert logs.stdout == "hello cli\n" and logs.stderr == "oops\n"

    assert tailed.stderr == f"oops\ngpubox: job {job_id} ERROR: exit code 4\n"  # how it ended

    refused = run("cancel", job_id, env=env)
    assert refused.returncode == 65  # exits.INVALID: the coordinator refused it (409)
    assert "already ERROR" in refused.stderr

    # a name that would break the table or drive the terminal is shown escaped
    odd = run(
        "submit", "--name", "two\nlines \x1b[2J", IMAGE, "sleep", "30", env=env
    ).stdout.strip()
    assert f"{odd}  " in run("ls", env=env).stdout
    assert "two\\nlines \\x1b[2J" in run("ls", env=env).stdout
    assert "two\\nlines \\x1b[2J" in run("show", odd, env=env).stdout
    # so is every other field show prints: the command comes from the submitter (an image
    # like that is no image reference: refused at submission)
    bad_image = run("submit", f"{IMAGE}\x1b]0;t\x07", "true", env=env)
    assert bad_image.returncode == 65 and "docker.image" in bad_image.stderr
    sneaky = run("submit", IMAGE, "echo", "\x1b]0;t\x07\x1b[31mred", env=env).stdout.strip()
    shown = run("show", sneaky, env=env).stdout
    assert "\x1b" not in shown and "\x07" not in shown
    assert "\\x1b]0;t\\x07" in shown and "\\x1b[31mred" in shown
    # show says what a job asks for; a follow of a job no worker can take says why it waits
    waiting = subprocess.Popen(
        [*GPUBOX, "submit", "-f", "-l", "zone=nowhere", "--timeout", "60", IMAGE, "true"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert waiting.stderr is not None
    stuck = waiting.stderr.readline().split()[1]
    assert "label zone=nowhere, timeout 60 s" in run("show", stuck, env=env).stdout
    assert waiting.stderr.readline() == (
        f"gpubox: job {stuck} is still queued: no connected worker has the labels zone=nowhere\n"
    )
    run("cancel", stuck, env=env)
    assert waiting.wait(timeout=20) == 130

    # Ctrl-C stops following, not the job, and says so
    follower = subprocess.Popen(
        [*GPUBOX, "tail", odd], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(2)
    follower.send_signal(signal.SIGINT)
    _, said = follower.communicate(timeout=20)
    assert follower.returncode == 130
    assert said.endswith(
        f"stopped following job {odd}, which is not cancelled (gpubox cancel {odd} stops it)\n"
    )
    assert "RUNNING" in run("show", odd, env=env).stdout
    run("cancel", odd, env=env)
    wait_until(lambda: "CANCELLED" in run("show", odd, env=env).stdout, 30, "the cancel")
    assert "cancel requested" not in run("show", odd, env=env).stdout  # it is done

    ok = run("submit", IMAGE, "true", env=env)
    assert ok.returncode == 0 and ok.stdout.strip().isdigit()

    # what a job printed comes out as printed, escape sequences too, also into a pipe
    many = run(
        "submit", "-f", IMAGE, "sh", "-c", r"printf '\033[1mbold\033[0m\n'; seq 200000", env=env
    )
    assert many.returncode == 0 and many.stdout.startswith("\x1b[1mbold\x1b[0m\n1\n2\n")
    many_id = many.stderr.split()[1]
    assert run("logs", many_id, env=env).stdout == many.stdout

    # a follower whose reader goes away (`gpubox tail 42 | head -1`) stops at once, quietly
    follower = subprocess.Popen(
        [*GPUBOX, "tail", many_id], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert follower.stdout is not None and follower.stderr is not None
    assert follower.stdout.readline() == b"\x1b[1mbold\x1b[0m\n"
    follower.stdout.close()
    try:
        assert follower.wait(timeout=20) == 128 + signal.SIGPIPE  # not 5 minutes of retries
    finally:
        follower.kill()
    assert follower.stderr.read() == b""

    # output that cannot be written (a full disk) is one line and exit 1, not a traceback
    for args in (["ls"], ["logs", many_id], ["tail", many_id]):
        with open("/dev/full", "w") as full:
            result = subprocess.run(
                [*GPUBOX, *args],
                env=env,
                stdout=full,
                stderr=subprocess.PIPE,
                text=True,
                timeout=30,
            )
        assert (result.returncode, result.stderr) == (
            1,
            "Error: cannot write the output: [Errno 28] No space left on device\n",
        ), args


def test_client_errors_are_one_clear_line(tmp_path: Path):
    env = {**os.environ, "GPUBOX_URL": f"http://127.0.0.1:{free_port()}", "GPUBOX_TOKEN": "x"}
    down = run("show", "1", env=env)
    assert down.returncode == 69  # exits.UNAVAILABLE: CI may retry the step
    assert "cannot reach the coordinator" in down.stderr
    assert "Traceback" not in down.stderr
    # tail too, at once: it waits for a coordinator only after it has reached it once
    tail = run("tail", "1", env=env, timeout=20)
    assert tail.returncode == 69 and "cannot reach the coordinator" in tail.stderr

    # bad options are refused before anything is sent
    twice = run("submit", "-e", "A=1", "-e", "A=2", "img", env=env)
    assert twice.returncode == 2 and "A is given twice, as '1' and '2'" in twice.stderr
    nan = run("submit", "--timeout", "nan", "img", env=env)
    assert nan.returncode == 2 and "nan is not a number of seconds" in nan.stderr

    bad = run("ls", env={**env, "GPUBOX_URL": "ftp://nope"})
    assert bad.returncode == 2 and "url" in bad.stderr

    bad_setting = run("worker", env={**env, "GPUBOX_MAX_JOBS": "many"})
    assert bad_setting.returncode == 2
    assert "max_jobs" in bad_setting.stderr and "Traceback" not in bad_setting.stderr

    no_token = run("ls", env={**env, "GPUBOX_TOKEN": "", "GPUBOX_STATE_DIR": str(tmp_path)})
    assert no_token.returncode == 1
    assert f"no API token: set GPUBOX_TOKEN or --token (no local token file in {tmp_path}" in (
        no_token.stderr
    )


@pytest.mark.docker
def test_up_takes_its_worker_name_from_the_config_file_and_says_where_clients_find_it(
    tmp_path: Path, docker_client
):
    """Flag > environment > file > default holds for `up`'s worker name too; on ports and a
    state folder of its own, `up`'s hint tells a client on the box where to look."""
    http_port, link_port = free_port(), free_port()
    state = tmp_path / "state"
    config = tmp_path / "up.toml"
    config.write_text('[worker]\nname = "tomlbox"\nmax_jobs = 2\n')
    env = {**os.environ, "GPUBOX_STATE_DIR": str(state)}
    env.pop("GPUBOX_WORKER_NAME", None)
    log = tmp_path / "up.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                *GPUBOX,
                "up",
                "--config",
                str(config),
                "--http",
                f"127.0.0.1:{http_port}",
                "--bind",
                f"tcp://127.0.0.1:{link_port}",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        client_env = {**env, "GPUBOX_URL": f"http://127.0.0.1:{http_port}"}
        wait_until(
            lambda: "tomlbox" in run("workers", env=client_env).stdout, 30, "the worker tomlbox"
        )
        assert socket.gethostname() not in run("workers", env=client_env).stdout
        hint = f"GPUBOX_URL=http://127.0.0.1:{http_port} GPUBOX_STATE_DIR={state} gpubox submit"
        assert hint in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        finally:
            proc.kill()
            remove_containers(docker_client, {"tomlbox"})


def test_token_commands_work_on_the_coordinators_store_and_only_there(tmp_path: Path):
    env = {**os.environ, "GPUBOX_STATE_DIR": str(tmp_path / "state")}
    env.pop("GPUBOX_DB", None)
    stray = run("token", "create", "ci", env=env)  # no coordinator ever ran here
    assert stray.returncode != 0 and stray.stdout == ""
    assert f"no store at {tmp_path / 'state' / 'gpubox.db'}: is {tmp_path / 'state'}" in (
        stray.stderr
    )
    assert not (tmp_path / "state" / "gpubox.db").exists()

    (tmp_path / "state").mkdir()
    db = f"sqlite:///{tmp_path / 'state' / 'gpubox.db'}"
    open_store(db).close()  # as a coordinator does
    empty = run("token", "list", env=env)
    assert empty.stdout == "" and empty.stderr == f"no tokens in {db}\n"
    made = run("token", "create", "ci", env=env)
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith("gpbx_") and "shown only this once" in made.stderr
    assert f"created in {db}" in made.stderr  # which store: a coordinator elsewhere would 401
    header, row = run("token", "list", env=env).stdout.splitlines()
    assert header.split() == [
        *("NAME", "ROLE", "PROCESS", "MAX", "GPUS", "MAX", "RUN", "MAX", "QUEUED"),
        *("CREATED", "(UTC)"),
    ]
    assert row.split()[:6] == ["ci", "submit", "-", "-", "-", "-"]
    trusted = run("token", "create", "trusted", "--allow-process", "--max-gpus", "8", env=env)
    assert "(submit, may use process workers; max_gpus 8)" in trusted.stderr
    listed = run("token", "list", env=env).stdout.splitlines()
    assert listed[2].split()[:6] == ["trusted", "submit", "yes", "8", "-", "-"]
    # caps change, and lift, by name
    changed = run("token", "set", "trusted", "--max-queued", "500", "--max-gpus", "none", env=env)
    assert changed.returncode == 0 and "token 'trusted': max_queued 500" in changed.stderr
    assert run("token", "list", env=env).stdout.splitlines()[2].split()[3:6] == ["-", "-", "500"]
    bad = run("token", "set", "trusted", "--max-gpus", "-3", env=env)
    assert bad.returncode == 2 and "is not a whole number from 0, nor none" in bad.stderr
    nothing = run("token", "set", "trusted", env=env)
    assert nothing.returncode == 2 and "name a cap to change" in nothing.stderr
    nobody = run("token", "set", "nobody", "--max-gpus", "1", env=env)
    assert nobody.returncode != 0 and "no token named 'nobody'" in nobody.stderr
    assert run("token", "revoke", "trusted", env=env).returncode == 0
    assert run("token", "revoke", "ci", env=env).returncode == 0
    again = run("token", "revoke", "ci", env=env)
    assert again.returncode != 0 and "no token named 'ci'" in again.stderr


def test_a_worker_offering_no_gpus_does_not_ask_nvml_and_keys_list_says_when_empty(
    tmp_path: Path,
):
    env = {**os.environ, "GPUBOX_STATE_DIR": str(tmp_path / "state")}
    listed = run("keys", "list", env=env)
    assert listed.returncode == 0 and listed.stdout == ""
    assert "no worker keys on the allow list" in listed.stderr
    keys.init(env["GPUBOX_STATE_DIR"])
    keys.add_worker(env["GPUBOX_STATE_DIR"], "w1")
    header, row = run("keys", "list", env=env).stdout.splitlines()
    assert header.split() == ["WORKER", "PUBLIC", "KEY", "MAY", "CLAIM"]
    assert row.split()[0] == "w1" and row.split()[2] == "anything"
    link = f"tcp://127.0.0.1:{free_port()}"  # nobody there: it keeps trying, quietly
    worker = subprocess.Popen(
        [
            *GPUBOX,
            "worker",
            "--runtime",
            "process",
            "--gpus",
            "none",
            "--name",
            "w1",
            "--coordinator",
            link,
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            worker.wait(timeout=2)  # running
    finally:
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=30)
    assert worker.returncode == 0, stderr
    assert "NVML" not in stderr


def test_log_level_warning_keeps_no_line_per_job(tmp_path: Path) -> None:
    """--log-level warning: a coordinator and a worker that run a job log nothing about it
    (at info, the default, they log its receipt, start and end)."""
    state = str(tmp_path / "state")
    env = {**os.environ, "GPUBOX_STATE_DIR": state}
    env.pop("GPUBOX_TOKEN", None)
    keys.init(state)
    keys.add_worker(state, "w1")
    http, link = f"127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    logs = {name: tmp_path / f"{name}.log" for name in ("coordinator", "worker")}
    commands = {
        "coordinator": ["coordinator", "--http", http, "--bind", link],
        "worker": ["worker", "--runtime", "process", "--gpus", "none", "--name", "w1"],
    }
    procs = []
    try:
        for name, command in commands.items():
            with open(logs[name], "w") as out:
                procs.append(
                    subprocess.Popen(
                        [*GPUBOX, *command, "--log-level", "warning"],
                        env={**env, "GPUBOX_COORDINATOR": link},
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
        client = {**env, "GPUBOX_URL": f"http://{http}"}
        wait_until(lambda: "connected" in run("workers", env=client).stdout, 30, "the worker")
        done = run("submit", "--follow", "-", "sh", "-c", "echo hello", env=client)
        assert done.returncode == 0 and "hello" in done.stdout, done.stderr
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            finally:
                proc.kill()
    said = {name: log.read_text() for name, log in logs.items()}
    assert " INFO " not in said["coordinator"] + said["worker"], said
    assert "ended FINISHED" not in said["coordinator"] and "received" not in said["worker"]


def test_server_errors_are_one_clear_line_and_nothing_starts(tmp_path: Path):
    env = {**os.environ, "GPUBOX_STATE_DIR": str(tmp_path / "state")}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = run("up", "--http", f"127.0.0.1:{port}", "--bind", "tcp://127.0.0.1:0", env=env)
    assert busy.returncode == 2, busy.stderr
    assert f"http: cannot listen on 127.0.0.1:{port}" in busy.stderr
    assert "Traceback" not in busy.stderr
    missing = run("up", "--mount", "data=/no/such/folder", env=env)
    assert missing.returncode == 2
    assert "mounts: data: /no/such/folder is not a folder on this box" in missing.stderr
    assert "Docker" not in missing.stderr and "serving" not in missing.stderr
    assert "Usage:" not in missing.stderr  # one line, not a usage block
    bad = run("worker", env={**env, "GPUBOX_STOP_GRACE": "abc"})
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "Error: stop_grace_s: 'abc' is not a valid float"
    ]
    # A list flag given twice keeps both (the bad one first: were only the last kept, the
    # worker would start)
    twice = run("worker", "--mount", "a=/no/such", "--mount", f"b={tmp_path}", env=env, timeout=20)
    assert twice.returncode == 2 and "mounts: a: /no/such is not a folder" in twice.stderr
    labels = run("worker", "--label", "nokey", "--label", "zone=a", env=env, timeout=20)
    assert labels.returncode == 2 and "nokey" in labels.stderr


def test_help_teaches_every_command():
    result = run("--help", env=dict(os.environ))
    for command in (
        "up",
        "coordinator",
        "worker",
        "submit",
        "show",
        "ls",
        "logs",
        "tail",
        "cancel",
        "workers",
        "token",
    ):
        assert f"  {command} " in result.stdout
    submit = run("submit", "--help", env=dict(os.environ))
    assert "GPUBOX_URL" in submit.stdout and "Examples" in submit.stdout


@pytest.mark.docker
def test_a_coordinator_that_cannot_start_leaves_the_running_ones_token_alone(
    up: dict[str, str], tmp_path: Path
):
    env = up
    token_file = Path(env["GPUBOX_STATE_DIR"]) / "token"
    before = token_file.read_text()
    http = env["GPUBOX_URL"].removeprefix("http://")  # taken by the running one
    second = run(
        "coordinator",
        "--db",
        f"sqlite:///{tmp_path}/other.db",
        "--http",
        http,
        "--bind",
        f"tcp://127.0.0.1:{free_port()}",
        env=env,
    )
    assert second.returncode == 2 and "cannot listen on" in second.stderr, second.stderr
    assert token_file.read_text() == before  # clients on this box still get in
    assert run("ls", env=env).returncode == 0


def test_version_inside_another_repository_does_not_claim_its_revision(tmp_path: Path) -> None:
    project = tmp_path / "someone-elses-project"
    (project / "lib").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    subprocess.run(
        [
            "git",
            "-C",
            str(project),
            "-c",
            "user.email=a@b",
            "-c",
            "user.name=a",
            "commit",
            "--allow-empty",
            "-qm",
            "theirs",
        ],
        check=True,
    )
    shutil.copytree(Path(__file__).parent.parent / "gpubox", project / "lib" / "gpubox")
    (project / "lib" / "gpubox" / "_revision.py").unlink(missing_ok=True)
    shown = subprocess.run(
        [sys.executable, "-m", "gpubox", "--version"],
        env={**os.environ, "PYTHONPATH": str(project / "lib")},
        capture_output=True,
        text=True,
        check=True,
        cwd=str(tmp_path),
    )
    assert shown.stdout.strip() == "gpubox 0.1.0 (unknown)"


@pytest.mark.parametrize("script", ["demo", "test", "setup-host"])
def test_the_scripts_help_installs_and_starts_nothing(script: str) -> None:
    root = Path(__file__).resolve().parent.parent
    shown = subprocess.run(
        [str(root / "scripts" / script), "--help"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    assert f"usage: scripts/{script}" in shown.stdout and shown.stderr == ""


def test_readme_gives_the_exit_code_table_as_gpubox_exits_has_it() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for code in exits.TABLE:
        row = f"| {code.code} | {code.meaning} | {'yes' if code.retry else 'no'} |"
        assert row in readme, row
