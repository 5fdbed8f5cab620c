"""Frozen, slotted, keyword-only models of what Novita sends: task results and models.

Built by the converter (:mod:`._convert`), leniently: they never validate, they
accept (an unknown status is ``TaskStatus.UNKNOWN``, a missing field its default).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = [
    "Audio",
    "AudioMetadata",
    "DebugInfo",
    "Image",
    "Model",
    "ModelType",
    "NsfwDetectionResult",
    "ResultExtra",
    "Task",
    "TaskResult",
    "TaskStatus",
    "Video",
    "WebhookEvent",
]


class TaskStatus(enum.Enum):
    """Status of an async task; anything Novita invents later maps to UNKNOWN."""

    QUEUED = "TASK_STATUS_QUEUED"
    PROCESSING = "TASK_STATUS_PROCESSING"
    SUCCEED = "TASK_STATUS_SUCCEED"
    FAILED = "TASK_STATUS_FAILED"
    UNKNOWN = "TASK_STATUS_UNKNOWN"

    @property
    def is_terminal(self) -> bool:
        return self in (TaskStatus.SUCCEED, TaskStatus.FAILED)


@attrs.frozen(kw_only=True)
class Task:
    """``task`` of a task result. ``eta`` is in seconds; ``progress_percent`` stays 0
    for images even on success, so never use it to detect completion."""

    task_id: str
    task_type: str = ""
    status: TaskStatus = TaskStatus.UNKNOWN
    reason: str = ""
    eta: float | None = None
    progress_percent: float | None = None


@attrs.frozen(kw_only=True)
class NsfwDetectionResult:
    """``valid``: whether detection ran; ``confidence``: 0-100, higher is more likely NSFW."""

    valid: bool | None = None
    confidence: float | None = None


@attrs.frozen(kw_only=True)
class Image:
    """A generated image: a presigned URL valid for ``image_url_ttl`` seconds (3600).

    ``nsfw_detection_result`` is None when detection was off (Novita sends null or {}).
    """

    image_url: str
    image_type: str = ""
    image_url_ttl: int | None = None
    nsfw_detection_result: NsfwDetectionResult | None = None


@attrs.frozen(kw_only=True)
class Video:
    """A generated video (video task types share the task-result endpoint)."""

    video_url: str
    video_type: str = ""
    video_url_ttl: int | None = None


@attrs.frozen(kw_only=True)
class AudioMetadata:
    """Transcript and timing (seconds) of a generated audio clip."""

    text: str = ""
    start_time: float | None = None
    end_time: float | None = None


@attrs.frozen(kw_only=True)
class Audio:
    """A generated audio clip."""

    audio_url: str
    audio_type: str = ""
    audio_url_ttl: int | None = None
    audio_metadata: AudioMetadata | None = None


@attrs.frozen(kw_only=True)
class DebugInfo:
    """Novita's debugging details: ``request_info`` is the JSON string Novita sends,
    already parsed (None if empty or not an object); times are epoch milliseconds."""

    request_info: Mapping[str, Any] | None = attrs.field(default=None, hash=False)
    submit_time_ms: int | None = None
    execute_time_ms: int | None = None
    complete_time_ms: int | None = None


@attrs.frozen(kw_only=True)
class ResultExtra:
    """``extra`` of a task result; ``seed`` is an int although Novita sends a string."""

    seed: int | None = None
    enable_nsfw_detection: bool | None = None
    debug_info: DebugInfo | None = None


@attrs.frozen(kw_only=True)
class TaskResult:
    """One answer of ``GET /v3/async/task-result``."""

    task: Task
    extra: ResultExtra = ResultExtra()
    images: tuple[Image, ...] = ()
    videos: tuple[Video, ...] = ()
    audios: tuple[Audio, ...] = ()

    @property
    def task_id(self) -> str:
        return self.task.task_id

    @property
    def status(self) -> TaskStatus:
        return self.task.status

    @property
    def is_finished(self) -> bool:
        return self.task.status.is_terminal


@attrs.frozen(kw_only=True)
class WebhookEvent:
    """A parsed webhook delivery."""

    event_type: str
    payload: TaskResult | None = None


@attrs.frozen(kw_only=True)
class ModelType:
    """``type`` of a model (``checkpoint``, ``lora``, ``locon``, ...)."""

    name: str = ""
    display_name: str = ""


@attrs.frozen(kw_only=True)
class Model:
    """One entry of ``GET /v3/model``."""

    id: int
    name: str = ""
    sd_name: str = ""
    sd_name_in_api: str = ""
    type: ModelType = ModelType()
    status: int | None = None
    hash_sha256: str = ""
    categories: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    download_url: str = ""
    download_url_ttl: int | None = None
    cover_url: str = ""
    source: str = ""
    base_model: str = ""
    base_model_type: str = ""
    is_sdxl: bool | None = None
    is_nsfw: bool | None = None
    visibility: str = ""

    @property
    def is_available(self) -> bool:
        return self.status == 1
