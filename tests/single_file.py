"""dist/gpubox, the single-file build (scripts/build), as the appliance tests need it: built
once per test run, and a second build of it that differs only by its build id."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import uuid
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SINGLE_FILE = ROOT / "dist" / "gpubox"


def build() -> Path:
    """Build dist/gpubox from this checkout (~13 s), and check that its check run did not
    unpack it into the caller's ~/.shiv (~40 MB a build: they added up)."""
    unpacked = Path(os.environ.get("SHIV_ROOT") or Path.home() / ".shiv")
    before = set(unpacked.iterdir()) if unpacked.is_dir() else set()
    result = subprocess.run(
        [str(ROOT / "scripts" / "build")], capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.access(SINGLE_FILE, os.X_OK)
    assert (set(unpacked.iterdir()) if unpacked.is_dir() else set()) == before
    return SINGLE_FILE


def build_id(single_file: Path) -> str:
    """The build id shiv gave it: it names the folder the file unpacks itself into."""
    with zipfile.ZipFile(single_file) as archive:
        return str(json.loads(archive.read("environment.json"))["build_id"])


def rebuilt(single_file: Path, to: Path) -> Path:
    """`single_file` as a second run of scripts/build would make it from the same checkout:
    the same contents under a new build id (what shiv and scripts/install tell two builds
    apart by), written in ~2 s instead of a build's ~13. The shebang line before the archive
    is kept; each member is stored again as it was (compressed alike)."""
    data = single_file.read_bytes()
    prefix = data[: data.index(b"PK\x03\x04")]  # the shebang line shiv writes first
    with zipfile.ZipFile(single_file) as source, to.open("wb") as out:
        out.write(prefix)
        with zipfile.ZipFile(out, "w") as archive:
            for info in source.infolist():
                if info.filename == "environment.json":
                    environment = json.loads(source.read(info))
                    environment["build_id"] = hashlib.sha256(uuid.uuid4().bytes).hexdigest()
                    archive.writestr(info, json.dumps(environment))
                else:
                    with source.open(info) as member:
                        archive.writestr(info, member.read())
    to.chmod(0o755)
    return to
