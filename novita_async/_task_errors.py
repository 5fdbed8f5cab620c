"""Errors about one task's fate, which carry the request or the result they are about.

(Apart from :mod:`._errors` so that the models can raise :class:`InvalidRequestError`
while these errors refer to the models.)
"""

from __future__ import annotations

from ._errors import NovitaError
from ._models import Extra, Txt2ImgRequest
from ._results import TaskResult

__all__ = ["SubmissionUncertainError", "TaskFailedError", "TaskTimeoutError"]


class SubmissionUncertainError(NovitaError):
    """A txt2img POST may or may not have created a (paid) task.

    Raised instead of retrying when the body reached Novita but no usable answer
    came back (read timeout, reset, 500/502/504). Resubmitting may pay twice;
    ``request`` and ``extra`` are kept so the caller can decide.
    """

    def __init__(
        self,
        message: str,
        *,
        request: Txt2ImgRequest,
        extra: Extra | None = None,
        cause: BaseException | None = None,
    ) -> None:
        super().__init__(message)
        self.request = request
        self.extra = extra
        self.cause = cause


class TaskFailedError(NovitaError):
    """The task finished with ``TASK_STATUS_FAILED``."""

    def __init__(self, task_id: str, reason: str, result: TaskResult) -> None:
        super().__init__(f"task {task_id} failed: {reason or '<no reason given>'}")
        self.task_id = task_id
        self.reason = reason
        self.result = result


class TaskTimeoutError(NovitaError, TimeoutError):
    """The caller's deadline passed before the task finished; polling stopped."""

    def __init__(self, task_id: str, last_result: TaskResult | None, timeout: float) -> None:
        status = last_result.task.status.name if last_result is not None else "never seen"
        super().__init__(f"task {task_id} not finished after {timeout:g}s (last status: {status})")
        self.task_id = task_id
        self.last_result = last_result
        self.timeout = timeout
