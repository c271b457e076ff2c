"""The process runtime's reader of a job's output (gpubox.worker.process.Output), on real
pipes: lines split at newlines across reads, long lines cut at character boundaries, the
batching deadline, and what is left when a pipe closes."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import pytest

from gpubox import protocol
from gpubox.worker.lines import BATCH_LINES, GATHER_S, Masker
from gpubox.worker.process import Output


@pytest.fixture()
def pipes() -> Iterator[tuple[int, int, Output]]:
    """An Output on two fresh pipes; yields (stdout write end, stderr write end, output)."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    output = Output(Masker(["hunter2"]), os.fdopen(out_r, "rb"), os.fdopen(err_r, "rb"))
    try:
        yield out_w, err_w, output
    finally:
        output.close()
        for fd in (out_w, err_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def read_all(output: Output) -> list[tuple[str, str]]:
    lines = []
    deadline = time.monotonic() + 10
    while not output.closed and time.monotonic() < deadline:
        lines += [(stream, text) for _, stream, text in output.read(0.1)]
    return lines


def test_lines_across_reads_both_streams_and_masking(pipes) -> None:  # type: ignore[no-untyped-def]
    out_w, err_w, output = pipes
    os.write(out_w, b"one\ntw")
    assert [(s, t) for _, s, t in output.read(1)] == [("stdout", "one")]
    os.write(out_w, b"o\nthe token is hunter2\n")
    os.write(err_w, b"oops\n")
    got: list[tuple[str, str]] = []
    while len(got) < 3:
        got += [(s, t) for _, s, t in output.read(1)]
    assert sorted(got) == [
        ("stderr", "oops"),
        ("stdout", "the token is [MASKED]"),
        ("stdout", "two"),
    ]
    os.close(out_w)
    os.close(err_w)
    assert read_all(output) == [] and output.closed


def test_a_last_line_without_newline_is_kept(pipes) -> None:  # type: ignore[no-untyped-def]
    out_w, err_w, output = pipes
    os.write(out_w, b"done, no newline")
    os.close(out_w)
    os.close(err_w)
    assert read_all(output) == [("stdout", "done, no newline")]


def test_a_long_line_is_cut_at_character_boundaries(pipes) -> None:  # type: ignore[no-untyped-def]
    out_w, err_w, output = pipes
    text = "é" * protocol.MAX_LINE  # two bytes each: no cut may fall inside one
    payload = text.encode() + b"\n"
    os.set_blocking(out_w, True)
    lines: list[tuple[str, str]] = []
    written = 0
    while written < len(payload):  # the pipe holds 64 KiB: read while writing
        written += os.write(out_w, payload[written : written + 65536])
        lines += [(s, t) for _, s, t in output.read(0)]
    os.close(out_w)
    os.close(err_w)
    lines += read_all(output)
    pieces = [t for _, t in lines]
    assert "".join(pieces) == text and len(pieces) > 1
    assert all(len(piece.encode()) <= protocol.MAX_LINE for piece in pieces)


def test_lines_are_due_after_the_gather_window_or_at_once_when_a_batch_is_full(
    pipes,  # type: ignore[no-untyped-def]
) -> None:
    out_w, _, output = pipes
    os.write(out_w, b"quiet\n")
    assert output.read(1) and output.due is not None
    assert not output.flush_due(time.monotonic())
    assert output.flush_due(time.monotonic() + GATHER_S)
    assert output.due is None
    os.write(out_w, b"x\n" * BATCH_LINES)
    held = 0
    while held < BATCH_LINES:
        held += len(output.read(1))
    assert output.flush_due(time.monotonic())
