"""Reading a container's log from the json-file driver's own file (gpubox.worker.logfile): the
same entries the engine's API gives, a follow that ends only once the container exited and the
file was read to its end, the tail read from the end, and the cases where the worker must use
the API instead."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from gpubox.worker import docker_runtime, lines, logreader
from gpubox.worker.dockerlogs import DockerLogs
from gpubox.worker.lines import normalize_ts
from gpubox.worker.logfile import JsonLogFile, usable_log_file
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(60)

SCRIPT = "echo one; echo two >&2; seq 1 3000; printf 'no newline' >&2"


def entry(text: str, stream: str = "stdout", ts: str = "2024-05-01T12:00:00.000000001Z") -> bytes:
    return json.dumps({"log": text, "stream": stream, "time": ts}).encode() + b"\n"


def normalized(entries: list[tuple[str, bytes, bytes]]) -> list[tuple[str, str, bytes]]:
    return [(stream, normalize_ts(ts.decode()), data) for stream, ts, data in entries]


def read_all(logs: Any, follow: bool, **kwargs: Any) -> list[tuple[str, bytes, bytes]]:
    return [e for batch in logs.batches(follow, **kwargs) for e in batch]


@pytest.fixture
def container(docker_client: docker.DockerClient, image: str) -> Iterator[Any]:
    made = docker_client.containers.run(image, ["sh", "-c", f"sleep 0.5; {SCRIPT}"], detach=True)
    yield made
    made.remove(force=True)


@pytest.mark.docker
def test_a_follow_gives_what_the_api_gives_and_ends_after_the_exit(
    container: Any, docker_client: docker.DockerClient
) -> None:
    root = docker_client.info()["DockerRootDir"]
    path = usable_log_file(container, root)  # LogPath is not in attrs before a reload
    assert path is not None and path.endswith(f"{container.id}-json.log")
    logs = JsonLogFile(path, container.id)
    got: list[tuple[str, bytes, bytes]] = []
    follow = threading.Thread(target=lambda: got.extend(read_all(logs, follow=True)))
    follow.start()
    container.wait()
    time.sleep(0.2)
    assert follow.is_alive()  # the file alone does not say the container ended
    logs.container_exited()
    follow.join(5)
    assert not follow.is_alive()
    api = read_all(DockerLogs(docker_client.api, container.id), follow=False)
    # Stream, time and text of every entry, in the same order (the file drops a time's
    # trailing zeros, the API pads it to nine digits: the reader normalises both).
    assert normalized(got) == normalized(api)
    assert ("stderr", b"no newline") in [(s, d) for s, _, d in got]
    assert len(got) == 3003


def test_tail_reads_the_last_entries_from_the_end(tmp_path: Path) -> None:
    path = tmp_path / "log.json"
    path.write_bytes(
        b"".join(entry(f"line {i}\n", ts=f"2024-05-01T12:00:{i % 60:02d}Z") for i in range(5000))
    )
    logs = JsonLogFile(str(path), "c")
    every = read_all(logs, follow=False)
    assert len(every) == 5000
    assert read_all(logs, follow=False, tail=1000) == every[-1000:]
    assert read_all(logs, follow=False, tail=10_000) == every
    path.write_bytes(b"")
    assert read_all(logs, follow=False, tail=10) == []


def test_a_line_written_in_two_parts_is_read_once_whole(tmp_path: Path) -> None:
    path = tmp_path / "log.json"
    path.write_bytes(b"")
    logs = JsonLogFile(str(path), "c")
    got: list[tuple[str, bytes, bytes]] = []
    follow = threading.Thread(target=lambda: got.extend(read_all(logs, follow=True)))
    follow.start()
    whole = entry("split across two writes\n", "stderr")
    with open(path, "ab") as fh:
        fh.write(whole[:20])
        fh.flush()
        time.sleep(0.1)  # the follow reads the first part meanwhile
        fh.write(whole[20:] + entry("next\n"))
    time.sleep(0.1)
    logs.container_exited()
    follow.join(5)
    assert [(s, d) for s, _, d in got] == [
        ("stderr", b"split across two writes\n"),
        ("stdout", b"next\n"),
    ]


def test_a_line_that_is_not_an_entry_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "log.json"
    path.write_bytes(entry("a\n") + b'{"log": "cut sho\n' + b"[1, 2]\n" + entry("b\n"))
    with caplog.at_level(logging.WARNING):
        got = read_all(JsonLogFile(str(path), "c"), follow=False)
    assert [d for _, _, d in got] == [b"a\n", b"b\n"]
    assert sum("skipped" in r.getMessage() for r in caplog.records) == 2


def test_close_ends_a_follow(tmp_path: Path) -> None:
    path = tmp_path / "log.json"
    path.write_bytes(entry("a\n"))
    logs = JsonLogFile(str(path), "c")
    got: list[tuple[str, bytes, bytes]] = []
    follow = threading.Thread(target=lambda: got.extend(read_all(logs, follow=True)))
    follow.start()
    time.sleep(0.1)
    logs.close()
    follow.join(5)
    assert not follow.is_alive() and len(got) == 1


def test_a_missing_file_is_a_docker_error(tmp_path: Path) -> None:
    logs = JsonLogFile(str(tmp_path / "gone.json"), "c")
    with pytest.raises(docker.errors.DockerException, match="gone.json"):
        read_all(logs, follow=False)


class Attrs:
    def __init__(self, cid: str, log_config: dict[str, Any], log_path: str = "") -> None:
        self.id = cid
        self.attrs = {"HostConfig": {"LogConfig": log_config}, "LogPath": log_path}


@pytest.mark.parametrize(
    ("log_config", "root", "why"),
    [
        ({"Type": "json-file", "Config": {"max-size": "10m", "compress": "true"}}, "ROOT", "gzip"),
        ({"Type": "local", "Config": {}}, "ROOT", "another driver"),
        ({"Type": "json-file", "Config": {}}, None, "an engine on another machine"),
        ({"Type": "json-file", "Config": {}}, "ELSEWHERE", "a file it cannot read"),
    ],
)
def test_the_api_is_used_for(tmp_path: Path, log_config: dict, root: str | None, why: str) -> None:
    folder = tmp_path / "containers" / "abc"
    folder.mkdir(parents=True)
    (folder / "abc-json.log").write_bytes(entry("a\n"))
    roots = {"ROOT": str(tmp_path), "ELSEWHERE": str(tmp_path / "nothing-here"), None: None}
    assert usable_log_file(Attrs("abc", log_config), roots[root]) is None, why
    plain = Attrs("abc", {"Type": "json-file", "Config": {}})
    assert usable_log_file(plain, str(tmp_path)) == str(folder / "abc-json.log")
    rotated = Attrs("abc", {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "2"}})
    assert usable_log_file(rotated, str(tmp_path)) == str(folder / "abc-json.log")
    os.chmod(folder / "abc-json.log", 0o000)
    if os.geteuid() != 0:  # root reads it anyway
        assert usable_log_file(plain, str(tmp_path)) is None


@pytest.mark.parametrize("source", ["auto", "api"])
@pytest.mark.docker
def test_a_job_stores_the_same_output_read_from_the_file_or_the_api(
    make_cluster: Any, image: str, source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    used: list[str] = []

    class Recording(JsonLogFile):
        def batches(self, *args: Any, **kwargs: Any) -> Iterator[list[tuple[str, bytes, bytes]]]:
            used.append(self.path)
            yield from super().batches(*args, **kwargs)

    monkeypatch.setattr(docker_runtime, "JsonLogFile", Recording)
    cluster = make_cluster(workers=0)
    cluster.add_worker(log_source=source)
    job = cluster.submit(image, ["sh", "-c", "seq 1 20000; echo oops >&2; printf end"])
    done = cluster.wait(job["id"], timeout_s=60)
    assert done["status"] == "FINISHED" and done["log_lines"] == 20002
    stored = cluster.lines(job["id"])
    out = [r["line"] for r in stored if r["stream"] == "stdout"]
    assert out == [str(i) for i in range(1, 20001)] + ["end"]
    assert [r["line"] for r in stored if r["stream"] == "stderr"] == ["oops"]
    assert bool(used) == (source == "auto")  # the file where it can, the API when told


# --- rotation (max-size): Docker renames the file to PATH.1, PATH.1 to PATH.2, … -------------


def rotate(path: Path, files: int) -> None:
    """What Docker does when the file it writes reaches max-size, keeping `files` files."""
    oldest = Path(f"{path}.{files - 1}")
    oldest.unlink(missing_ok=True)
    for number in range(files - 2, 0, -1):
        if Path(f"{path}.{number}").exists():
            os.rename(f"{path}.{number}", f"{path}.{number + 1}")
    if files > 1:
        os.rename(path, f"{path}.1")
    else:
        path.unlink()
    path.write_bytes(b"")


def numbered(first: int, count: int) -> bytes:
    return b"".join(entry(f"{n}\n") for n in range(first, first + count))


def test_a_follow_reads_on_across_rotations_without_a_gap_or_a_repeat(tmp_path: Path) -> None:
    path = tmp_path / "c-json.log"
    path.write_bytes(numbered(0, 100))
    logs = JsonLogFile(str(path), "c")
    got: list[tuple[str, bytes, bytes]] = []
    follow = threading.Thread(target=lambda: got.extend(read_all(logs, follow=True)))
    follow.start()
    for first in range(100, 2100, 100):
        rotate(path, files=2)
        with open(path, "ab") as fh:
            fh.write(numbered(first, 100))
        time.sleep(0.01)
    logs.container_exited()
    follow.join(5)
    assert [int(data) for _, _, data in got] == list(range(2100))
    assert logs.gaps == 0


def test_a_read_starts_at_the_oldest_file_and_tail_reaches_into_rotated_files(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c-json.log"
    path.write_bytes(numbered(0, 50))
    rotate(path, files=3)
    path.write_bytes(numbered(50, 50))
    rotate(path, files=3)
    path.write_bytes(numbered(100, 10))
    logs = JsonLogFile(str(path), "c")
    assert [int(d) for _, _, d in read_all(logs, follow=False)] == list(range(110))
    assert [int(d) for _, _, d in read_all(logs, follow=False, tail=30)] == list(range(80, 110))
    assert [int(d) for _, _, d in read_all(logs, follow=False, tail=500)] == list(range(110))


def test_files_rotated_away_before_they_were_read_count_as_a_gap(tmp_path: Path) -> None:
    """The reader stops after its first read (as it does while the worker's buffer is
    full); Docker rotates three times, keeping two files: the file being read is read to
    its end, the one deleted unread is a gap, and no line comes twice or out of order."""
    path = tmp_path / "c-json.log"
    path.write_bytes(numbered(0, 30_000))  # more than one read (256 KiB)
    logs = JsonLogFile(str(path), "c")
    reads = logs.batches(follow=True)
    got = [int(d) for _, _, d in next(reads)]
    for first in range(30_000, 33_000, 1000):
        rotate(path, files=2)
        with open(path, "ab") as fh:
            fh.write(numbered(first, 1000))
    logs.container_exited()
    got += [int(d) for batch in reads for _, _, d in batch]
    assert got == sorted(set(got))
    assert got[:30_000] == list(range(30_000))  # the file being read, though deleted
    assert got[30_000:] == list(range(31_000, 33_000))  # 30,000-30,999 rotated away unread
    assert logs.gaps >= 1


def test_the_job_log_says_where_rotated_lines_may_be_missing(tmp_path: Path) -> None:
    """The reader waits for room in a full buffer while Docker rotates its log three times
    (two files kept): the lines it then reads come in order, once, after a gpubox line
    saying lines may be missing there."""
    path = tmp_path / "c-json.log"
    path.write_bytes(numbered(0, 30_000))
    logs = JsonLogFile(str(path), "c")
    buffer = lines.LineBuffer(1, max_bytes=1000)
    reader = logreader.LogReader(logs, buffer, lines.Masker([]))
    reader.thread.start()
    wait_until(lambda: buffer.waiting, 10, "the reader to wait for room", every_s=0.01)
    for first in range(30_000, 33_000, 1000):
        rotate(path, files=2)
        with open(path, "ab") as fh:
            fh.write(numbered(first, 1000))
    logs.container_exited()
    got: list[tuple[str, str]] = []
    while reader.thread.is_alive() or got == []:
        got += [(line[1], line[2]) for _, lines in buffer.take(0.05) for line in lines]
    got += [(line[1], line[2]) for _, lines in buffer.take(0) for line in lines]
    notes = [text for stream, text in got if stream == "gpubox"]
    assert len(notes) == 1 and "lines may be missing here" in notes[0]
    numbers = [int(text) for stream, text in got if stream == "stdout"]
    assert numbers == sorted(set(numbers)) and numbers[-1] == 32_999
    at = got.index(("gpubox", notes[0]))
    assert int(got[at + 1][1]) == 31_000  # right before the first line read after the gap
