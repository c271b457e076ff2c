"""GPU discovery behind one small interface: NVML by default, a fake for tests."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol

from gpubox import config, errors, models

log = logging.getLogger(__name__)

# [{uuid, memory_used_mb, utilization, power_w, temperature_c}]: power and temperature are
# None where the GPU does not report them.
Usage = list[dict[str, Any]]

# The file in the state folder whose readings made-up GPUs report (FakeGpus.usage).
FAKE_READINGS = "fake-gpu-readings.json"


class GpuSource(Protocol):
    """Something that lists this box's GPUs and says how busy they are."""

    def list(self) -> list[models.Gpu]: ...

    def usage(self) -> Usage:
        """[{uuid, memory_used_mb, utilization, power_w, temperature_c}] now; [] when it
        cannot tell."""
        ...


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class NvmlGpus:
    """The real GPUs, from NVML (the nvidia-ml-py package's pynvml module). NVML stays
    initialised while this object lives. Where NVML is missing: says so once, offers none."""

    def __init__(self) -> None:
        self._warned = False
        self._nvml: Any = None
        self._handles: list[tuple[str, Any]] = []  # (uuid, handle) of each GPU, by index
        self._lacks: set[str] = set()  # readings NVML said it does not support here

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
            if not self._handles:  # asked once: the worker samples every second
                for index in range(nvml.nvmlDeviceGetCount()):
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                    self._handles.append((_text(nvml.nvmlDeviceGetUUID(handle)), handle))
            for uuid, handle in self._handles:
                found.append(
                    {
                        "uuid": uuid,
                        "memory_used_mb": int(nvml.nvmlDeviceGetMemoryInfo(handle).used // 2**20),
                        "utilization": int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                        "power_w": self._optional(
                            "power", lambda h: nvml.nvmlDeviceGetPowerUsage(h) / 1000, handle
                        ),
                        "temperature_c": self._optional(
                            "temperature",
                            lambda h: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),
                            handle,
                        ),
                    }
                )
        except Exception as exc:  # a GPU fallen off the bus must not stop the worker
            log.warning("NVML could not read GPU usage: %s", exc)
            self._handles = []  # found again next time
        return found

    def _optional(self, reading: str, read: Any, handle: Any) -> float | None:
        """A reading not every GPU has (power, temperature): None where NVML says it is not
        supported, and it is not asked again."""
        if reading in self._lacks:
            return None
        try:
            return float(read(handle))
        except self._nvml.NVMLError_NotSupported:
            self._lacks.add(reading)
            return None


class FakeGpus:
    """Made-up GPUs, for tests of scheduling and telemetry without hardware. Never the
    default.

    Described by the test-only `fake_gpus` setting (config.parse_fake_gpus). Their readings
    are what the file fake-gpu-readings.json in the state folder says, read again whenever it
    changes: a JSON map from a GPU's UUID, or "*" for every GPU it does not name, to
    {"utilization": %, "memory_used_mb": MB, "power_w": W, "temperature_c": °C} (each
    optional). Without the file, or for a GPU it does not name, a GPU reads 0 % and 0 MB, with
    no power or temperature."""

    def __init__(self, spec: str | int, owner: str = "", state_dir: str = "") -> None:
        """`owner` (the worker's name) goes into the UUIDs, so two fake workers' GPUs differ;
        `state_dir` holds the readings file (none: every GPU idle)."""
        self.readings_file = Path(state_dir) / FAKE_READINGS if state_dir else None
        self._readings: dict[str, dict[str, Any]] = {}
        self._read_stamp: tuple[int, int] | None = None
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
        readings = self._read()
        found = []
        for gpu in self.gpus:
            reading = readings.get(gpu.uuid) or readings.get("*") or {}
            found.append(
                {
                    "uuid": gpu.uuid,
                    "memory_used_mb": int(reading.get("memory_used_mb", 0)),
                    "utilization": int(reading.get("utilization", 0)),
                    "power_w": reading.get("power_w"),
                    "temperature_c": reading.get("temperature_c"),
                }
            )
        return found

    def _read(self) -> dict[str, dict[str, Any]]:
        """The readings file's map, parsed again only when the file changed."""
        if self.readings_file is None:
            return {}
        try:
            info = os.stat(self.readings_file)
        except OSError:
            self._readings, self._read_stamp = {}, None
            return {}
        stamp = (info.st_mtime_ns, info.st_size)
        if stamp != self._read_stamp:
            try:
                loaded = json.loads(self.readings_file.read_text())
            except (OSError, ValueError) as exc:  # half written: the last readings hold
                log.debug("fake GPU readings not read: %s", exc)
                return self._readings
            self._readings = loaded if isinstance(loaded, dict) else {}
            self._read_stamp = stamp
        return self._readings


def write_fake_readings(state_dir: str, readings: dict[str, dict[str, Any]]) -> None:
    """Set the readings of made-up GPUs (FakeGpus): written whole, then renamed into place,
    so a worker never reads half of it."""
    path = Path(state_dir) / FAKE_READINGS
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(readings))
    os.replace(temporary, path)


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


def source_for(fake_gpus: str, owner: str = "", state_dir: str = "") -> GpuSource:
    """NVML, unless the test-only fake_gpus setting asks for fakes (owner, state_dir: see
    FakeGpus)."""
    if fake_gpus:
        return FakeGpus(fake_gpus, owner, state_dir)
    return NvmlGpus()
