"""gpubox: a GPU job queue. Docker jobs over HTTP, run on free GPUs, logs followed live."""

__version__ = "0.1.0"


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

    try:
        found = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"git {found.stdout.strip()}" if found.returncode == 0 else "unknown"
