"""gpubox as an appliance: the single-file build, scripts/install, the systemd units."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import IMAGE, wait_until

ROOT = Path(__file__).resolve().parent.parent
UNITS = ("gpubox-coordinator.service", "gpubox-worker.service")

pytestmark = [pytest.mark.slow, pytest.mark.serial]


@pytest.fixture()
def clean_python(tmp_path: Path) -> Path:
    """A Python with nothing installed: no gpubox, none of its dependencies."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    check = subprocess.run([str(python), "-c", "import gpubox"], capture_output=True, cwd=tmp_path)
    assert check.returncode != 0  # gpubox is not importable there
    return python


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.docker
@pytest.mark.timeout(600)
def test_the_single_file_runs_a_real_job_where_no_gpubox_is_installed(
    single_file: Path, clean_python: Path, tmp_path: Path
) -> None:
    work = tmp_path / "clean"
    work.mkdir()
    http = f"127.0.0.1:{free_port()}"
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "SHIV_ROOT": str(tmp_path / "shiv"),
        "GPUBOX_STATE_DIR": str(work / "state"),
        "GPUBOX_URL": f"http://{http}",
    }
    run = [str(clean_python), str(single_file)]
    version = subprocess.run([*run, "--version"], env=env, cwd=work, capture_output=True, text=True)
    assert version.returncode == 0, version.stderr
    assert re.fullmatch(r"gpubox \S+ \(git [0-9a-f]{7,}(-dirty)?\)\n", version.stdout)
    log = open(tmp_path / "up.log", "w")  # noqa: SIM115
    up = subprocess.Popen(
        [*run, "up", "--http", http, "--bind", f"tcp://127.0.0.1:{free_port()}"],
        env=env,
        cwd=work,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def is_up() -> bool:
            said = (tmp_path / "up.log").read_text()
            assert up.poll() is None, said
            return "gpubox is up" in said

        wait_until(is_up, 120, "gpubox up to start", every_s=0.2)
        job = subprocess.run(
            [*run, "submit", "--follow", IMAGE, "echo", "from the single file"],
            env=env,
            cwd=work,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert job.returncode == 0, job.stderr
        assert job.stdout == "from the single file\n"
    finally:
        up.terminate()
        up.wait(60)
        log.close()
    assert up.returncode == 0


def snapshot(root: Path) -> list[tuple[str, int, int, int, str]]:
    """Every path under root with its mode, size, mtime and link target."""
    found = []
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        target = os.readlink(path) if path.is_symlink() else ""
        found.append(
            (str(path.relative_to(root)), stat.st_mode, stat.st_size, stat.st_mtime_ns, target)
        )
    return found


def install(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(ROOT / "scripts" / "install"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.timeout(600)
def test_install_lays_out_every_file_and_a_second_run_changes_nothing(
    single_file: Path, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    install("--role", "both", "--root", str(root), "--from", str(single_file))
    expected = [
        "usr/local/bin/gpubox",
        "usr/lib/sysusers.d/gpubox.conf",
        "etc/systemd/system/gpubox-coordinator.service",
        "etc/systemd/system/gpubox-worker.service",
        "etc/gpubox/coordinator.toml",
        "etc/gpubox/worker.toml",
        "etc/gpubox/client.toml",
        "var/lib/gpubox/keys/coordinator.key",
        "var/lib/gpubox/keys/coordinator.key_secret",
        f"var/lib/gpubox/keys/workers/{socket.gethostname()}.key_secret",
        f"var/lib/gpubox/keys/allowed/{socket.gethostname()}.key",
    ]
    for relative in expected:
        assert (root / relative).exists(), relative
    for unit in UNITS:  # enabled: linked as they will be seen from / on that box
        wants = root / "etc/systemd/system/multi-user.target.wants" / unit
        assert os.readlink(wants) == f"/etc/systemd/system/{unit}"
    assert os.access(root / "usr/local/bin/gpubox", os.X_OK)
    assert (root / "usr/local/lib/gpubox/gpubox").read_bytes() == single_file.read_bytes()
    # unpacked once, readable by every user: no one's command unpacks it into their home
    unpacked = list((root / "usr/local/lib/gpubox/unpacked").glob("gpubox_*/site-packages"))
    assert (
        len(unpacked) == 1
        and (unpacked[0] / "gpubox" / "cli" / "__init__.py").stat().st_mode & 0o004
    )
    assert "SHIV_ROOT=/usr/local/lib/gpubox/unpacked" in (root / "usr/local/bin/gpubox").read_text()
    assert re.search(r"^gpubox:x:\d+:\d+:", (root / "etc/passwd").read_text(), re.MULTILINE)
    assert (root / "var/lib/gpubox").stat().st_mode & 0o777 == 0o700
    # where the units expect things
    for unit in UNITS:
        text = (root / "etc/systemd/system" / unit).read_text()
        command = re.search(r"^ExecStart=(\S+) \w+ --config (\S+)$", text, re.MULTILINE)
        assert command is not None
        assert (root / command.group(1).lstrip("/")).exists()
        assert (root / command.group(2).lstrip("/")).exists()
        assert "StateDirectory=gpubox" in text
    assert 'state_dir = "/var/lib/gpubox"' in (root / "etc/gpubox/coordinator.toml").read_text()

    before = snapshot(root)
    again = install("--role", "both", "--root", str(root), "--from", str(single_file))
    assert snapshot(root) == before
    assert "wrote" not in again.stderr and "made" not in again.stderr

    # an admin's edit of the settings survives a reinstall
    (root / "etc/gpubox/worker.toml").write_text('[worker]\nstate_dir = "/var/lib/gpubox"\n')
    install("--role", "both", "--root", str(root), "--from", str(single_file))
    assert (root / "etc/gpubox/worker.toml").read_text().startswith("[worker]\nstate_dir")

    # an admin's drop-in for a unit goes with the units
    (root / "etc/systemd/system/gpubox-worker.service.d").mkdir()
    (root / "etc/systemd/system/gpubox-worker.service.d/local.conf").write_text("[Service]\n")
    install("--uninstall", "--root", str(root))
    assert not (root / "usr/local/bin/gpubox").exists()
    assert not (root / "usr/local/lib/gpubox").exists()
    assert not (root / "etc/systemd/system/gpubox-worker.service").exists()
    assert not list((root / "etc/systemd/system").rglob("gpubox-*"))
    assert (root / "var/lib/gpubox/keys/coordinator.key_secret").exists()  # state kept
    assert (root / "etc/gpubox/coordinator.toml").exists()
    install("--purge", "--root", str(root))
    assert not (root / "var/lib/gpubox").exists() and not (root / "etc/gpubox").exists()
    for table in ("passwd", "group", "shadow", "gshadow"):  # the user and its group are gone
        assert not any(
            line.startswith("gpubox:") for line in (root / "etc" / table).read_text().splitlines()
        ), table


@pytest.fixture()
def analyze() -> Iterator[str]:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed here")
    yield found


def test_both_units_pass_systemd_analyze_verify(analyze: str) -> None:
    # verify checks that ExecStart's binary exists: scripts/setup-host puts one in place.
    assert os.access("/usr/local/bin/gpubox", os.X_OK), "run scripts/setup-host first"
    result = subprocess.run(
        [analyze, "verify", *UNITS],
        cwd=ROOT / "systemd",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


@pytest.mark.parametrize(("unit", "at_most"), [(UNITS[0], 1.5), (UNITS[1], 2.5)])
def test_the_units_are_hardened(analyze: str, unit: str, at_most: float) -> None:
    result = subprocess.run(
        [analyze, "security", "--offline=yes", unit],
        cwd=ROOT / "systemd",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    exposure = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    assert exposure is not None, result.stdout + result.stderr
    assert float(exposure.group(1)) <= at_most
