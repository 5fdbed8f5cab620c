"""Frozen, slotted, keyword-only models of what is sent: requests and their options.

Request models validate every documented range on construction and raise
:class:`~novita_async.InvalidRequestError` before anything is sent. Messages name the
field as it is passed to the constructor and say what was wrong with the value, in
one form: ``width must be 128-2048, got 99999``. Text must be valid Unicode (no lone
surrogates, which cannot be encoded as UTF-8 JSON), and ``Extra.additional`` must be
plain JSON data (finite numbers, str keys, at most ``MAX_ADDITIONAL_NESTING``
levels). What Novita sends (task results, models) is modelled in :mod:`._results`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Literal

import attrs

from ._errors import InvalidRequestError

__all__ = [
    "TASK_REQUESTS",
    "check_submission",
    "AwsS3Storage",
    "CustomStorage",
    "CLIP_SKIP_RANGE",
    "MAX_ADDITIONAL_NESTING",
    "SEED_MAX",
    "Embedding",
    "EnterprisePlan",
    "Extra",
    "HiresFix",
    "Lora",
    "Refiner",
    "SAMPLERS",
    "Txt2ImgRequest",
    "UPSCALERS",
    "Webhook",
    "WebhookTestMode",
]

#: The 20 samplers Novita's v3 txt2img accepts.
SAMPLERS: frozenset[str] = frozenset(
    {
        "Euler a",
        "Euler",
        "LMS",
        "Heun",
        "DPM2",
        "DPM2 a",
        "DPM++ 2S a",
        "DPM++ 2M",
        "DPM++ SDE",
        "DPM fast",
        "DPM adaptive",
        "LMS Karras",
        "DPM2 Karras",
        "DPM2 a Karras",
        "DPM++ 2S a Karras",
        "DPM++ 2M Karras",
        "DPM++ SDE Karras",
        "DDIM",
        "PLMS",
        "UniPC",
    }
)
#: Accepted ``hires_fix.upscaler`` values.
UPSCALERS: frozenset[str] = frozenset({"RealESRGAN_x4plus_anime_6B", "RealESRNet_x4plus", "Latent"})

ImageType = Literal["png", "webp", "jpeg"]
_IMAGE_TYPES = frozenset({"png", "webp", "jpeg"})

# --------------------------------------------------------------------------- validators

_Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _fail(inst: Any, attribute: attrs.Attribute[Any], why: str) -> InvalidRequestError:
    """``<field> <why>``: the field as the user passed it, e.g. ``width must be …``."""
    return InvalidRequestError(f"{attribute.name} {why}")


def _range(lo: float | None, hi: float | None) -> str:
    if hi is None:
        return f">= {lo}"
    if lo is None:
        return f"<= {hi}"
    return f"{lo} to {hi}" if lo < 0 else f"{lo}-{hi}"


def _unencodable(text: str) -> int | None:
    """Position of the first character UTF-8 cannot encode (a lone surrogate), if any."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _none(inst: Any, attribute: attrs.Attribute[Any], optional: bool) -> None:
    """None is "unset" for optional fields and an error for required ones."""
    if not optional:
        raise _fail(inst, attribute, "is required (got None)")


def _number(
    lo: float | None, hi: float | None, *, integer: bool, optional: bool = False
) -> _Validator:
    """Validator: an int (or a float, unless ``integer``) within [lo, hi].

    ``bool`` is rejected although it is an ``int`` subclass; so are NaN and infinities.
    """

    def check(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None:
            return _none(inst, attribute, optional)
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            kind = "an integer" if integer else "a number"
            raise _fail(inst, attribute, f"must be {kind}, got {value!r}")
        number: float = value
        # Only a float can be non-finite; math.isfinite would raise OverflowError on an
        # int too large for a float (which the range check below refuses exactly).
        if isinstance(number, float) and not math.isfinite(number):
            raise _fail(inst, attribute, f"must be finite, got {value!r}")
        if (lo is not None and number < lo) or (hi is not None and number > hi):
            raise _fail(inst, attribute, f"must be {_range(lo, hi)}, got {value!r}")

    return check


def _text(lo: int, hi: int | None = None, *, optional: bool = False) -> _Validator:
    """Validator: a str whose length (in characters) is within [lo, hi]."""

    def check(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None:
            return _none(inst, attribute, optional)
        if not isinstance(value, str):
            raise _fail(inst, attribute, f"must be a str, got {type(value).__name__}")
        if len(value) < lo or (hi is not None and len(value) > hi):
            limit = f"{lo}-{hi}" if hi is not None else f">= {lo}"
            raise _fail(inst, attribute, f"must have {limit} characters, got {len(value)}")
        bad = _unencodable(value)
        if bad is not None:
            raise _fail(
                inst,
                attribute,
                f"must be valid Unicode text, got a lone surrogate {value[bad]!r} at {bad}",
            )

    return check


def _one_of(choices: frozenset[Any], kind: type, *, optional: bool = False) -> _Validator:
    """Validator: exactly one of ``choices`` and of type ``kind`` (so 1.0 or True is no 1)."""

    def check(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None:
            return _none(inst, attribute, optional)
        if type(value) is not kind or value not in choices:
            shown = ", ".join(sorted(map(repr, choices)))
            raise _fail(inst, attribute, f"must be one of {shown}, got {value!r}")

    return check


def _flag(*, optional: bool = False) -> _Validator:
    def check(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None:
            return _none(inst, attribute, optional)
        if not isinstance(value, bool):
            raise _fail(inst, attribute, f"must be a bool, got {value!r}")

    return check


def _items(kind: type, max_len: int) -> _Validator:
    def check(inst: Any, attribute: attrs.Attribute[Any], value: tuple[Any, ...]) -> None:
        if len(value) > max_len:
            raise _fail(inst, attribute, f"must have at most {max_len} items, got {len(value)}")
        for item in value:
            if not isinstance(item, kind):
                raise _fail(inst, attribute, f"items must be {kind.__name__}, got {item!r}")

    return check


def _instance(kind: type, *, optional: bool = True) -> _Validator:
    def check(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None:
            return _none(inst, attribute, optional)
        if not isinstance(value, kind):
            raise _fail(inst, attribute, f"must be a {kind.__name__}, got {value!r}")

    return check


def _sequence(name: str, value: Any) -> tuple[Any, ...]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise InvalidRequestError(f"{name} must be a sequence, got {value!r}")
    return tuple(value)


def _as_loras(value: Iterable[Lora]) -> tuple[Any, ...]:
    return _sequence("loras", value)


def _as_embeddings(value: Iterable[Embedding]) -> tuple[Any, ...]:
    return _sequence("embeddings", value)


#: How deeply ``Extra.additional`` may nest objects and lists.
MAX_ADDITIONAL_NESTING = 32


def _as_dict(value: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidRequestError(f"additional must be a mapping, got {value!r}")
    if not all(isinstance(key, str) for key in value):
        raise InvalidRequestError("additional keys must be str")
    return dict(value)


def _json_problem(value: Any) -> str | None:
    """Why ``value`` is not plain JSON data (None if it is); iterative, any depth."""
    stack: list[tuple[Any, str, int]] = [(value, "additional", 0)]
    while stack:
        item, where, depth = stack.pop()
        if item is None or isinstance(item, (bool, int)):
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                return f"{where} must be a finite number, got {item!r}"
        elif isinstance(item, str):
            bad = _unencodable(item)
            if bad is not None:
                return f"{where} must be valid Unicode text, got a lone surrogate at {bad}"
        elif isinstance(item, (Mapping, list, tuple)):
            if depth >= MAX_ADDITIONAL_NESTING:
                return f"{where} must nest at most {MAX_ADDITIONAL_NESTING} levels"
            if isinstance(item, Mapping):
                for key, child in item.items():
                    if not isinstance(key, str):
                        return f"{where} keys must be str, got {key!r}"
                    if _unencodable(key) is not None:
                        return f"{where} keys must be valid Unicode text, got {key!r}"
                    stack.append((child, f"{where}[{key!r}]", depth + 1))
            else:
                stack.extend((child, f"{where}[{i}]", depth + 1) for i, child in enumerate(item))
        else:
            return f"{where} must be JSON data, got {type(item).__name__}: {item!r:.100}"
    return None


# --------------------------------------------------------------------------- request side


@attrs.frozen(kw_only=True)
class Lora:
    """A LoRA applied to the checkpoint; ``model_name`` is the model's ``sd_name_in_api``.

    ``strength`` is in [0, 1].
    """

    model_name: str = attrs.field(validator=_text(1))
    strength: float = attrs.field(validator=_number(0, 1, integer=False))


@attrs.frozen(kw_only=True)
class Embedding:
    """A textual-inversion embedding (``sd_name_in_api``; the file name also works)."""

    model_name: str = attrs.field(validator=_text(1))


@attrs.frozen(kw_only=True)
class HiresFix:
    """Second, upscaled diffusion pass: targets in [128, 4096], ``strength`` in [0, 1]."""

    target_width: int = attrs.field(validator=_number(128, 4096, integer=True))
    target_height: int = attrs.field(validator=_number(128, 4096, integer=True))
    strength: float = attrs.field(validator=_number(0, 1, integer=False))
    upscaler: str | None = attrs.field(
        default=None, validator=_one_of(UPSCALERS, str, optional=True)
    )


@attrs.frozen(kw_only=True)
class Refiner:
    """SDXL refiner; ``switch_at`` in [0, 1] is the fraction of steps after which it takes over."""

    switch_at: float = attrs.field(validator=_number(0, 1, integer=False))


#: ``clip_skip`` bounds. Novita's schema gives no range (its guide says 1-2 is typical);
#: 1-12 is the range of the Stable Diffusion WebUI setting Novita's backend mirrors, and
#: 12 is the layer count of the SD 1.x CLIP text encoder, so nothing larger can mean anything.
CLIP_SKIP_RANGE = (1, 12)


#: Largest ``seed``. Novita documents only the minimum (-1, random); its Stable Diffusion
#: backends draw and take seeds as unsigned 32-bit integers (the seeds in its answers and
#: the WebUI it mirrors stay below 2**32), so anything larger is refused before sending.
SEED_MAX = 2**32 - 1


@attrs.frozen(kw_only=True)
class Txt2ImgRequest:
    """The ``request`` object of ``POST /v3/async/txt2img``.

    Like every task request the engine submits, it knows its ``endpoint`` (a v3
    async path whose task ends in ``GET /v3/async/task-result``), its quota
    ``weight`` and its relative ``cost``.

    Ranges (Novita's documented ones, checked on construction): prompt and
    negative_prompt 1-1024 characters, width/height 128-2048, image_num 1-8,
    steps 1-100, guidance_scale 1-30, seed -1 to ``SEED_MAX`` (-1 = random), clip_skip 1-12
    (see ``CLIP_SKIP_RANGE``), sampler_name one of ``SAMPLERS``, at most 5 loras
    and 5 embeddings. Required API fields have Novita's example values as
    defaults; every optional field left as ``None`` (or empty) is omitted from
    the JSON, so Novita applies its own default (e.g. seed -1).
    """

    endpoint: ClassVar[str] = "/v3/async/txt2img"

    model_name: str = attrs.field(validator=_text(1))
    prompt: str = attrs.field(validator=_text(1, 1024))
    width: int = attrs.field(default=512, validator=_number(128, 2048, integer=True))
    height: int = attrs.field(default=512, validator=_number(128, 2048, integer=True))
    image_num: int = attrs.field(default=1, validator=_number(1, 8, integer=True))
    steps: int = attrs.field(default=20, validator=_number(1, 100, integer=True))
    guidance_scale: float = attrs.field(default=7.5, validator=_number(1, 30, integer=False))
    sampler_name: str = attrs.field(default="Euler a", validator=_one_of(SAMPLERS, str))
    negative_prompt: str | None = attrs.field(default=None, validator=_text(1, 1024, optional=True))
    sd_vae: str | None = attrs.field(default=None, validator=_text(1, optional=True))
    seed: int | None = attrs.field(
        default=None, validator=_number(-1, SEED_MAX, integer=True, optional=True)
    )
    clip_skip: int | None = attrs.field(
        default=None, validator=_number(*CLIP_SKIP_RANGE, integer=True, optional=True)
    )
    loras: tuple[Lora, ...] = attrs.field(
        default=(), converter=_as_loras, validator=_items(Lora, 5)
    )
    embeddings: tuple[Embedding, ...] = attrs.field(
        default=(), converter=_as_embeddings, validator=_items(Embedding, 5)
    )
    hires_fix: HiresFix | None = attrs.field(default=None, validator=_instance(HiresFix))
    refiner: Refiner | None = attrs.field(default=None, validator=_instance(Refiner))
    restore_faces: bool | None = attrs.field(default=None, validator=_flag(optional=True))
    enable_transparent_background: bool | None = attrs.field(
        default=None, validator=_flag(optional=True)
    )

    @property
    def cost(self) -> float:
        """Relative GPU work (steps x megapixels x images); used to predict durations."""
        pixels = self.width * self.height
        if self.hires_fix is not None:
            pixels += self.hires_fix.target_width * self.hires_fix.target_height
        return self.steps * pixels / 1_000_000 * self.image_num

    @property
    def weight(self) -> int:
        """What the request counts against Novita's images-per-minute quota."""
        return self.image_num


@attrs.frozen(kw_only=True)
class WebhookTestMode:
    """Ask Novita to send a simulated webhook event with the given status."""

    enabled: bool = attrs.field(default=True, validator=_flag())
    return_task_status: str = attrs.field(
        default="TASK_STATUS_SUCCEED",
        validator=_one_of(frozenset({"TASK_STATUS_SUCCEED", "TASK_STATUS_FAILED"}), str),
    )


@attrs.frozen(kw_only=True)
class Webhook:
    """Novita POSTs ``{"event_type": "ASYNC_TASK_RESULT", "payload": …}`` to ``url``."""

    url: str = attrs.field(validator=_text(1))
    test_mode: WebhookTestMode | None = attrs.field(
        default=None, validator=_instance(WebhookTestMode)
    )

    @url.validator
    def _http_url(self, attribute: attrs.Attribute[str], value: str) -> None:
        if not value.startswith(("http://", "https://")):
            raise _fail(self, attribute, f"must be an http(s) URL, got {value!r}")


@attrs.frozen(kw_only=True)
class AwsS3Storage:
    """Write results into the user's own S3 bucket (``save_to_path_directly`` skips
    the subdirectory Novita adds by default)."""

    region: str = attrs.field(validator=_text(1))
    bucket: str = attrs.field(validator=_text(1))
    path: str = attrs.field(validator=_text(1))
    save_to_path_directly: bool | None = attrs.field(default=None, validator=_flag(optional=True))


@attrs.frozen(kw_only=True)
class CustomStorage:
    """``extra.custom_storage``: currently only ``aws_s3``."""

    aws_s3: AwsS3Storage = attrs.field(validator=_instance(AwsS3Storage, optional=False))


@attrs.frozen(kw_only=True)
class EnterprisePlan:
    """Route the task to the account's dedicated endpoint."""

    enabled: bool = attrs.field(default=False, validator=_flag())


@attrs.frozen(kw_only=True)
class Extra:
    """The optional ``extra`` object of a submission.

    ``response_image_type`` is png, webp or jpeg; ``nsfw_detection_level`` 0, 1
    or 2 (higher is stricter; detection costs extra per image). ``additional``
    is merged verbatim into the JSON, for keys Novita adds later; it may not
    shadow a typed field.
    """

    response_image_type: ImageType | None = attrs.field(
        default=None, validator=_one_of(_IMAGE_TYPES, str, optional=True)
    )
    enable_nsfw_detection: bool | None = attrs.field(default=None, validator=_flag(optional=True))
    nsfw_detection_level: int | None = attrs.field(
        default=None, validator=_one_of(frozenset({0, 1, 2}), int, optional=True)
    )
    webhook: Webhook | None = attrs.field(default=None, validator=_instance(Webhook))
    custom_storage: CustomStorage | None = attrs.field(
        default=None, validator=_instance(CustomStorage)
    )
    enterprise_plan: EnterprisePlan | None = attrs.field(
        default=None, validator=_instance(EnterprisePlan)
    )
    additional: Mapping[str, Any] = attrs.field(factory=dict, converter=_as_dict, hash=False)

    @additional.validator
    def _no_shadowing(self, attribute: attrs.Attribute[Any], value: Mapping[str, Any]) -> None:
        typed = {field.name for field in attrs.fields(Extra)} - {"additional"}
        clash = sorted(typed & set(value))
        if clash:
            raise _fail(self, attribute, f"must not repeat typed fields: {', '.join(clash)}")
        problem = _json_problem(value)
        if problem is not None:
            raise InvalidRequestError(problem)


#: Request models the engine can submit (each has ``endpoint``, ``weight``, ``cost``).
TASK_REQUESTS: tuple[type[Txt2ImgRequest], ...] = (Txt2ImgRequest,)


def check_submission(request: object, extra: object) -> None:
    """Type and cross-field checks no single model can make alone (before any I/O)."""
    if not isinstance(request, TASK_REQUESTS):
        raise InvalidRequestError(f"request must be a Txt2ImgRequest, got {type(request).__name__}")
    if extra is not None and not isinstance(extra, Extra):
        raise InvalidRequestError(f"extra must be an Extra, got {type(extra).__name__}")
    if request.enable_transparent_background and (
        extra is None or extra.response_image_type != "png"
    ):
        raise InvalidRequestError(
            "enable_transparent_background needs Extra(response_image_type='png')"
        )
