"""GPU discovery behind one small interface: NVML by default, a fake for tests."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from gpubox import config, errors, models

log = logging.getLogger(__name__)

Usage = list[dict[str, Any]]  # [{uuid, memory_used_mb, utilization}]


class GpuSource(Protocol):
    """Something that lists this box's GPUs and says how busy they are."""

    def list(self) -> list[models.Gpu]: ...

    def usage(self) -> Usage:
        """[{uuid, memory_used_mb, utilization}] now; [] when it cannot tell."""
        ...


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class NvmlGpus:
    """The real GPUs, from NVML (the nvidia-ml-py package's pynvml module). NVML stays
    initialised while this object lives. Where NVML is missing: says so once, offers none."""

    def __init__(self) -> None:
        self._warned = False
        self._nvml: Any = None

    def _init(self) -> Any:
        if self._nvml is None:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        return self._nvml

    def list(self) -> list[models.Gpu]:
        try:
            nvml = self._init()
        except Exception as exc:  # no driver, no library, no device: all mean "no GPUs here"
            if not self._warned:
                log.warning(
                    "NVML is not available (%s): offering 0 GPUs; gpus: 0 jobs still run", exc
                )
                self._warned = True
            return []
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            gpus.append(
                models.Gpu(
                    uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    memory_mb=int(nvml.nvmlDeviceGetMemoryInfo(handle).total // 2**20),
                    index=index,
                    pci_bus_id=_text(nvml.nvmlDeviceGetPciInfo(handle).busId),
                )
            )
        return gpus

    def usage(self) -> Usage:
        if self._nvml is None:
            return []
        nvml, found = self._nvml, []
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                found.append(
                    {
                        "uuid": _text(nvml.nvmlDeviceGetUUID(handle)),
                        "memory_used_mb": int(nvml.nvmlDeviceGetMemoryInfo(handle).used // 2**20),
                        "utilization": int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                    }
                )
        except Exception as exc:  # a GPU fallen off the bus must not stop the worker
            log.warning("NVML could not read GPU usage: %s", exc)
        return found


class FakeGpus:
    """Made-up GPUs, for tests of scheduling without hardware. Never the default.

    Described by the test-only `fake_gpus` setting (config.parse_fake_gpus)."""

    def __init__(self, spec: str | int, owner: str = "") -> None:
        """`owner` (the worker's name) goes into the UUIDs, so two fake workers' GPUs differ."""
        self.gpus: list[models.Gpu] = []
        prefix = f"GPU-fake-{owner}-" if owner else "GPU-fake-"
        for count, name, memory_mb in config.parse_fake_gpus(str(spec)):
            for _ in range(count):
                i = len(self.gpus)
                self.gpus.append(
                    models.Gpu(
                        f"{prefix}{i:04d}",
                        name,
                        memory_mb,
                        index=i,
                        pci_bus_id=f"00000000:{i + 1:02X}:00.0",
                    )
                )

    def list(self) -> list[models.Gpu]:
        return list(self.gpus)

    def usage(self) -> Usage:
        return [{"uuid": g.uuid, "memory_used_mb": 0, "utilization": 0} for g in self.gpus]


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


def source_for(fake_gpus: str, owner: str = "") -> GpuSource:
    """NVML, unless the test-only fake_gpus setting asks for fakes (owner: see FakeGpus)."""
    if fake_gpus:
        return FakeGpus(fake_gpus, owner)
    return NvmlGpus()
