"""Why Novita would answer a txt2img body with 400 INVALID_REQUEST_BODY.

Ranges, choices and lengths come from the request models themselves (one
source of truth): each object of the JSON body is built as its model
(:class:`~novita_async.Txt2ImgRequest`, :class:`~novita_async.Lora`, ...),
whose validators decide. Only what the models cannot say lives here: which
fields the API requires, JSON shapes, and cross-field rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import attrs

from .._errors import InvalidRequestError
from .._models import (
    Embedding,
    Extra,
    HiresFix,
    Lora,
    Refiner,
    Txt2ImgRequest,
    Webhook,
    WebhookTestMode,
)

__all__ = ["validate_txt2img"]

T = TypeVar("T")

#: Fields Novita's v3 txt2img requires (the models give most of them defaults).
_REQUIRED = (
    "model_name",
    "prompt",
    "width",
    "height",
    "image_num",
    "steps",
    "guidance_scale",
    "sampler_name",
)
#: The typed ``extra`` fields the emulator checks (others are forwarded unchecked).
_EXTRA_FIELDS = ("response_image_type", "enable_nsfw_detection", "nsfw_detection_level")


class _Invalid(Exception):
    pass


def _build(cls: type[T], data: Any, where: str, **nested: Any) -> T:
    """``cls`` built from the JSON object ``data`` (null members are unset), or :class:`_Invalid`.

    The model's messages name the class (``HiresFix.strength ...``); they are
    rewritten to name the JSON path (``request.hires_fix.strength ...``).
    """
    if not isinstance(data, Mapping):
        raise _Invalid(f"{where} must be an object")
    fields = attrs.fields(cls)  # type: ignore[arg-type]
    for field in fields:
        if field.default is attrs.NOTHING and data.get(field.name) is None:
            raise _Invalid(f"{where}.{field.name} is required")
    known = {field.name for field in fields}
    kwargs = {key: value for key, value in data.items() if key in known and value is not None}
    kwargs.update(nested)
    try:
        return cls(**kwargs)
    except InvalidRequestError as exc:
        message = str(exc)
        prefix = f"{cls.__name__}."
        if message.startswith(prefix):
            raise _Invalid(f"{where}.{message[len(prefix) :]}") from None
        raise _Invalid(f"{where}: {message}") from None


def _items(cls: type[T], data: Mapping[str, Any], key: str) -> tuple[T, ...] | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, list):
        raise _Invalid(f"request.{key} must be a list")
    return tuple(_build(cls, item, f"request.{key}[{i}]") for i, item in enumerate(value))


def _nested(cls: type[T], data: Mapping[str, Any], key: str, where: str) -> T | None:
    value = data.get(key)
    return None if value is None else _build(cls, value, f"{where}.{key}")


def _check(body: Any) -> None:
    if not isinstance(body, dict):
        raise _Invalid("body must be a JSON object")
    req = body.get("request")
    if not isinstance(req, dict):
        raise _Invalid("request is required and must be an object")
    for key in _REQUIRED:
        if req.get(key) is None:
            raise _Invalid(f"request.{key} is required")
    extra = body.get("extra")
    if extra is not None and not isinstance(extra, dict):
        raise _Invalid("extra must be an object")
    extra = extra or {}
    nested: dict[str, Any] = {
        "loras": _items(Lora, req, "loras"),
        "embeddings": _items(Embedding, req, "embeddings"),
        "hires_fix": _nested(HiresFix, req, "hires_fix", "request"),
        "refiner": _nested(Refiner, req, "refiner", "request"),
    }
    _build(Txt2ImgRequest, req, "request", **{k: v for k, v in nested.items() if v is not None})
    webhook = extra.get("webhook")
    typed: dict[str, Any] = {key: extra[key] for key in _EXTRA_FIELDS if key in extra}
    if webhook is not None:
        if not isinstance(webhook, Mapping):
            raise _Invalid("extra.webhook must be an object")
        test_mode = _nested(WebhookTestMode, webhook, "test_mode", "extra.webhook")
        built = _build(Webhook, webhook, "extra.webhook", test_mode=test_mode)
        typed["webhook"] = built
    _build(Extra, typed, "extra")
    if req.get("enable_transparent_background") and extra.get("response_image_type") not in (
        None,
        "png",
    ):
        raise _Invalid("enable_transparent_background needs extra.response_image_type png")


def validate_txt2img(body: Any) -> str | None:
    """Why Novita would answer 400 INVALID_REQUEST_BODY to ``body``, or None."""
    try:
        _check(body)
    except _Invalid as exc:
        return str(exc)
    return None
