"""GPU discovery against the real NVML: runs only where an NVIDIA driver answers (a GPU box,
e.g. through scripts/gpu-check); skipped elsewhere, saying why."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpubox.worker import gpu


def nvml_error() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return None
    except Exception as exc:  # no library, no driver, no device
        return str(exc) or type(exc).__name__


NVML_ERROR = nvml_error()
pytestmark = pytest.mark.skipif(
    NVML_ERROR is not None, reason=f"no NVML on this machine: {NVML_ERROR}"
)


def test_nvml_lists_every_gpu_with_its_facts() -> None:
    import pynvml

    found = gpu.NvmlGpus().list()
    pynvml.nvmlInit()
    assert len(found) == pynvml.nvmlDeviceGetCount() > 0
    for index, item in enumerate(found):
        assert item.index == index
        assert re.fullmatch(r"(GPU|MIG)-[0-9a-f-]{36}", item.uuid), item.uuid
        assert item.name and item.memory_mb > 1000
        assert re.fullmatch(
            r"[0-9A-F]{8}:[0-9A-F]{2}:[0-9A-F]{2}\.[0-9A-F]", item.pci_bus_id.upper()
        )
    assert len({item.uuid for item in found}) == len(found)


def test_nvml_usage_covers_the_same_gpus() -> None:
    source = gpu.NvmlGpus()
    found = source.list()
    usage = source.usage()
    assert [u["uuid"] for u in usage] == [g.uuid for g in found]
    for item, now in zip(found, usage, strict=True):
        assert 0 <= now["memory_used_mb"] <= item.memory_mb
        assert 0 <= now["utilization"] <= 100


def test_gpubox_gpus_prints_what_nvml_sees(tmp_path: Path) -> None:
    found = gpu.NvmlGpus().list()
    result = subprocess.run(
        [sys.executable, "-m", "gpubox", "gpus"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "GPUBOX_STATE_DIR": str(tmp_path)},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rows = result.stdout.splitlines()
    assert rows[0].split()[:4] == ["INDEX", "UUID", "NAME", "MEMORY"]
    assert len(rows) == 1 + len(found)
    for row, item in zip(rows[1:], found, strict=True):
        assert item.uuid in row and item.name in row and f"{item.memory_mb} MiB" in row
