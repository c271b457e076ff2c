"""The one error hierarchy of gpubox; each class's docstring is its default message.

Every error gpubox raises on purpose is a GpuboxError. The HTTP status of each error is chosen
by the API (STATUS in gpubox/coordinator/api/http_errors.py), not here; `code` is the
machine-readable name that the API puts in its JSON error body."""

from __future__ import annotations


class GpuboxError(Exception):
    """gpubox failed."""

    code = "internal"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self)


class BadInput(GpuboxError):
    """The request is not valid."""

    code = "bad_input"

    def __init__(self, message: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class Unauthorized(GpuboxError):
    """A valid bearer token is required."""

    code = "unauthorized"


class Forbidden(GpuboxError):
    """This token's role does not allow that."""

    code = "forbidden"


class NotYourJob(Forbidden):
    """A submit token cancels only the jobs it submitted; an admin token cancels any."""

    code = "not_your_job"


class NotFound(GpuboxError):
    """No such resource."""

    code = "not_found"


class JobNotFound(NotFound):
    """No such job."""

    def __init__(self, job_id: int) -> None:
        super().__init__(f"no job with id {job_id}")
        self.job_id = job_id


class WrongState(GpuboxError):
    """The job is not in a state that allows this."""

    code = "wrong_state"


class IdempotencyConflict(GpuboxError):
    """This Idempotency-Key was used for another request."""

    code = "idempotency_conflict"


class OverCap(GpuboxError):
    """A cap of this token's (max_queued) refuses the request; try again later."""

    code = "over_cap"

    def __init__(
        self, message: str | None = None, field: str | None = None, retry_after_s: int = 30
    ) -> None:
        super().__init__(message)
        self.field = field  # the cap, as the error body names it
        self.retry_after_s = retry_after_s


class TooLarge(GpuboxError):
    """The request body is too large."""

    code = "too_large"


class Busy(GpuboxError):
    """The coordinator is too busy for this right now; try again."""

    code = "busy"


class StoreError(GpuboxError):
    """The store failed."""


class StoreUnavailable(StoreError):
    """The store cannot be reached right now; try again."""

    code = "store_unavailable"


class ProtocolError(GpuboxError):
    """A message on the worker link is malformed."""


class ConfigError(GpuboxError):
    """A setting has a bad value."""


class Deposed(GpuboxError):
    """This coordinator led, and another took over (a newer epoch leads). It must end the
    broker's thread, and with it the coordinator: the broker's handlers of its ordinary
    failures let it through (see Broker._guard). The API never meets it (only the broker's
    and the webhooks' threads are fenced); if it did, 503: ask another coordinator."""

    code = "store_unavailable"
