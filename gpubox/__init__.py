"""gpubox: a GPU job queue. Docker jobs over HTTP, run on free GPUs, logs followed live."""

__version__ = "0.1.0"
