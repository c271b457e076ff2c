"""The worker's spill: batches on disk in order, files removed once read, a disk bound that
drops the oldest lines behind one marker."""

from __future__ import annotations

from pathlib import Path

from gpubox.worker.spill import Spill


def batch(first: int, count: int, width: int = 10) -> list[list[str]]:
    return [
        [f"2026-01-01T00:00:{i % 60:02d}.000000000Z", "stdout", f"{i:0{width}d}"]
        for i in range(first, first + count)
    ]


def drain(spill: Spill, job_id: int) -> list[tuple[int, int, list[str]]]:
    out = []
    while (b := spill.pop(job_id)) is not None:
        out.append((b.seq, b.last, [line[2] for line in b.lines]))
    return out


def test_batches_come_back_in_order_per_job_and_files_go_once_read(tmp_path: Path):
    spill = Spill(tmp_path / "spill", max_bytes=1 << 30)
    for first in range(1, 1001, 100):
        spill.push(7, first, batch(first, 100))
        spill.push(8, first, batch(first, 100))
    assert 7 in spill and 8 in spill and spill.last_seq(7) == 1000
    assert list((tmp_path / "spill").iterdir())
    got = drain(spill, 7)
    assert [seq for seq, _, _ in got] == list(range(1, 1001, 100))
    assert [text for _, _, lines in got for text in lines] == [f"{i:010d}" for i in range(1, 1001)]
    assert all(last == seq + 99 for seq, last, _ in got)
    assert 7 not in spill and 8 in spill
    spill.discard(8)
    assert spill.size == 0 and list((tmp_path / "spill").iterdir()) == []


def test_reads_and_writes_interleave_across_segments(tmp_path: Path):
    spill = Spill(tmp_path / "spill", max_bytes=64 * 1024)  # 4 KiB segments
    seq, expected, got = 1, [], []
    for round_ in range(50):
        for _ in range(3):
            spill.push(1, seq, batch(seq, 20))
            expected += [f"{i:010d}" for i in range(seq, seq + 20)]
            seq += 20
        for _ in range(2 if round_ < 49 else 1000):
            if (b := spill.pop(1)) is not None:
                got += [line[2] for line in b.lines]
    assert got == expected and spill.dropped == 0
    assert spill.size == 0 and 1 not in spill


def test_past_the_disk_bound_the_oldest_lines_go_behind_one_marker(tmp_path: Path):
    spill = Spill(tmp_path / "spill", max_bytes=64 * 1024)
    total = 20_000
    for first in range(1, total + 1, 100):
        spill.push(3, first, batch(first, 100))
        assert spill.size <= 64 * 1024
    on_disk = sum(p.stat().st_size for p in (tmp_path / "spill").iterdir())
    assert on_disk == spill.size <= 64 * 1024
    got = drain(spill, 3)
    marker_seq, marker_last, marker_lines = got[0]
    dropped = marker_last - marker_seq + 1
    assert marker_seq == 1 and dropped == spill.dropped > 0
    assert marker_lines == [
        f"[gpubox: {dropped} lines dropped here; the worker's backlog for the coordinator went"
        f" past its 65536 bytes on disk (spill_max_bytes)]"
    ]
    # the rest: every line after the dropped ones, in order, the newest kept
    rest = [text for _, _, lines in got[1:] for text in lines]
    assert rest == [f"{i:010d}" for i in range(marker_last + 1, total + 1)]
    assert got[1][0] == marker_last + 1


def test_the_disk_bound_holds_while_a_batch_is_added(tmp_path: Path):
    """Room is made before a batch is written, not after: what is on disk never passes the
    bound, even for a moment (the agent's owner may look at any time)."""
    spill = Spill(tmp_path / "spill", max_bytes=64 * 1024)
    on_disk: list[int] = []
    drop_oldest = spill._drop_oldest

    def watched() -> bool:
        on_disk.append(sum(p.stat().st_size for p in (tmp_path / "spill").iterdir()))
        return drop_oldest()

    spill._drop_oldest = watched  # type: ignore[method-assign]
    for first in range(1, 20_001, 100):
        spill.push(3, first, batch(first, 100))
    assert on_disk and max(on_disk) <= 64 * 1024


def test_a_batch_larger_than_the_bound_is_dropped_as_it_comes(tmp_path: Path):
    """A bound smaller than one batch: that batch is not written (the bound holds), the
    job's batches before it go behind the same marker, and other jobs keep theirs."""
    root = tmp_path / "spill"
    spill = Spill(root, max_bytes=16 * 1024)
    for seq in (1, 11, 21):
        spill.push(1, seq, batch(seq, 10))
        spill.push(2, seq, batch(seq, 10))
    spill.push(1, 31, batch(31, 100, width=300))  # ~31 KiB alone
    on_disk = sum(p.stat().st_size for p in root.iterdir())
    assert on_disk == spill.size <= 16 * 1024
    assert spill.dropped == 130 and spill.last_seq(1) == 130
    spill.push(1, 131, batch(131, 10))  # the job goes on after the marker
    got = drain(spill, 1)
    assert [(seq, last) for seq, last, _ in got] == [(1, 130), (131, 140)]
    assert got[0][2][0].startswith("[gpubox: 130 lines dropped here;")
    assert [text for _, _, lines in drain(spill, 2) for text in lines] == [
        f"{i:010d}" for i in range(1, 31)
    ]
    assert spill.size == 0 and list(root.iterdir()) == []


def test_drops_while_reading_keep_one_marker_and_no_gap(tmp_path: Path):
    spill = Spill(tmp_path / "spill", max_bytes=16 * 1024)
    seq, covered = 1, []
    for _ in range(300):
        for _ in range(3):  # three in, one out: the bound is passed again and again
            spill.push(5, seq, batch(seq, 10))
            seq += 10
        if (b := spill.pop(5)) is not None:
            covered.append((b.seq, b.last))
    covered += [(s, last) for s, last, _ in drain(spill, 5)]
    markers = [c for c in covered if c[1] - c[0] + 1 > 10]
    assert spill.dropped > 0 and len(markers) > 1
    assert sum(last - first + 1 for first, last in markers) == spill.dropped
    # batches and markers tile 1..seq-1 with no gap and no overlap
    assert covered[0][0] == 1 and covered[-1][1] == seq - 1
    assert all(b[0] == a[1] + 1 for a, b in zip(covered, covered[1:], strict=False))


def test_a_new_spill_clears_what_an_earlier_process_left(tmp_path: Path):
    root = tmp_path / "spill"
    Spill(root, 1 << 20).push(1, 1, batch(1, 10))
    assert list(root.iterdir())
    fresh = Spill(root, 1 << 20)
    assert list(root.iterdir()) == [] and fresh.pop(1) is None
