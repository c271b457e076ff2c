"""gpubox: a GPU job queue. Docker jobs over HTTP, run on free GPUs, logs followed live."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Client", "__version__", "revision"]


def __getattr__(name: str) -> Any:
    """`from gpubox import Client` (gpubox.client), imported when first asked for."""
    if name == "Client":
        from gpubox.client import Client

        return Client
    raise AttributeError(f"module 'gpubox' has no attribute {name!r}")


def revision() -> str:
    """The git revision this gpubox is: stamped into a build (scripts/build), else asked of
    the checkout it runs from; "unknown" when neither can tell."""
    try:
        from gpubox._revision import REVISION  # type: ignore[import-not-found, unused-ignore]

        return str(REVISION)
    except ImportError:
        pass
    import os
    import subprocess

    # Only a gpubox checkout's own git: an installed copy may lie inside another repository
    # (a virtual environment in some project's folder), whose revision is not gpubox's.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, ".git")):  # a folder, or a worktree's file
        return "unknown"
    try:
        found = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"git {found.stdout.strip()}" if found.returncode == 0 else "unknown"
