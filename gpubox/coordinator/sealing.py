"""Write-only credentials (docker.auth, docker.secrets) sealed before they reach the store.

The store only ever holds them encrypted (Fernet: AES-CBC with an HMAC) under a key in the
state folder, and erases even that when the job ends; so neither a copy of the database nor
the pages and WAL frames a database keeps of deleted rows can give them away.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

from gpubox import errors, models

KEY_FILE = "secrets.key"


class Sealer:
    """Seals and unseals job credentials with the key in `<state_dir>/secrets.key`."""

    def __init__(self, state_dir: str) -> None:
        path = Path(state_dir) / KEY_FILE
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(Fernet.generate_key())
        try:
            self._fernet = Fernet(path.read_bytes().strip())
        except (OSError, ValueError) as exc:
            raise errors.ConfigError(f"cannot read the secrets key {path}: {exc}") from exc

    def seal(self, spec: models.JobSpec) -> models.JobSpec:
        """The spec with auth and secrets moved, encrypted, into `sealed`, and its webhooks'
        secrets into `webhooks_sealed`."""
        if any("secret" in hook for hook in spec.webhooks):
            secrets = [hook.get("secret", "") for hook in spec.webhooks]
            spec = dataclasses.replace(
                spec,
                webhooks=[{k: v for k, v in h.items() if k != "secret"} for h in spec.webhooks],
                webhooks_sealed=self.seal_text(json.dumps(secrets)),
            )
        if spec.auth is None and not spec.secrets:
            return spec
        plain = json.dumps({"auth": spec.auth, "secrets": spec.secrets}).encode()
        return dataclasses.replace(
            spec, auth=None, secrets={}, sealed=self._fernet.encrypt(plain).decode("ascii")
        )

    def seal_text(self, text: str) -> str:
        return self._fernet.encrypt(text.encode()).decode("ascii")

    def unseal_text(self, sealed: str) -> str:
        try:
            return self._fernet.decrypt(sealed.encode("ascii")).decode()
        except (InvalidToken, ValueError) as exc:
            raise errors.GpuboxError(
                f"a sealed value cannot be unsealed: was {KEY_FILE} in the state folder replaced?"
            ) from exc

    def webhook_secrets(self, job: models.Job) -> list[str]:
        """The signing secret of each of the job's webhooks, in their order."""
        if not job.spec.webhooks_sealed:
            return ["" for _ in job.spec.webhooks]
        return list(json.loads(self.unseal_text(job.spec.webhooks_sealed)))

    def credentials(self, job: models.Job) -> dict[str, Any]:
        """{"auth": …, "secrets": …} of a job, or {} when it has none."""
        if not job.spec.sealed:
            return {}
        try:
            return json.loads(self._fernet.decrypt(job.spec.sealed.encode("ascii")))  # type: ignore[no-any-return]
        except (InvalidToken, ValueError) as exc:
            raise errors.GpuboxError(
                f"the credentials of job {job.id} cannot be unsealed: was {KEY_FILE} in the"
                " state folder replaced?"
            ) from exc
