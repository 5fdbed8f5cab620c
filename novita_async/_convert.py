"""The one cattrs converter: lenient JSON -> frozen results, requests -> minimal JSON.

Result parsing accepts what Novita really sends: numbers as strings (``seed``,
``image_url_ttl``, ``*_time_ms``), ``""`` for missing numbers, ``null``/``{}``
for "no NSFW result", ``request_info`` as a JSON-encoded string, unknown keys
(ignored) and unknown statuses (``TaskStatus.UNKNOWN``). Every failure is
reported as :class:`MalformedResponseError`, also for absurd input such as JSON nested
thousands of levels deep (which Python's json and cattrs answer with RecursionError):
see :func:`decode_json`. Nested free-form data kept in a result (``request_info``) is
dropped when nested deeper than ``MAX_NESTING`` levels, so every result can be dumped
again (the journal stores results as JSON).
"""

from __future__ import annotations

import json
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn

from ._errors import MalformedResponseError
from ._models import Extra, Txt2ImgRequest
from ._results import (
    Model,
    ModelType,
    NsfwDetectionResult,
    ResultExtra,
    TaskResult,
    TaskStatus,
    WebhookEvent,
)

__all__ = [
    "converter",
    "decode_json",
    "envelope_error",
    "model",
    "parse_error_body",
    "request_body",
    "structure",
    "submit_task_id",
    "task_result",
    "task_result_for",
    "unstructure_request",
    "webhook_event",
]

T = TypeVar("T")
_Hook = Callable[[Any, Any], Any]

converter = cattrs.Converter(forbid_extra_keys=False)

#: Free-form JSON kept in a result (``debug_info.request_info``) deeper than this is dropped.
MAX_NESTING = 64


def decode_json(content: bytes | str, *, what: str = "response") -> Any:
    """``json.loads`` for API answers: anything undecodable (bad JSON, bad UTF-8, nesting
    too deep for Python's parser) raises :class:`MalformedResponseError`, never
    ValueError or RecursionError. ``what`` names the body in the message."""
    try:
        return json.loads(content)
    except (ValueError, RecursionError) as exc:  # ValueError includes UnicodeDecodeError
        raw = content if isinstance(content, str) else content.decode("utf-8", "replace")
        problem = "nested too deeply" if isinstance(exc, RecursionError) else "not JSON"
        raise MalformedResponseError(f"{what} body is {problem}", body=raw[:2000]) from exc


#: What ``_too_deep`` looks into, and the JSON scalars it skips with a cheap check first.
_CONTAINERS = (dict, list, tuple, Mapping)
_SCALARS = (str, int, float, type(None))


def _too_deep(value: Any, limit: int = MAX_NESTING) -> bool:
    """Whether JSON-like ``value`` nests objects/lists more than ``limit`` levels (no
    recursion): walked one level at a time, scalars dropped as each level is made."""
    level: list[Any] = [value] if isinstance(value, _CONTAINERS) else []
    depth = 1
    while level:
        if depth > limit:
            return True
        below: list[Any] = []
        for item in level:
            below.extend(item.values() if isinstance(item, Mapping) else item)
        level = [i for i in below if not isinstance(i, _SCALARS) and isinstance(i, _CONTAINERS)]
        depth += 1
    return False


# --------------------------------------------------------------------------- lenient scalars


def _lenient_int(value: Any, _: Any = None) -> int | None:
    """int from int, integral float or numeric string; "", None and junk give None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) else None
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                return None
            return int(number) if math.isfinite(number) else None
    return None


def _required_int(value: Any, _: Any = None) -> int:
    number = _lenient_int(value)
    if number is None:
        raise ValueError(f"expected an integer, got {value!r}")
    return number


def _lenient_float(value: Any, _: Any = None) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _lenient_bool(value: Any, _: Any = None) -> bool | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return bool(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in {"true", "1", "yes"}:
            return True
        if lowered in {"false", "0", "no"}:
            return False
    return None


def _lenient_str(value: Any, _: Any = None) -> str:
    """str from str or a scalar (None gives ""); objects and lists are malformed."""
    if value is None:
        return ""
    if isinstance(value, (Mapping, list, tuple)):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return value if isinstance(value, str) else str(value)


def _as_text(value: Any) -> str:
    """Never-failing text for messages: None gives "", objects their JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (Mapping, list, tuple)):
        return _preview(value)
    return str(value)


def _status(value: Any, _: Any = None) -> TaskStatus:
    """``TASK_STATUS_*`` (or the bare name); anything else is UNKNOWN."""
    if not isinstance(value, str):
        return TaskStatus.UNKNOWN
    text = value.strip().upper()
    if not text.startswith("TASK_STATUS_"):
        text = "TASK_STATUS_" + text
    try:
        return TaskStatus(text)
    except ValueError:
        return TaskStatus.UNKNOWN


def _json_object(value: Any, _: Any = None) -> Mapping[str, Any] | None:
    """``debug_info.request_info`` is a JSON string (or "", or already an object).

    Anything else, unparseable or nested deeper than ``MAX_NESTING``, gives None.
    """
    parsed: Any = None
    if isinstance(value, Mapping):
        parsed = dict(value)
    elif isinstance(value, str) and value.strip():
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            return None
    if not isinstance(parsed, dict) or _too_deep(parsed):
        return None
    return parsed


def _nsfw(value: Any, _: Any = None) -> NsfwDetectionResult | None:
    """null and {} both mean "no detection result"."""
    if not isinstance(value, Mapping) or not value:
        return None
    return NsfwDetectionResult(
        valid=_lenient_bool(value.get("valid")),
        confidence=_lenient_float(value.get("confidence")),
    )


def _model_type(value: Any, _: Any = None) -> ModelType:
    if isinstance(value, Mapping):
        return ModelType(
            name=_as_text(value.get("name")),
            display_name=_as_text(value.get("display_name")),
        )
    return ModelType(name=_as_text(value))


# --------------------------------------------------------------------------- generic factories


def _optional_member(type_: Any) -> Any:
    """``X`` if ``type_`` is ``X | None`` for one attrs class X, else None."""
    if typing.get_origin(type_) not in (typing.Union, types.UnionType):
        return None
    members = [arg for arg in typing.get_args(type_) if arg is not type(None)]
    if len(members) == 1 and len(typing.get_args(type_)) == 2 and attrs.has(members[0]):
        return members[0]
    return None


def _optional_object_hook(type_: Any) -> _Hook:
    """An optional nested object: anything but a JSON object gives None."""
    cls = _optional_member(type_)

    def hook(value: Any, _: Any) -> Any:
        if not isinstance(value, Mapping):
            return None
        return converter.structure(value, cls)

    return hook


def _is_homogeneous_tuple(type_: Any) -> bool:
    args = typing.get_args(type_)
    return typing.get_origin(type_) is tuple and len(args) == 2 and args[1] is Ellipsis


def _tuple_hook(type_: Any) -> _Hook:
    """A JSON list; null, absent or a non-list value give ``()``."""
    item_type = typing.get_args(type_)[0]

    def hook(value: Any, _: Any) -> tuple[Any, ...]:
        if not isinstance(value, (list, tuple)):
            return ()
        return tuple(converter.structure(item, item_type) for item in value)

    return hook


def _on(type_: Any, hook: _Hook) -> None:
    """Register ``hook`` for exactly ``type_`` (works for unions and generics on 3.10)."""
    converter.register_structure_hook_func(lambda candidate: candidate == type_, hook)


# Later registrations win, so the generic factories come first and exact types after.
converter.register_structure_hook_factory(
    lambda t: _optional_member(t) is not None, _optional_object_hook
)
converter.register_structure_hook_factory(_is_homogeneous_tuple, _tuple_hook)
# Plain classes go through cattrs' direct dispatch, which predicates cannot override.
converter.register_structure_hook(str, _lenient_str)
converter.register_structure_hook(int, _required_int)
_on(int | None, _lenient_int)
_on(float | None, _lenient_float)
_on(bool | None, _lenient_bool)
_on(Mapping[str, Any] | None, _json_object)
_on(TaskStatus, _status)
_on(NsfwDetectionResult | None, _nsfw)
_on(ModelType, _model_type)

_structure_result_extra = make_dict_structure_fn(ResultExtra, converter)


def _result_extra(value: Any, _: Any = None) -> ResultExtra:
    """A missing or non-object ``extra`` gives an empty ResultExtra."""
    return _structure_result_extra(value if isinstance(value, Mapping) else {}, ResultExtra)


_on(ResultExtra, _result_extra)


# --------------------------------------------------------------------------- result helpers


def structure(data: Any, cls: type[T]) -> T:
    """Structure a decoded JSON document, wrapping any failure in MalformedResponseError."""
    if not isinstance(data, Mapping):
        raise MalformedResponseError(
            f"expected a JSON object for {cls.__name__}, got {type(data).__name__}",
            body=_preview(data),
        )
    try:
        return converter.structure(data, cls)
    except Exception as exc:  # cattrs groups, KeyError, TypeError, RecursionError, ...
        raise MalformedResponseError(
            f"cannot read {cls.__name__} from response: {_describe(exc)}", body=_preview(data)
        ) from exc


def _describe(exc: BaseException) -> str:
    """A short description, flattening cattrs' exception groups."""
    if isinstance(exc, cattrs.BaseValidationError) and exc.exceptions:
        return _describe(exc.exceptions[0])
    return f"{type(exc).__name__}: {exc}"


def _preview(data: Any) -> str:
    """At most 2000 characters of ``data`` for error messages; never raises."""
    if _too_deep(data, 200):
        return "<body nested too deeply to show>"
    try:
        text = json.dumps(data)
    except (TypeError, ValueError, RecursionError):
        try:
            text = repr(data)
        except Exception:  # a hostile __repr__, or still too deep
            text = f"<unprintable {type(data).__name__}>"
    return text[:2000]


def _unwrap(data: Any, key: str) -> Any:
    """The v2 envelope ``{"code": 0, "data": {...}}`` -> its ``data`` when ``key`` lives there."""
    if (
        isinstance(data, Mapping)
        and key not in data
        and isinstance(data.get("data"), Mapping)
        and key in data["data"]
    ):
        return data["data"]
    return data


def task_result(data: Any) -> TaskResult:
    """Parse a task-result body (also a webhook payload)."""
    result = _task_result(data)
    if not result.task.task_id:
        raise MalformedResponseError("task-result body has an empty task_id", body=_preview(data))
    return result


def task_result_for(data: Any, task_id: str) -> TaskResult:
    """Parse the answer to ``GET /v3/async/task-result?task_id=<task_id>`` and check that it
    is that task's.

    An answer naming another task raises :class:`MalformedResponseError` (retry it like
    any malformed answer): accepting it would resolve the wait for ``task_id`` with
    another task's images and journal them against the wrong prompt. An answer with no
    (or an empty) ``task.task_id`` is taken as the asked task's and gets ``task_id``
    filled in: it answers a request for exactly one task, and nothing in it contradicts
    that (lenient, like the rest of the parsing).
    """
    data = _unwrap(data, "task")
    task = data.get("task") if isinstance(data, Mapping) else None
    if isinstance(task, Mapping) and task.get("task_id") in (None, ""):
        data = {**data, "task": {**task, "task_id": task_id}}
    result = _task_result(data)
    answered = result.task.task_id
    if answered != task_id:
        raise MalformedResponseError(
            f"task-result answer is for task {answered!r}, not the task asked for ({task_id!r})",
            body=_preview(data),
        )
    return result


def _task_result(data: Any) -> TaskResult:
    data = _unwrap(data, "task")
    if isinstance(data, Mapping) and not isinstance(data.get("task"), Mapping):
        raise MalformedResponseError("task-result body has no 'task' object", body=_preview(data))
    return structure(data, TaskResult)


def webhook_event(data: Any) -> WebhookEvent:
    """Parse ``{"event_type": ..., "payload": ...}``; payload parsed only for task results."""
    if not isinstance(data, Mapping):
        raise MalformedResponseError("webhook body is not a JSON object", body=_preview(data))
    event_type = _as_text(data.get("event_type"))
    payload = data.get("payload")
    result = task_result(payload) if event_type == "ASYNC_TASK_RESULT" else None
    return WebhookEvent(event_type=event_type, payload=result)


def model(data: Any) -> Model:
    return structure(data, Model)


def submit_task_id(data: Any) -> str:
    """The task_id from ``{"task_id"}`` or the v2-style ``{"code":0,"msg":"","data":{"task_id"}}``.

    A body without a usable task_id raises :class:`MalformedResponseError`
    (an envelope with a non-zero code is turned into an error by the transport).
    """
    data = _unwrap(data, "task_id")
    if isinstance(data, Mapping):
        task_id = data.get("task_id")
        if isinstance(task_id, str) and task_id.strip():
            return task_id
    raise MalformedResponseError("submit response has no task_id", body=_preview(data))


def envelope_error(data: Any) -> tuple[int, str] | None:
    """``(code, msg)`` if a 2xx body is an envelope carrying a non-zero ``code``.

    Bodies holding a ``task_id`` or ``task`` are answers, whatever their code.
    """
    if not isinstance(data, Mapping) or "code" not in data:
        return None
    if "task_id" in data or "task" in data:
        return None
    code = _lenient_int(data.get("code"))
    if code is None or code in (0, 200):
        return None
    return code, _envelope_message(data)


def _envelope_message(data: Mapping[str, Any]) -> str:
    return _as_text(data.get("message") or data.get("msg"))


def parse_error_body(text: str) -> tuple[str, str, Mapping[str, Any]]:
    """(reason, message, metadata) from Novita's ``{code, reason, message, metadata}``."""
    try:
        data = json.loads(text) if text else None
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, Mapping):
        return "", text.strip()[:500], {}
    metadata = data.get("metadata")
    return (
        _as_text(data.get("reason")),
        _as_text(data.get("message") or data.get("msg")),
        dict(metadata) if isinstance(metadata, Mapping) and not _too_deep(metadata) else {},
    )


# --------------------------------------------------------------------------- request side


def _pruned(value: Any) -> Any:
    """Drop None values and empty lists/objects, recursively."""
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            item = _pruned(item)
            if item is None or item == [] or item == {}:
                continue
            out[key] = item
        return out
    if isinstance(value, (list, tuple)):
        return [_pruned(item) for item in value]
    return value


def unstructure_request(value: Txt2ImgRequest | Extra) -> dict[str, Any]:
    """Minimal JSON for a request model: unset optionals are omitted, never null."""
    data: dict[str, Any] = _pruned(converter.unstructure(value))
    if isinstance(value, Extra):
        additional = data.pop("additional", {})
        data = {**additional, **data}
    return data


def request_body(request: Txt2ImgRequest, extra: Extra | None) -> dict[str, Any]:
    """The full txt2img body ``{"request": …, "extra": …}`` (no ``extra`` key if empty)."""
    body: dict[str, Any] = {"request": unstructure_request(request)}
    if extra is not None:
        extra_json = unstructure_request(extra)
        if extra_json:
            body["extra"] = extra_json
    return body
