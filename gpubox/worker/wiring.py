"""How a worker is put together: the GPUs it offers, the runtime that runs its jobs, and its
agent in a supervised thread.

`gpubox worker`, `gpubox up` and the tests' clusters all build their workers here, so that
they run the same parts. The tests pass what they replace: their Docker client, a stream
for the copy of the jobs' output, fake GPUs and their own ZeroMQ context.
"""

from __future__ import annotations

import socket
import sys
from typing import IO, TYPE_CHECKING, cast

from gpubox import errors, supervise
from gpubox.config import WorkerConfig
from gpubox.worker import gpu
from gpubox.worker.agent import Agent, Runtime
from gpubox.worker.docker_runtime import DockerRuntime
from gpubox.worker.lines import OutputCopy
from gpubox.worker.policy import ContainerPolicy
from gpubox.worker.process import ProcessRuntime

if TYPE_CHECKING:
    import docker
    import zmq


def make_runtime(
    config: WorkerConfig,
    *,
    tee: IO[str] | OutputCopy | None = None,
    docker_client: docker.DockerClient | None = None,
    gpu_devices: bool | None = None,
) -> Runtime:
    """The runtime that `config.runtime` names, set up from the worker's settings.

    `tee` receives a copy of every job's output (default: this process's stderr, at most
    journal_bytes_per_job of each job). For the Docker runtime, `docker_client` is the
    engine to use (default: the one the environment names), and `gpu_devices` says whether
    containers get their GPUs through a device request (default: unless the GPUs are fake,
    since Docker would refuse the request without the NVIDIA runtime). Raises GpuboxError
    when the Docker engine cannot be reached.
    """
    name = config.name or socket.gethostname()
    copy = OutputCopy(sys.stderr, config.journal_bytes_per_job) if tee is None else tee
    if config.runtime == "process":
        # An OutputCopy is written as a text stream is: write and flush.
        return ProcessRuntime(
            name, config.stop_grace_s, tee=cast(IO[str], copy), process_user=config.process_user
        )
    try:
        return DockerRuntime(
            name,
            config.stop_grace_s,
            docker_client,
            tee=copy,
            mounts=config.mount_map,
            log_max_bytes=config.container_log_max_bytes,
            log_max_files=config.container_log_files,
            gpu_devices=not config.fake_gpus if gpu_devices is None else gpu_devices,
            log_files=config.log_source == "auto",
            policy=ContainerPolicy.from_config(config),
        )
    except errors.ConfigError:
        raise
    except Exception as exc:
        raise errors.GpuboxError(f"cannot reach the Docker engine: {exc}") from exc


def start_worker(
    config: WorkerConfig,
    *,
    source: gpu.GpuSource | None = None,
    tee: IO[str] | OutputCopy | None = None,
    docker_client: docker.DockerClient | None = None,
    gpu_devices: bool | None = None,
    context: zmq.Context | None = None,
) -> tuple[Agent, supervise.Essential]:
    """Build the worker's agent and start it in an Essential thread named gpubox-agent.

    The agent offers the GPUs of `source` that `config.gpus` chooses (default source: NVML,
    or the fake GPUs that config.fake_gpus describes); `tee`, `docker_client` and
    `gpu_devices` go to make_runtime, `context` to the agent. The GPUs are chosen before the
    runtime is made, so a bad `gpus` setting is reported before a missing Docker engine.
    """
    if source is None:
        source = gpu.source_for(
            config.fake_gpus, config.name or socket.gethostname(), config.state_dir
        )
    offers = config.gpus != "none"  # else NVML is not even asked (nor warned about)
    gpus = gpu.select(source.list(), config.gpus) if offers else []
    runtime = make_runtime(config, tee=tee, docker_client=docker_client, gpu_devices=gpu_devices)
    agent = Agent(config, runtime, gpus, context=context, usage=source.usage if offers else None)
    thread = supervise.Essential("gpubox-agent", agent.run, agent.loop)
    thread.start()
    return agent, thread
