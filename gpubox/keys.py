"""CURVE keys for the worker link: the coordinator's keypair, each worker's keypair, and the
allow list of worker public keys, all as files in the state folder.

    <state>/keys/coordinator.key            the coordinator's public key (give it to workers)
    <state>/keys/coordinator.key_secret     its secret key (0600)
    <state>/keys/allowed/NAME.key           public keys the coordinator accepts, one per worker
    <state>/keys/workers/NAME.key_secret    a worker's keypair as `keys worker NAME` made it,
                                            to copy to that worker's box (0600)

A worker may only speak for the name its key file is called by in the allow list, and claim
no more than it was enrolled with: `keys worker NAME --labels … --gpus N --gpu-model X
--mounts …` writes these claims into the metadata section of its allowed key file, as one
line `gpubox-claims = {JSON}` (a coordinator that does not know them reads the key as
before). A claim left out sets no limit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from gpubox import errors

CLAIMS_KEY = "gpubox-claims"  # the metadata entry of an allowed key file that holds its claims

log = logging.getLogger(__name__)

RESCAN_S = 1.0  # an unchanged allow-list folder is read again this often anyway
ZAP_DOMAIN = "gpubox"  # the ROUTER's zap_domain; the authenticator answers for it alone
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclasses.dataclass(frozen=True)
class Claims:
    """What a worker key was enrolled to claim in its HELLO; None sets no limit. A HELLO that
    claims more (a label not listed, more GPUs, a GPU of another model, a mount not listed)
    is refused: a key cannot make itself look like the best place for jobs it was never
    meant to get, with their secrets."""

    labels: dict[str, str] | None = None
    gpus: int | None = None
    gpu_model: str | None = None  # a part of every GPU's NVML name, any case
    mounts: list[str] | None = None

    def to_json(self) -> str:
        return json.dumps(
            {k: v for k, v in dataclasses.asdict(self).items() if v is not None},
            separators=(",", ":"),
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Claims:
        """Claims as to_json wrote them; ValueError for anything else."""
        data = json.loads(text)
        if not isinstance(data, dict) or set(data) - {"labels", "gpus", "gpu_model", "mounts"}:
            raise ValueError("not an object of labels, gpus, gpu_model and mounts")
        claims = cls(**data)
        if claims.labels is not None and not (
            isinstance(claims.labels, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in claims.labels.items())
        ):
            raise ValueError("labels must be an object of strings")
        if claims.gpus is not None and (type(claims.gpus) is not int or claims.gpus < 0):
            raise ValueError("gpus must be a count")
        if claims.gpu_model is not None and not isinstance(claims.gpu_model, str):
            raise ValueError("gpu_model must be a string")
        if claims.mounts is not None and not (
            isinstance(claims.mounts, list) and all(isinstance(m, str) for m in claims.mounts)
        ):
            raise ValueError("mounts must be a list of names")
        return claims

    def describe(self) -> str:
        """The claims in a few words, for `keys list`; "-" for none."""
        parts = []
        if self.labels is not None:
            parts.append(
                "labels " + (",".join(f"{k}={v}" for k, v in self.labels.items()) or "none")
            )
        if self.gpus is not None:
            parts.append(f"gpus {self.gpus}")
        if self.gpu_model is not None:
            parts.append(f"model {self.gpu_model}")
        if self.mounts is not None:
            parts.append("mounts " + (",".join(self.mounts) or "none"))
        return "; ".join(parts) or "-"

    def excess(self, labels: dict[str, str], gpus: list[dict[str, Any]], mounts: list[str]) -> str:
        """What a HELLO (its labels, GPUs and mounts) claims beyond these, in words; "" if
        nothing."""
        if self.labels is not None:
            extra = [f"{k}={v}" for k, v in labels.items() if self.labels.get(k) != v]
            if extra:
                return f"the labels {', '.join(extra)[:200]}, which its enrolment does not list"
        if self.gpus is not None and len(gpus) > self.gpus:
            return f"{len(gpus)} GPUs, of the {self.gpus} it was enrolled with"
        if self.gpu_model is not None:
            model = self.gpu_model.lower()
            other = [
                str(gpu.get("name")) for gpu in gpus if model not in str(gpu.get("name")).lower()
            ]
            if other:
                return (
                    f"a GPU {other[0][:100]!r}, not of the model {self.gpu_model!r} it was"
                    " enrolled with"
                )
        if self.mounts is not None:
            extra = sorted(set(mounts) - set(self.mounts))
            if extra:
                return f"the mounts {', '.join(extra)[:200]}, which its enrolment does not list"
        return ""


def check_name(name: str) -> str:
    """A worker name usable as a key file name, or ConfigError."""
    if not NAME.match(name):
        raise errors.ConfigError(
            f"name: {name!r} must be 1-64 letters, digits, '.', '_' or '-', not starting with"
            " a punctuation mark"
        )
    return name


def give_to_owner(folder: str | Path, *paths: str | Path) -> None:
    """When root writes into a folder that another user owns (the state folder of the
    `gpubox` service user), hand `paths` and every folder between `folder` and them to that
    user and group, modes unchanged; else do nothing. A root-owned file left there would stop
    the service and that user's own commands with "Permission denied"."""
    if os.geteuid() != 0:
        return
    top = Path(folder).absolute()
    info = top.stat()
    if info.st_uid == 0:
        return
    for path in paths:
        path = Path(path).absolute()
        for part in (path, *path.parents):
            if part == top or top not in part.parents:
                break
            os.chown(part, info.st_uid, info.st_gid, follow_symlinks=False)


def keys_dir(state_dir: str) -> Path:
    return Path(state_dir) / "keys"


def coordinator_files(state_dir: str) -> tuple[Path, Path]:
    """(public, secret) key files of the coordinator."""
    folder = keys_dir(state_dir)
    return folder / "coordinator.key", folder / "coordinator.key_secret"


def worker_secret_file(state_dir: str, name: str) -> Path:
    """Where `keys worker NAME` leaves the worker's keypair (and where a worker looks)."""
    return keys_dir(state_dir) / "workers" / f"{check_name(name)}.key_secret"


def allowed_dir(state_dir: str) -> Path:
    return keys_dir(state_dir) / "allowed"


def _make_folder(state_dir: str, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    give_to_owner(state_dir, folder)


def _make_pair(state_dir: str, folder: Path, name: str) -> tuple[Path, Path]:
    _make_folder(state_dir, folder)
    os.chmod(folder, 0o700)
    public, secret = zmq.auth.create_certificates(str(folder), name)
    os.chmod(secret, 0o600)  # pyzmq writes it readable by everyone
    give_to_owner(state_dir, public, secret)
    return Path(public), Path(secret)


def init(state_dir: str) -> tuple[Path, bool]:
    """Make the coordinator's keypair unless it exists; (public key file, made now)."""
    public, secret = coordinator_files(state_dir)
    if public.exists() and secret.exists():
        return public, False
    _make_pair(state_dir, public.parent, "coordinator")
    _make_folder(state_dir, allowed_dir(state_dir))
    return public, True


def add_worker(state_dir: str, name: str, claims: Claims | None = None) -> Path:
    """Make a keypair for worker NAME and put its public key on the allow list, with what
    its HELLO may claim (None: no limit); the secret key file to copy to the worker's box.
    An existing key for NAME is replaced."""
    check_name(name)
    folder = keys_dir(state_dir) / "workers"
    _make_pair(state_dir, folder, name)
    allowed = allowed_dir(state_dir)
    _make_folder(state_dir, allowed)
    # Through a new file and a rename, so the folder changes and a running coordinator
    # reads its allow list again at once (an old key for NAME stops working then).
    text = (folder / f"{name}.key").read_text()
    if claims is not None:
        # In the metadata section that pyzmq writes (and reads past): one line of JSON.
        line = f"    {CLAIMS_KEY} = {claims.to_json()}\n"
        text = text.replace("\nmetadata\n", f"\nmetadata\n{line}", 1)
        if line not in text:
            raise errors.GpuboxError(f"cannot write the claims into {folder / name}.key")
    (allowed / f".{name}.key.new").write_text(text)
    give_to_owner(state_dir, allowed / f".{name}.key.new")
    os.replace(allowed / f".{name}.key.new", allowed / f"{name}.key")
    return folder / f"{name}.key_secret"


def read_claims(path: str | Path) -> Claims | None:
    """The claims written in an allowed key file; None when it has none (no limit).
    ValueError for a claims line that cannot be read."""
    prefix = f"{CLAIMS_KEY} ="
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line.startswith(prefix):
                return Claims.from_json(line[len(prefix) :])
    return None


def revoke(state_dir: str, name: str) -> bool:
    """Take worker NAME off the allow list; False if it was not on it."""
    path = allowed_dir(state_dir) / f"{check_name(name)}.key"
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def fingerprint(public: bytes) -> str:
    """A short, stable name for a public key (its SHA-256, 16 hex digits)."""
    return hashlib.sha256(public).hexdigest()[:16]


def load_secret(path: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a `.key_secret` file. One that other users may read is
    used, with a warning."""
    if not os.path.isfile(path):
        raise errors.ConfigError(
            f"no secret key file {path}: make a worker's with `gpubox keys worker NAME` on the"
            " coordinator's box, copy it here (mode 0600) and name it with --key-file"
        )
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        log.warning(
            "the secret key file %s may be read by other users (mode %03o): chmod 600 it",
            path,
            mode,
        )
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise errors.ConfigError(f"cannot read the secret key file {path}: {exc}") from exc
    if not secret:
        raise errors.ConfigError(f"{path} holds no secret key (want a .key_secret file)")
    return public, secret


def load_public(value: str) -> bytes:
    """A public key given as a Z85 string (40 characters) or as a `.key` file's path."""
    if len(value) == 40 and not os.path.exists(value):
        return value.encode("ascii")
    if not os.path.isfile(value):
        raise errors.ConfigError(
            f"coordinator_key: {value!r} is neither a key file nor a public key (40 characters"
            " of Z85 text, as `gpubox keys init` prints it)"
        )
    try:
        public, _ = zmq.auth.load_certificate(value)
    except (OSError, ValueError) as exc:
        raise errors.ConfigError(f"cannot read the public key {value}: {exc}") from exc
    return public


class AllowList:
    """The worker public keys the coordinator accepts, read from the allow-list folder again
    whenever it changes, so adding or revoking a key needs no restart."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._names: dict[str, str] = {}
        self._claims: dict[str, Claims] = {}  # worker name → what its HELLO may claim
        self._next_scan = 0.0
        # Each key file as last read: its (mtime_ns, size, inode), public key and claims.
        # A scan reads again only the files whose stat changed: with a thousand workers,
        # parsing every file each second cost the broker 35-60 ms a second.
        self._files: dict[str, tuple[tuple[int, int, int], str, Claims | None]] = {}

    def name_for(self, public_key: str, refresh: bool = True) -> str | None:
        """The worker name a Z85 public key is allowed to speak for, or None; with `refresh`
        False, as of the last look at the folder (see refresh())."""
        if refresh:
            self.refresh()
        return self._names.get(public_key)

    def claims_for(self, name: str) -> Claims | None:
        """What worker NAME was enrolled to claim, as of the last look at the folder; None
        when its key carries no claims (no limit)."""
        return self._claims.get(name)

    def names(self) -> dict[str, str]:
        """Every allowed worker: name → Z85 public key."""
        self.refresh()
        return {name: key for key, name in self._names.items()}

    def reload(self) -> int:
        """Read the allow list again now; how many keys it holds."""
        with self._lock:
            self._stamp, self._next_scan, self._files = None, 0.0, {}
        return len(self.names())

    def refresh(self) -> None:
        """Read the folder again if it changed (a stat, unless it did)."""
        # A changed folder is read at once; an unchanged one again every RESCAN_S anyway,
        # since file times are coarse and an overwritten key file leaves the folder's alone.
        try:
            info = self.folder.stat()
            stamp: tuple[int, int] | None = (info.st_mtime_ns, info.st_ino)
        except FileNotFoundError:
            stamp = None
        now = time.monotonic()
        with self._lock:
            if stamp == self._stamp and now < self._next_scan:
                return
            names: dict[str, str] = {}
            claims: dict[str, Claims] = {}
            files = {}
            # os.scandir, not Path.glob and a stat per Path: with a thousand key files the
            # scan each RESCAN_S took 8.4 ms, most of the broker's heartbeat work.
            for entry in sorted(self._key_files() if stamp else [], key=lambda e: e.name):
                stem = entry.name[: -len(".key")]
                try:
                    info = entry.stat()
                    seen = (info.st_mtime_ns, info.st_size, info.st_ino)
                    before = self._files.get(entry.name)
                    if before is not None and before[0] == seen:
                        _, public_text, found = before
                    else:
                        public, _ = zmq.auth.load_certificate(entry.path)
                        public_text = public.decode("ascii")
                        # Unreadable claims leave the key out: never a key without its limits.
                        found = read_claims(Path(entry.path))
                except (OSError, ValueError) as exc:
                    log.warning("ignoring unreadable key file %s: %s", entry.path, exc)
                    continue
                files[entry.name] = (seen, public_text, found)
                names[public_text] = stem
                if found is not None:
                    claims[stem] = found
            self._names, self._claims, self._files = names, claims, files
            self._stamp, self._next_scan = stamp, now + RESCAN_S

    def _key_files(self) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(self.folder) as entries:
                # As glob("*.key"): a name starting with "." (a file being written) is not one.
                return [
                    e
                    for e in entries
                    if e.name.endswith(".key") and e.name[0] != "." and len(e.name) > 4
                ]
        except FileNotFoundError:
            return []


class CurveAuthenticator:
    """ZAP on the ROUTER's context: accepts only keys on the allow list. Started before bind;
    refuses to run at all rather than fall back to accepting any key."""

    def __init__(self, context: zmq.Context[Any], allow: AllowList) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        self.allow = allow
        self._auth = ThreadAuthenticator(context, log=logging.getLogger("gpubox.zap"))
        self._auth.start()
        self._auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self)
        if not self._auth.is_alive():
            raise errors.GpuboxError("the CURVE authenticator did not start; refusing to serve")

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP's question: may this Z85 public key connect?"""
        return self.allow.name_for(key.decode("ascii")) is not None

    def stop(self) -> None:
        self._auth.stop()
