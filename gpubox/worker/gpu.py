"""GPU discovery behind one small interface: NVML by default, a fake for tests."""

from __future__ import annotations

import logging
from typing import Protocol

from gpubox import errors, models

log = logging.getLogger(__name__)


class GpuSource(Protocol):
    """Something that lists this box's GPUs."""

    def list(self) -> list[models.Gpu]: ...


class NvmlGpus:
    """The real GPUs, from NVML (pynvml). Where NVML is missing: says so once, offers none."""

    def __init__(self) -> None:
        self._warned = False

    def list(self) -> list[models.Gpu]:
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # no driver, no library, no device: all mean "no GPUs here"
            if not self._warned:
                log.warning(
                    "NVML is not available (%s): offering 0 GPUs; gpus: 0 jobs still run", exc
                )
                self._warned = True
            return []
        try:
            gpus = []
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                uuid = pynvml.nvmlDeviceGetUUID(handle)
                name = pynvml.nvmlDeviceGetName(handle)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                gpus.append(
                    models.Gpu(
                        uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
                        name=name.decode() if isinstance(name, bytes) else name,
                        memory_mb=int(memory.total // (1024 * 1024)),
                        index=index,
                    )
                )
            return gpus
        finally:
            pynvml.nvmlShutdown()


class FakeGpus:
    """`count` made-up GPUs, for tests of scheduling without hardware. Never the default."""

    def __init__(self, count: int, name: str = "Fake GPU", memory_mb: int = 16384) -> None:
        self.count = count
        self.name = name
        self.memory_mb = memory_mb

    def list(self) -> list[models.Gpu]:
        return [
            models.Gpu(f"GPU-fake-{i:04d}", self.name, self.memory_mb, index=i)
            for i in range(self.count)
        ]


def select(gpus: list[models.Gpu], choice: str) -> list[models.Gpu]:
    """The GPUs a worker offers for its `gpus` setting: all, none, or indices like 0,2."""
    if choice == "all":
        return list(gpus)
    if choice == "none":
        return []
    wanted = [int(part) for part in choice.split(",")]
    by_index = {gpu.index: gpu for gpu in gpus}
    missing = [i for i in wanted if i not in by_index]
    if missing:
        raise errors.ConfigError(
            f"gpus: no GPU with index {', '.join(map(str, missing))} (found {len(gpus)})"
        )
    return [by_index[i] for i in wanted]


def source_for(fake_gpus: str) -> GpuSource:
    """NVML, unless the test-only fake_gpus setting asks for fakes."""
    if fake_gpus:
        return FakeGpus(int(fake_gpus))
    return NvmlGpus()
