"""The Docker runtime: one job attempt as one container, from pull to removal.

`DockerRuntime.run` blocks for the whole attempt and reports through `emit`:
("started", {container, executed_at}) once the container runs, ("lines", {seq, lines}) for
each batch of output, and always exactly one ("done", {status, exit_code, error, …}) last.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

import docker
import docker.errors
import docker.types
import requests.exceptions

from gpubox import errors, logfmt, models, protocol
from gpubox.config import Mount, check_mount_folders
from gpubox.worker import stopping
from gpubox.worker.dockerlogs import DockerLogs
from gpubox.worker.lines import (
    FLUSH_S,
    Emit,
    LineBuffer,
    Masker,
    OutputCopy,
    emit_done,
    secret_values,
    send_lines,
)
from gpubox.worker.logfile import JsonLogFile, usable_log_file
from gpubox.worker.logreader import LogReader
from gpubox.worker.policy import ContainerPolicy, pull_failure

log = logging.getLogger(__name__)

STALL_S = 10.0  # a log follow that takes nothing this long after the container exited
LABEL = "io.gpubox.job"
WORKER_LABEL = "io.gpubox.worker"
OWNER_LABEL = "io.gpubox.coordinator"  # keys.fingerprint of the coordinator's public key


class JobRefused(errors.GpuboxError):
    """This worker cannot run the job as asked (a mount it does not declare, an image it
    could not pull)."""


def refusal(exc: docker.errors.APIError) -> str:
    """Docker's refusal of a container, in words a user can act on."""
    text = str(exc.explanation or exc)
    if "could not select device driver" in text:
        return (
            "this worker's Docker engine cannot give containers GPUs: install the NVIDIA"
            f" Container Toolkit and restart dockerd (Docker said: {text})"
        )
    return f"docker refused the container: {text}"


def repo_digest(digests: list[str], requested: str) -> str | None:
    """Of an image's repo digests (name@sha256:…), the one of the repository the job named
    (its image without tag or digest), else the first; None when it has none."""
    name = requested.partition("@")[0]
    if ":" in name.rpartition("/")[2]:  # a tag, not a registry's port
        name = name.rpartition(":")[0]
    for digest in digests:
        if digest.partition("@")[0] == name:
            return digest
    return digests[0] if digests else None


def started_at(container: Any) -> str:
    """When a container started, as gpubox writes times."""
    container.reload()
    raw = container.attrs.get("State", {}).get("StartedAt") or ""
    started = models.parse_time(raw) if raw and not raw.startswith("0001") else None
    return models.format_time(started or models.utcnow())  # type: ignore[return-value]


class DockerRuntime:
    """Runs job attempts as Docker containers through the docker SDK."""

    outlives_worker = True  # dockerd owns the containers: they run on, and are re-attached
    owner = ""  # set by the agent (Runtime.owner)

    def __init__(
        self,
        worker_name: str,
        stop_grace_s: float = 10.0,
        client: docker.DockerClient | None = None,
        tee: IO[str] | OutputCopy | None = None,
        mounts: dict[str, Mount] | None = None,
        gpu_devices: bool = True,
        log_files: bool = True,
        log_max_bytes: int = 64 * 1024 * 1024,
        log_max_files: int = 2,
        policy: ContainerPolicy | None = None,
    ) -> None:
        """`mounts`: the host folders jobs may ask for by name. `gpu_devices`: give containers
        their GPUs through a device request (needs the NVIDIA runtime); off for fake GPUs,
        which get the environment only. `log_files`: read a container's json-file log from
        disk where possible (gpubox.worker.logfile), else always through the engine's API.
        `log_max_bytes`, `log_max_files`: the json-file log Docker keeps of each container,
        in that many files of that size (0 bytes: the engine's own log settings).
        `policy`: the limits every container gets and the registries images may come from
        (default: the worker settings' defaults)."""
        self.worker_name = worker_name
        self.stop_grace_s = stop_grace_s
        self.mounts = mounts or {}
        self.policy = policy or ContainerPolicy()
        self.gpu_devices = gpu_devices
        check_mount_folders(self.mounts)
        self.client = client or docker.from_env()
        self.tee = tee or sys.stderr
        self._tee_lock = threading.Lock()
        self._ended: dict[int, Any] = {}  # job id → its exited container, until forget()
        self._ended_lock = threading.Lock()
        self.log_files = log_files
        self.log_max_bytes = log_max_bytes
        self.log_max_files = log_max_files
        self._docker_root: str | None = None
        self._digests: dict[str, list[str]] = {}  # image ID → its repo digests (_image_of)

    def run(
        self,
        job: protocol.WireJob,
        emit: Emit,
        cancel: threading.Event,
        detach: threading.Event | None = None,
        container: Any = None,
        resume: models.LogMarks | None = None,
    ) -> None:
        """Run one attempt to its end; emits exactly one "done" last, unless `detach` is set
        first: then it returns at once and leaves the container running, for a later worker
        to re-attach to. With `container` (found by `recover`) it re-attaches: no pull, no
        start, and each stream resumes where `resume` says its stored output ends."""
        detach = detach or threading.Event()
        executed_at: str | None = None
        buffer = LineBuffer(job.first_seq)
        stopping.attach(cancel, buffer)  # the worker's notes (an idle warning) go in its log
        outcome: dict[str, Any] | None
        try:
            if container is not None:
                container.reload()
                if container.status == "created":
                    # The last worker died between create and start: start it now.
                    container.start()
                    emit(
                        "started",
                        {
                            "container": container.id,
                            "executed_at": models.format_time(models.utcnow()),
                            **self._image_of(container, job.image),
                        },
                    )
                executed_at = started_at(container)
                outcome = self._watch(job, container, buffer, emit, cancel, detach, resume or {})
            elif cancel.is_set() or (container := self._create(job, cancel)) is None:
                outcome = {"status": "CANCELLED", "error": "cancelled before the container started"}
            else:
                container.start()
                executed_at = models.format_time(models.utcnow())
                image = self._image_of(container, job.image)
                emit("started", {"container": container.id, "executed_at": executed_at, **image})
                outcome = self._watch(job, container, buffer, emit, cancel, detach, {})
        except JobRefused as exc:
            outcome = {"status": "ERROR", "error": str(exc)}
        except docker.errors.APIError as exc:
            outcome = {"status": "ERROR", "error": refusal(exc)}
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            outcome = {"status": "ERROR", "error": f"docker failed: {exc}"}
        if outcome is None:
            return  # detached: the container runs on
        if container is not None and executed_at is None:
            self.discard(container, stop=False)  # it never ran: nothing to keep
        elif container is not None:
            # It has exited, so its GPUs are free; it stays (stopped) until the coordinator
            # acknowledges DONE (forget): a worker killed before that finds it at its next
            # start and reports the exit code and the last lines from it.
            with self._ended_lock:
                self._ended[job.id] = container
        self._flush(job, buffer, emit, container, wait_s=0)
        emit_done(emit, outcome, executed_at, buffer)

    def recover(self) -> list[tuple[int, int, list[str], Any]]:
        """This worker's job containers left by an earlier run: (job id, attempt, GPU uuids,
        container) for each, running or exited."""
        found = []
        label = f"{WORKER_LABEL}={self.worker_name}"
        # The low-level list, then each container on its own: one removed in between (by
        # another gpubox on this engine) is skipped, where containers.list would fail whole.
        for listed in self.client.api.containers(all=True, filters={"label": label}):
            if (listed.get("Labels") or {}).get(OWNER_LABEL, self.owner) != self.owner:
                continue  # another gpubox's worker of the same name on this engine
            try:
                container = self.client.containers.get(listed["Id"])
            except docker.errors.NotFound:
                continue
            labels = container.labels
            try:
                job_id, attempt = int(labels[LABEL]), int(labels[f"{LABEL}.attempt"])
            except (KeyError, ValueError):
                continue
            gpus = [g for g in labels.get(f"{LABEL}.gpus", "").split(",") if g]
            found.append((job_id, attempt, gpus, container))
        return found

    def forget(self, job_id: int) -> None:
        """The coordinator has the job's DONE: remove its exited container (in the
        background: it is called from the agent's loop)."""
        with self._ended_lock:
            container = self._ended.pop(job_id, None)
        if container is not None:
            threading.Thread(target=self.discard, args=(container, False), daemon=True).start()

    def close(self) -> None:
        """Nothing to let go: containers outlive the worker, and a removal that forget()
        started finishes on its own thread."""

    def discard(self, container: Any, stop: bool = True) -> None:
        """Stop a container (SIGTERM, then SIGKILL after the grace period) and remove it,
        with the anonymous volumes its image declares (VOLUME): kept, they would fill the
        engine's disk one job at a time."""
        try:
            if stop:
                self._stop(container)
            container.remove(v=True, force=True)
        except docker.errors.NotFound:
            pass
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            log.warning("could not remove container %s: %s", container.short_id, exc)

    def _create(self, job: protocol.WireJob, cancel: threading.Event) -> Any:
        """The job's container, created; its image is pulled first only when the engine says
        it has none (as `docker run` does: one API call fewer per job than asking before each
        create). None when cancelled during the pull; JobRefused when the pull fails."""
        spec = self.container_spec(job)
        try:
            return self.client.containers.create(job.image, **spec)
        except docker.errors.ImageNotFound:
            pass
        # Checked before the pull, not before the create: an image the engine has already
        # needs no request to any registry.
        refused = self.policy.registry_refusal(job.image)
        if refused is not None:
            raise JobRefused(f"could not pull image {job.image!r}: {refused}")
        pull_error = self._pull(job.image, job.auth)
        if pull_error is not None:
            raise JobRefused(f"could not pull image {job.image!r}: {pull_error}")
        if cancel.is_set():
            return None
        return self.client.containers.create(job.image, **spec)

    def _pull(self, image: str, auth: dict[str, str] | None) -> str | None:
        """Pull the image; None on success, else why not, in a few fixed words."""
        auth_config = None
        if auth:
            auth_config = {"username": auth["username"], "password": auth["password"]}
            if auth.get("registry"):
                auth_config["serveraddress"] = auth["registry"]
        repo, _, tag = (
            image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "latest")
        )
        try:
            self.client.images.pull(repo, tag=tag or "latest", auth_config=auth_config)
            return None
        except docker.errors.APIError as exc:
            # Docker's explanation can quote what the registry answered, which may be any
            # server's page: the submitter gets its kind only, the worker's log the rest.
            # auth_config is never part of it.
            explanation = str(exc.explanation or exc)
            log.warning(
                "pulling %s failed: %s",
                logfmt.printable(image),
                logfmt.printable(explanation[:1000]),
            )
            return pull_failure(explanation)

    def container_spec(self, job: protocol.WireJob) -> dict[str, Any]:
        """The keyword arguments of containers.create for a JOB: command, environment,
        labels to find it again, its GPUs (device request + NVIDIA_VISIBLE_DEVICES, with
        CUDA_DEVICE_ORDER=PCI_BUS_ID so indices inside match nvidia-smi outside), and its
        container options, with this worker's limits (policy). Raises JobRefused for a mount
        this worker does not declare, or /dev/shm over its max_shm_size."""
        options = models.ContainerOptions.from_dict(job.container)
        kwargs: dict[str, Any] = {
            "command": job.command,
            "environment": {**(job.env or {}), **(job.secrets or {})},
            "init": True,
            "detach": True,
            "labels": {
                LABEL: str(job.id),
                f"{LABEL}.attempt": str(job.attempt),
                f"{LABEL}.gpus": ",".join(job.gpus),
                WORKER_LABEL: self.worker_name,
                OWNER_LABEL: self.owner,
            },
        }
        if self.log_max_bytes:
            # Docker's own copy of the output, bounded on disk (a flood wrote 4.5 GB a minute
            # into an unbounded one): the worker follows its files across rotation.
            kwargs["log_config"] = docker.types.LogConfig(
                type="json-file",
                config={"max-size": str(self.log_max_bytes), "max-file": str(self.log_max_files)},
            )
        if job.gpus and self.gpu_devices:
            kwargs["device_requests"] = [
                docker.types.DeviceRequest(device_ids=list(job.gpus), capabilities=[["gpu"]])
            ]
        # Last, over the job's and the image's: a job sees its own GPUs and no other (on an
        # engine whose default runtime is nvidia, "void" keeps a GPU-less job from all).
        kwargs["environment"]["NVIDIA_VISIBLE_DEVICES"] = ",".join(job.gpus) or "void"
        if job.gpus:
            kwargs["environment"]["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        try:
            kwargs.update(self.policy.create_options(options.shm_size))
        except ValueError as exc:
            raise JobRefused(str(exc)) from None
        if options.shm_size is not None:
            kwargs["shm_size"] = options.shm_size
        if options.memory is not None:
            kwargs["mem_limit"] = options.memory
        if options.workdir is not None:
            kwargs["working_dir"] = options.workdir
        if options.user is not None:
            kwargs["user"] = options.user
        missing = [name for name in options.mounts if name not in self.mounts]
        if missing:
            raise JobRefused(f"this worker declares no mount named {', '.join(missing)}")
        if options.mounts:
            # Mount, not volumes: Docker refuses a missing source instead of creating it.
            kwargs["mounts"] = [
                docker.types.Mount(
                    target=self.mounts[name].container_path,
                    source=self.mounts[name].host_path,
                    type="bind",
                    read_only=self.mounts[name].read_only,
                )
                for name in options.mounts
            ]
        return kwargs

    def _watch(
        self,
        job: protocol.WireJob,
        container: Any,
        buffer: LineBuffer,
        emit: Emit,
        cancel: threading.Event,
        detach: threading.Event,
        resume: models.LogMarks,
    ) -> dict[str, Any] | None:
        exited = threading.Event()
        api_logs = DockerLogs(self.client.api, container.id)
        root = self._root_dir() if api_logs.socket_path and self.log_files else None
        path = usable_log_file(container, root)
        logs = JsonLogFile(path, container.id) if path else api_logs
        reader = LogReader(logs, buffer, Masker(secret_values(job)), resume)
        reader.thread.start()
        result: dict[str, Any] = {}

        def wait() -> None:
            try:
                result.update(container.wait())
            except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
                result["Error"] = {"Message": str(exc)}
            exited.set()
            logs.container_exited()
            buffer.wake()

        threading.Thread(target=wait, daemon=True, name=f"wait-{job.id}").start()
        deadline = None
        if job.timeout:
            ran_s = (models.utcnow() - models.parse_time(started_at(container))).total_seconds()  # type: ignore[operator]
            deadline = time.monotonic() + job.timeout - max(0.0, ran_s)
        stopped_for: str | None = None
        while not exited.is_set():
            if detach.is_set():
                reader.abandon()  # nothing takes from the buffer any more
                return None
            self._flush(job, buffer, emit, container, wait_s=FLUSH_S)
            if stopped_for is None and cancel.is_set():
                stopped_for = "cancel"
            elif stopped_for is None and deadline is not None and time.monotonic() >= deadline:
                stopped_for = "timeout"
            else:
                continue
            threading.Thread(target=self._stop, args=(container,), daemon=True).start()
        # The follows end by themselves once Docker has sent all the container's output, which
        # can take a while after it exited: keep sending what they read. Only a follow that
        # stalls is abandoned, and the rest is read from where it stopped, never both at once.
        progress, taken = time.monotonic(), -1
        while reader.thread.is_alive():
            self._flush(job, buffer, emit, container, wait_s=FLUSH_S)
            if reader.taken != taken or buffer.waiting:  # (waiting for room is not stalling)
                progress, taken = time.monotonic(), reader.taken
            elif time.monotonic() - progress > STALL_S:
                break
        reader.abandon()
        # The catch-up reads in a thread of its own while this one keeps sending what it
        # reads: the buffer is bounded, and only this thread makes room in it.
        failed: list[BaseException] = []
        catch_up = threading.Thread(
            target=_capture, args=(reader.catch_up, failed), daemon=True, name="logs-catch-up"
        )
        catch_up.start()
        while catch_up.is_alive():
            self._flush(job, buffer, emit, container, wait_s=FLUSH_S)
        if failed:
            raise failed[0]  # as if it had run here: the agent reports the job failed
        code = result.get("StatusCode")
        if stopped_for == "cancel":
            return stopping.outcome(cancel, code)
        if stopped_for == "timeout":
            return {"status": "ERROR", "exit_code": code, "error": "timeout"}
        if code == 0:
            return {"status": "FINISHED", "exit_code": 0}
        if code is None:
            message = (result.get("Error") or {}).get("Message", "unknown")
            return {"status": "ERROR", "error": f"lost track of the container: {message}"}
        return {"status": "ERROR", "exit_code": code, "error": f"exit code {code}"}

    def _image_of(self, container: Any, requested: str) -> dict[str, str | None]:
        """STARTED's image_id and image_digest: the ID of the image the container was created
        from, and that image's repo digest where the engine has one (an image pulled from a
        registry has; one built or imported on this host has none). The digest is asked of
        the engine once per image ID."""
        image_id = container.attrs.get("Image") or None
        if image_id is None:
            return {"image_id": None, "image_digest": None}
        if image_id not in self._digests:
            try:
                found = self.client.api.inspect_image(image_id).get("RepoDigests") or []
            except (docker.errors.DockerException, requests.exceptions.RequestException):
                return {"image_id": image_id, "image_digest": None}  # asked again next time
            self._digests[image_id] = found
        return {
            "image_id": image_id,
            "image_digest": repo_digest(self._digests[image_id], requested),
        }

    def _root_dir(self) -> str | None:
        """The local engine's DockerRootDir (asked once), where it keeps container logs."""
        if self._docker_root is None:
            try:
                self._docker_root = str(self.client.info().get("DockerRootDir") or "")
            except (docker.errors.DockerException, requests.exceptions.RequestException):
                return None  # asked again next time
        return self._docker_root or None

    def _stop(self, container: Any) -> None:
        try:
            container.stop(timeout=int(round(self.stop_grace_s)))
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            log.warning("stopping container %s failed: %s", container.short_id, exc)

    def _flush(
        self, job: protocol.WireJob, buffer: LineBuffer, emit: Emit, container: Any, wait_s: float
    ) -> None:
        short = container.short_id if container is not None else "-"
        send_lines(
            buffer, emit, self.tee, self._tee_lock, f"job={job.id} container={short}", wait_s
        )


def _capture(fn: Callable[[], None], failed: list[BaseException]) -> None:
    """Run fn, keeping what it raises in `failed` (for a thread whose starter re-raises it)."""
    try:
        fn()
    except BaseException as exc:
        failed.append(exc)
