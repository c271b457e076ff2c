"""`python -m gpubox` is the `gpubox` command."""

from gpubox.cli import main

main()
