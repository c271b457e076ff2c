"""The one error hierarchy of gpubox; each class's docstring is its default message."""

from __future__ import annotations


class GpuboxError(Exception):
    """gpubox failed."""

    http_status = 500
    code = "internal"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self)


class BadInput(GpuboxError):
    """The request is not valid."""

    http_status = 400
    code = "bad_input"

    def __init__(self, message: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class Unauthorized(GpuboxError):
    """A valid bearer token is required."""

    http_status = 401
    code = "unauthorized"


class Forbidden(GpuboxError):
    """This token's role does not allow that."""

    http_status = 403
    code = "forbidden"


class NotYourJob(Forbidden):
    """A submit token cancels only the jobs it submitted; an admin token cancels any."""

    code = "not_your_job"


class NotFound(GpuboxError):
    """No such resource."""

    http_status = 404
    code = "not_found"


class JobNotFound(NotFound):
    """No such job."""

    def __init__(self, job_id: int) -> None:
        super().__init__(f"no job with id {job_id}")
        self.job_id = job_id


class WrongState(GpuboxError):
    """The job is not in a state that allows this."""

    http_status = 409
    code = "wrong_state"


class TooLarge(GpuboxError):
    """The request body is too large."""

    http_status = 413
    code = "too_large"


class StoreUnavailable(GpuboxError):
    """The store cannot be reached right now; try again."""

    http_status = 503
    code = "store_unavailable"


class Busy(GpuboxError):
    """The coordinator is too busy for this right now; try again."""

    http_status = 503
    code = "busy"


class StoreError(GpuboxError):
    """The store failed."""


class ProtocolError(GpuboxError):
    """A message on the worker link is malformed."""


class ConfigError(GpuboxError):
    """A setting has a bad value."""
