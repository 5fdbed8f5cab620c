"""Request models: every field, every documented range, exact JSON, nothing sent as null."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import attrs
import pytest
from _support import SPEC_EXTRA, SPEC_REQUEST, SPEC_REQUEST_BODY

from novita_async import (
    SAMPLERS,
    UPSCALERS,
    AwsS3Storage,
    CustomStorage,
    Embedding,
    EnterprisePlan,
    Extra,
    HiresFix,
    InvalidRequestError,
    Lora,
    NovitaError,
    Refiner,
    Txt2ImgRequest,
    Webhook,
    WebhookTestMode,
)
from novita_async._convert import request_body, unstructure_request
from novita_async._models import CLIP_SKIP_RANGE

BASE: dict[str, Any] = {"model_name": "sd_xl_base_1.0.safetensors", "prompt": "a cute dog"}


def req(**overrides: Any) -> Txt2ImgRequest:
    return Txt2ImgRequest(**{**BASE, **overrides})


# --------------------------------------------------------------------------- exact JSON


def test_minimal_request_json_has_required_fields_only() -> None:
    body = request_body(req(), None)
    assert body == {
        "request": {
            "model_name": "sd_xl_base_1.0.safetensors",
            "prompt": "a cute dog",
            "width": 512,
            "height": 512,
            "image_num": 1,
            "steps": 20,
            "guidance_scale": 7.5,
            "sampler_name": "Euler a",
        }
    }
    assert "extra" not in body
    optional = {
        "negative_prompt",
        "sd_vae",
        "seed",
        "clip_skip",
        "loras",
        "embeddings",
        "hires_fix",
        "refiner",
        "restore_faces",
        "enable_transparent_background",
    }
    assert optional.isdisjoint(body["request"])  # absent, not null
    assert "null" not in json.dumps(body)


def test_every_request_field_round_trips_to_exact_json() -> None:
    request = Txt2ImgRequest(
        model_name="sd_xl_base_1.0.safetensors",
        prompt="a cute dog",
        negative_prompt="nsfw, bottle,bad face",
        width=1024,
        height=768,
        image_num=4,
        steps=30,
        guidance_scale=7,
        sampler_name="DPM++ 2M Karras",
        sd_vae="sdxl_vae.safetensors",
        seed=123,
        clip_skip=2,
        loras=[Lora(model_name="add_detail_44319", strength=0.7)],
        embeddings=[Embedding(model_name="badhandv4_16755")],
        hires_fix=HiresFix(target_width=2048, target_height=1536, strength=0.5, upscaler="Latent"),
        refiner=Refiner(switch_at=0.8),
        restore_faces=True,
        enable_transparent_background=False,
    )
    assert unstructure_request(request) == {
        "model_name": "sd_xl_base_1.0.safetensors",
        "prompt": "a cute dog",
        "negative_prompt": "nsfw, bottle,bad face",
        "width": 1024,
        "height": 768,
        "image_num": 4,
        "steps": 30,
        "guidance_scale": 7,
        "sampler_name": "DPM++ 2M Karras",
        "sd_vae": "sdxl_vae.safetensors",
        "seed": 123,
        "clip_skip": 2,
        "loras": [{"model_name": "add_detail_44319", "strength": 0.7}],
        "embeddings": [{"model_name": "badhandv4_16755"}],
        "hires_fix": {
            "target_width": 2048,
            "target_height": 1536,
            "strength": 0.5,
            "upscaler": "Latent",
        },
        "refiner": {"switch_at": 0.8},
        "restore_faces": True,
        "enable_transparent_background": False,
    }
    assert {f.name for f in attrs.fields(Txt2ImgRequest)} == set(unstructure_request(request))


def test_every_extra_field_round_trips_to_exact_json() -> None:
    extra = Extra(
        response_image_type="png",
        enable_nsfw_detection=True,
        nsfw_detection_level=2,
        webhook=Webhook(
            url="https://example.com/hook",
            test_mode=WebhookTestMode(enabled=True, return_task_status="TASK_STATUS_FAILED"),
        ),
        custom_storage=CustomStorage(
            aws_s3=AwsS3Storage(
                region="us-east-1", bucket="b", path="/out", save_to_path_directly=True
            )
        ),
        enterprise_plan=EnterprisePlan(enabled=True),
        additional={"future_flag": 1},
    )
    assert unstructure_request(extra) == {
        "response_image_type": "png",
        "enable_nsfw_detection": True,
        "nsfw_detection_level": 2,
        "webhook": {
            "url": "https://example.com/hook",
            "test_mode": {"enabled": True, "return_task_status": "TASK_STATUS_FAILED"},
        },
        "custom_storage": {
            "aws_s3": {
                "region": "us-east-1",
                "bucket": "b",
                "path": "/out",
                "save_to_path_directly": True,
            }
        },
        "enterprise_plan": {"enabled": True},
        "future_flag": 1,
    }


def test_unset_nested_optionals_are_absent() -> None:
    extra = Extra(
        webhook=Webhook(url="https://example.com/hook"),
        custom_storage=CustomStorage(aws_s3=AwsS3Storage(region="r", bucket="b", path="p")),
        enterprise_plan=EnterprisePlan(),
    )
    data = unstructure_request(extra)
    assert data == {
        "webhook": {"url": "https://example.com/hook"},
        "custom_storage": {"aws_s3": {"region": "r", "bucket": "b", "path": "p"}},
        "enterprise_plan": {"enabled": False},  # False is a value, not "unset"
    }
    assert "test_mode" not in data["webhook"]
    assert "save_to_path_directly" not in data["custom_storage"]["aws_s3"]
    assert "response_image_type" not in data
    hires = unstructure_request(
        req(hires_fix=HiresFix(target_width=1024, target_height=1024, strength=0.5))
    )
    assert "upscaler" not in hires["hires_fix"]


def test_empty_extra_sends_no_extra_key() -> None:
    assert "extra" not in request_body(req(), Extra())
    assert request_body(req(), Extra(response_image_type="jpeg"))["extra"] == {
        "response_image_type": "jpeg"
    }


def test_additional_none_values_are_dropped_and_typed_fields_cannot_be_shadowed() -> None:
    assert unstructure_request(Extra(additional={"x": None, "y": [1]})) == {"y": [1]}
    with pytest.raises(InvalidRequestError, match="response_image_type"):
        Extra(additional={"response_image_type": "gif"})
    with pytest.raises(InvalidRequestError):
        Extra(additional=["not", "a", "mapping"])  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError):
        Extra(additional={1: "x"})  # type: ignore[dict-item]


def test_additional_is_copied() -> None:
    source = {"k": 1}
    extra = Extra(additional=source)
    source["k"] = 2
    assert extra.additional == {"k": 1}


# The request bodies of the spec's six curl examples, rebuilt from the models.
SPEC_EXAMPLES: list[tuple[Txt2ImgRequest, Extra, dict[str, Any]]] = [
    (SPEC_REQUEST, SPEC_EXTRA, SPEC_REQUEST_BODY),  # shared: tests/_support.py
    (
        Txt2ImgRequest(
            prompt="a cute dog",
            model_name="majicmixRealistic_v6_65516.safetensors",
            negative_prompt="nsfw, bottle,bad face",
            width=512,
            height=512,
            image_num=2,
            steps=20,
            seed=123,
            clip_skip=1,
            sampler_name="Euler a",
            guidance_scale=7.5,
            loras=[
                Lora(model_name="add_detail_44319", strength=0.7),
                Lora(model_name="more_details_59655", strength=0.7),
            ],
        ),
        Extra(response_image_type="jpeg"),
        json.loads(
            """{"extra": {"response_image_type": "jpeg"}, "request": {"prompt": "a cute dog",
            "model_name": "majicmixRealistic_v6_65516.safetensors",
            "negative_prompt": "nsfw, bottle,bad face", "width": 512, "height": 512,
            "image_num": 2, "steps": 20, "seed": 123, "clip_skip": 1, "sampler_name": "Euler a",
            "guidance_scale": 7.5, "loras": [{"model_name": "add_detail_44319", "strength": 0.7},
            {"model_name": "more_details_59655", "strength": 0.7}]}}"""
        ),
    ),
    (
        Txt2ImgRequest(
            prompt="a cute dog",
            model_name="realisticVisionV51_v51VAE_94301.safetensors",
            negative_prompt="nsfw, bottle,bad face",
            width=512,
            height=512,
            image_num=2,
            steps=20,
            seed=123,
            clip_skip=1,
            sampler_name="Euler a",
            guidance_scale=7.5,
            hires_fix=HiresFix(
                target_width=1024, target_height=1024, strength=0.8, upscaler="Latent"
            ),
        ),
        Extra(response_image_type="jpeg"),
        json.loads(
            """{"extra": {"response_image_type": "jpeg"}, "request": {"prompt": "a cute dog",
            "model_name": "realisticVisionV51_v51VAE_94301.safetensors",
            "negative_prompt": "nsfw, bottle,bad face", "width": 512, "height": 512,
            "image_num": 2, "steps": 20, "seed": 123, "clip_skip": 1, "sampler_name": "Euler a",
            "guidance_scale": 7.5, "hires_fix": {"target_width": 1024, "target_height": 1024,
            "strength": 0.8, "upscaler": "Latent"}}}"""
        ),
    ),
    (
        Txt2ImgRequest(
            prompt="a cute dog",
            model_name="sd_xl_base_1.0.safetensors",
            negative_prompt="nsfw, bottle,bad face",
            width=1024,
            height=1024,
            image_num=1,
            steps=20,
            seed=-1,
            clip_skip=1,
            sampler_name="Euler a",
            guidance_scale=7.5,
        ),
        Extra(response_image_type="jpeg", enterprise_plan=EnterprisePlan(enabled=False)),
        json.loads(
            """{"extra": {"response_image_type": "jpeg", "enterprise_plan": {"enabled": false}},
            "request": {"prompt": "a cute dog", "model_name": "sd_xl_base_1.0.safetensors",
            "negative_prompt": "nsfw, bottle,bad face", "width": 1024, "height": 1024,
            "image_num": 1, "steps": 20, "seed": -1, "clip_skip": 1, "sampler_name": "Euler a",
            "guidance_scale": 7.5}}"""
        ),
    ),
    (
        Txt2ImgRequest(
            prompt="1girl",
            model_name="realisticVisionV51_v51VAE_94301.safetensors",
            negative_prompt="nsfw, bottle,bad face",
            width=512,
            height=512,
            image_num=1,
            steps=20,
            seed=-1,
            clip_skip=1,
            sampler_name="Euler a",
            guidance_scale=7.5,
            embeddings=[
                Embedding(model_name="badhandv4_16755.pt"),
                Embedding(model_name="BadDream_53202.pt"),
            ],
        ),
        Extra(response_image_type="jpeg", enterprise_plan=EnterprisePlan(enabled=False)),
        json.loads(
            """{"extra": {"response_image_type": "jpeg", "enterprise_plan": {"enabled": false}},
            "request": {"prompt": "1girl",
            "model_name": "realisticVisionV51_v51VAE_94301.safetensors",
            "negative_prompt": "nsfw, bottle,bad face", "width": 512, "height": 512,
            "image_num": 1, "steps": 20, "seed": -1, "clip_skip": 1, "sampler_name": "Euler a",
            "guidance_scale": 7.5, "embeddings": [{"model_name": "badhandv4_16755.pt"},
            {"model_name": "BadDream_53202.pt"}]}}"""
        ),
    ),
    (
        Txt2ImgRequest(
            prompt="1girl,sexy",
            model_name="dreamshaper_8_93211.safetensors",
            negative_prompt="nsfw, bottle,bad face",
            width=512,
            height=512,
            image_num=4,
            steps=20,
            seed=-1,
            clip_skip=1,
            sampler_name="Euler a",
            guidance_scale=7.5,
        ),
        Extra(response_image_type="jpeg", enable_nsfw_detection=True, nsfw_detection_level=2),
        json.loads(
            """{"extra": {"response_image_type": "jpeg", "enable_nsfw_detection": true,
            "nsfw_detection_level": 2}, "request": {"prompt": "1girl,sexy",
            "model_name": "dreamshaper_8_93211.safetensors",
            "negative_prompt": "nsfw, bottle,bad face", "width": 512, "height": 512,
            "image_num": 4, "steps": 20, "seed": -1, "clip_skip": 1, "sampler_name": "Euler a",
            "guidance_scale": 7.5}}"""
        ),
    ),
]


@pytest.mark.parametrize(("request_", "extra", "expected"), SPEC_EXAMPLES)
def test_spec_example_bodies_are_reproduced_exactly(
    request_: Txt2ImgRequest, extra: Extra, expected: dict[str, Any]
) -> None:
    body = request_body(request_, extra)
    assert body == expected
    assert json.loads(json.dumps(body)) == expected  # JSON-serializable as is


# --------------------------------------------------------------------------- ranges

# (model, field, valid values at the bounds, invalid values just outside)
NUMERIC_BOUNDS: list[tuple[str, str, list[Any], list[Any]]] = [
    ("request", "width", [128, 2048], [127, 2049]),
    ("request", "height", [128, 2048], [127, 2049]),
    ("request", "image_num", [1, 8], [0, 9]),
    ("request", "steps", [1, 100], [0, 101]),
    ("request", "guidance_scale", [1, 1.0, 30, 30.0], [0.999, 30.001, 0, 31]),
    ("request", "seed", [-1, 0, 2**32 - 1], [-2, 2**32, 2**63]),
    (
        "request",
        "clip_skip",
        list(CLIP_SKIP_RANGE),
        [CLIP_SKIP_RANGE[0] - 1, CLIP_SKIP_RANGE[1] + 1],
    ),
    ("lora", "strength", [0, 0.0, 1, 1.0], [-0.001, 1.001]),
    ("hires", "target_width", [128, 4096], [127, 4097]),
    ("hires", "target_height", [128, 4096], [127, 4097]),
    ("hires", "strength", [0, 1], [-0.01, 1.01]),
    ("refiner", "switch_at", [0, 0.5, 1], [-0.01, 1.01]),
]

INT_FIELDS = {
    ("request", "width"),
    ("request", "height"),
    ("request", "image_num"),
    ("request", "steps"),
    ("request", "seed"),
    ("request", "clip_skip"),
    ("hires", "target_width"),
    ("hires", "target_height"),
}


def build(model: str, **fields: Any) -> Any:
    if model == "request":
        return req(**fields)
    if model == "lora":
        return Lora(**{"model_name": "l", "strength": 0.5, **fields})
    if model == "hires":
        return HiresFix(**{"target_width": 1024, "target_height": 1024, "strength": 0.5, **fields})
    if model == "refiner":
        return Refiner(**{"switch_at": 0.5, **fields})
    raise AssertionError(model)


@pytest.mark.parametrize(
    ("model", "field", "value"),
    [(m, f, v) for m, f, good, _ in NUMERIC_BOUNDS for v in good],
)
def test_value_at_bound_is_accepted(model: str, field: str, value: Any) -> None:
    assert getattr(build(model, **{field: value}), field) == value


@pytest.mark.parametrize(
    ("model", "field", "value"),
    [(m, f, v) for m, f, _, bad in NUMERIC_BOUNDS for v in bad],
)
def test_value_just_outside_bound_is_rejected(model: str, field: str, value: Any) -> None:
    with pytest.raises(InvalidRequestError, match=field):
        build(model, **{field: value})


@pytest.mark.parametrize(("model", "field"), [(m, f) for m, f, _, _ in NUMERIC_BOUNDS])
@pytest.mark.parametrize("value", [True, False, "5", [1], math.nan, math.inf, -math.inf])
def test_numeric_field_rejects_bools_strings_and_non_finite(
    model: str, field: str, value: Any
) -> None:
    with pytest.raises(InvalidRequestError, match=field):
        build(model, **{field: value})


@pytest.mark.parametrize(("model", "field"), [(m, f) for m, f, _, _ in NUMERIC_BOUNDS])
@pytest.mark.parametrize("value", [10**400, -(10**400)], ids=["10**400", "-10**400"])
def test_numeric_field_rejects_ints_too_large_for_a_float(
    model: str, field: str, value: int
) -> None:
    """An int beyond float range is out of range like any other: InvalidRequestError
    (which the emulator answers with 400), not the OverflowError of ``math.isfinite``."""
    with pytest.raises(InvalidRequestError, match=f"{field} must be"):
        build(model, **{field: value})


@pytest.mark.parametrize(("model", "field"), sorted(INT_FIELDS))
def test_integer_field_rejects_floats(model: str, field: str) -> None:
    with pytest.raises(InvalidRequestError, match="integer"):
        build(model, **{field: 512.0})


@pytest.mark.parametrize(
    ("model", "field"),
    [
        ("request", "model_name"),
        ("request", "prompt"),
        ("request", "width"),
        ("request", "height"),
        ("request", "image_num"),
        ("request", "steps"),
        ("request", "guidance_scale"),
        ("request", "sampler_name"),
        ("lora", "strength"),
        ("lora", "model_name"),
        ("hires", "target_width"),
        ("hires", "strength"),
        ("refiner", "switch_at"),
    ],
)
def test_required_field_rejects_none(model: str, field: str) -> None:
    with pytest.raises(InvalidRequestError, match="required"):
        build(model, **{field: None})


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_prompt_lengths(field: str) -> None:
    assert len(getattr(req(**{field: "x"}), field)) == 1
    assert len(getattr(req(**{field: "x" * 1024}), field)) == 1024
    assert len(getattr(req(**{field: "é" * 1024}), field)) == 1024  # characters, not bytes
    for bad in ("", "x" * 1025):
        with pytest.raises(InvalidRequestError, match=field):
            req(**{field: bad})
    with pytest.raises(InvalidRequestError, match=field):
        req(**{field: b"bytes"})


@pytest.mark.parametrize("field", ["model_name", "sd_vae"])
def test_names_must_be_non_empty_strings(field: str) -> None:
    with pytest.raises(InvalidRequestError):
        req(**{field: ""})
    with pytest.raises(InvalidRequestError):
        req(**{field: 42})


def test_all_twenty_samplers_are_accepted() -> None:
    assert len(SAMPLERS) == 20
    for name in SAMPLERS:
        assert req(sampler_name=name).sampler_name == name


@pytest.mark.parametrize(
    "bad", ["DPM++ Karras", "euler a", "Restart", "DPM++ 2M SDE Karras", "", 1, ["Euler a"]]
)
def test_unknown_sampler_is_rejected(bad: Any) -> None:
    with pytest.raises(InvalidRequestError, match="sampler_name"):
        req(sampler_name=bad)


def test_upscaler_enum() -> None:
    assert {"RealESRGAN_x4plus_anime_6B", "RealESRNet_x4plus", "Latent"} == UPSCALERS
    for name in UPSCALERS:
        hires = HiresFix(target_width=1024, target_height=1024, strength=0.5, upscaler=name)
        assert hires.upscaler == name
    for bad in ("ESRGAN_4x", "R-ESRGAN 4x+", "4x-UltraSharp", 3):
        with pytest.raises(InvalidRequestError, match="upscaler"):
            HiresFix(target_width=1024, target_height=1024, strength=0.5, upscaler=bad)


@pytest.mark.parametrize("field", ["loras", "embeddings"])
def test_at_most_five_loras_and_embeddings(field: str) -> None:
    def item(i: int) -> Any:
        if field == "loras":
            return Lora(model_name=f"l{i}", strength=0.5)
        return Embedding(model_name=f"e{i}")

    five = req(**{field: [item(i) for i in range(5)]})
    assert isinstance(getattr(five, field), tuple)
    assert len(getattr(five, field)) == 5
    with pytest.raises(InvalidRequestError, match=field):
        req(**{field: [item(i) for i in range(6)]})


@pytest.mark.parametrize("field", ["loras", "embeddings"])
@pytest.mark.parametrize(
    "bad", [None, "abc", {"model_name": "x"}, [{"model_name": "x"}], [None], 5]
)
def test_lora_and_embedding_lists_reject_wrong_types(field: str, bad: Any) -> None:
    with pytest.raises(InvalidRequestError):
        req(**{field: bad})


def test_lora_and_embedding_names_required() -> None:
    with pytest.raises(InvalidRequestError):
        Lora(model_name="", strength=0.5)
    with pytest.raises(InvalidRequestError):
        Embedding(model_name="")


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("hires_fix", {"target_width": 1024}),
        ("hires_fix", Refiner(switch_at=0.5)),
        ("refiner", 0.5),
        ("refiner", {"switch_at": 0.5}),
    ],
)
def test_nested_objects_must_be_their_model(field: str, bad: Any) -> None:
    with pytest.raises(InvalidRequestError, match=field):
        req(**{field: bad})


@pytest.mark.parametrize("field", ["restore_faces", "enable_transparent_background"])
def test_flags_must_be_bool(field: str) -> None:
    assert getattr(req(**{field: True}), field) is True
    assert getattr(req(**{field: False}), field) is False
    for bad in (1, 0, "true"):
        with pytest.raises(InvalidRequestError, match=field):
            req(**{field: bad})


def test_extra_ranges() -> None:
    for kind in ("png", "webp", "jpeg"):
        assert Extra(response_image_type=kind).response_image_type == kind
    for bad_kind in ("jpg", "PNG", "gif", 1):
        with pytest.raises(InvalidRequestError, match="response_image_type"):
            Extra(response_image_type=bad_kind)  # type: ignore[arg-type]
    for level in (0, 1, 2):
        assert Extra(nsfw_detection_level=level).nsfw_detection_level == level
    for bad_level in (-1, 3, True, False, 1.0, "1"):
        with pytest.raises(InvalidRequestError, match="nsfw_detection_level"):
            Extra(nsfw_detection_level=bad_level)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="enable_nsfw_detection"):
        Extra(enable_nsfw_detection=1)  # type: ignore[arg-type]
    for field in ("webhook", "custom_storage", "enterprise_plan"):
        with pytest.raises(InvalidRequestError, match=field):
            Extra(**{field: {"enabled": True}})


def test_webhook_validation() -> None:
    assert Webhook(url="http://localhost:8000/hook").url.startswith("http://")
    for bad in ("", "ftp://example.com", "example.com/hook", None):
        with pytest.raises(InvalidRequestError, match="url"):
            Webhook(url=bad)  # type: ignore[arg-type]
    assert WebhookTestMode().return_task_status == "TASK_STATUS_SUCCEED"
    with pytest.raises(InvalidRequestError, match="return_task_status"):
        WebhookTestMode(return_task_status="SUCCEED")
    with pytest.raises(InvalidRequestError, match="enabled"):
        WebhookTestMode(enabled=None)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="test_mode"):
        Webhook(url="https://x.test", test_mode={"enabled": True})  # type: ignore[arg-type]


def test_storage_and_enterprise_validation() -> None:
    with pytest.raises(InvalidRequestError, match="aws_s3"):
        CustomStorage(aws_s3=None)  # type: ignore[arg-type]
    for field in ("region", "bucket", "path"):
        with pytest.raises(InvalidRequestError, match=field):
            AwsS3Storage(**{"region": "r", "bucket": "b", "path": "p", field: ""})
    with pytest.raises(InvalidRequestError, match="save_to_path_directly"):
        AwsS3Storage(region="r", bucket="b", path="p", save_to_path_directly="yes")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="enabled"):
        EnterprisePlan(enabled=None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- model properties


def test_invalid_request_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="width") as caught:
        req(width=0)
    assert isinstance(caught.value, NovitaError)
    assert isinstance(caught.value, InvalidRequestError)


@pytest.mark.parametrize(
    "model",
    [
        req(),
        Lora(model_name="l", strength=0.5),
        Embedding(model_name="e"),
        HiresFix(target_width=1024, target_height=1024, strength=0.5),
        Refiner(switch_at=0.5),
        Extra(),
        Webhook(url="https://x.test"),
        WebhookTestMode(),
        CustomStorage(aws_s3=AwsS3Storage(region="r", bucket="b", path="p")),
        EnterprisePlan(),
    ],
)
def test_request_models_are_frozen_slotted_keyword_only(model: Any) -> None:
    cls = type(model)
    assert "__slots__" in cls.__dict__
    assert not hasattr(model, "__dict__")
    assert all(field.kw_only for field in attrs.fields(cls))
    first = attrs.fields(cls)[0].name
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(model, first, getattr(model, first))
    hash(model)  # usable as a dict key (the batch journal relies on it)


def test_evolve_revalidates() -> None:
    with pytest.raises(InvalidRequestError, match="steps"):
        attrs.evolve(req(), steps=101)
    assert attrs.evolve(req(), steps=100).steps == 100


def test_equal_requests_are_equal_and_hash_equal() -> None:
    a = req(loras=[Lora(model_name="l", strength=0.5)])
    b = req(loras=(Lora(model_name="l", strength=0.5),))
    assert a == b
    assert hash(a) == hash(b)


def test_cost_counts_steps_megapixels_and_images() -> None:
    assert req(width=1000, height=1000, steps=20, image_num=2).cost == pytest.approx(40.0)
    with_hires = req(
        width=500,
        height=500,
        steps=10,
        hires_fix=HiresFix(target_width=1000, target_height=1000, strength=0.5),
    )
    assert with_hires.cost == pytest.approx(10 * 1.25)


# --------------------------------------------------------------------------- hostile input (#10)


@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "model_name", "sd_vae"])
def test_lone_surrogates_are_rejected_when_the_request_is_built(field: str) -> None:
    """Regression: a lone surrogate passed validation and failed (or was mangled) at send."""
    with pytest.raises(InvalidRequestError, match=rf"^{field} must be valid Unicode text"):
        req(**{field: "a cat \ud83d"})
    assert req(**{field: "a cat \U0001f408"})  # a real astral character is fine


def test_lone_surrogates_in_nested_text_fields_are_rejected() -> None:
    with pytest.raises(InvalidRequestError, match=r"^model_name must be valid Unicode"):
        Lora(model_name="\udc00", strength=0.5)
    with pytest.raises(InvalidRequestError, match=r"^url must be valid Unicode"):
        Webhook(url="https://x.test/\ud800")
    with pytest.raises(InvalidRequestError, match=r"^bucket must be valid Unicode"):
        AwsS3Storage(region="r", bucket="b\ud800", path="p")


@pytest.mark.parametrize(
    ("additional", "message"),
    [
        ({"x": math.nan}, r"additional\['x'\] must be a finite number, got nan"),
        ({"x": [1, math.inf]}, r"additional\['x'\]\[1\] must be a finite number, got inf"),
        ({"x": {"y": -math.inf}}, r"additional\['x'\]\['y'\] must be a finite number"),
        ({"x": "\ud800"}, r"additional\['x'\] must be valid Unicode text"),
        ({"\ud800": 1}, "additional keys must be valid Unicode text"),
        ({"x": {1: 2}}, r"additional\['x'\] keys must be str, got 1"),
        ({"x": {1, 2}}, r"additional\['x'\] must be JSON data, got set"),
        ({"x": b"raw"}, r"additional\['x'\] must be JSON data, got bytes"),
        ({"x": object()}, r"additional\['x'\] must be JSON data, got object"),
    ],
)
def test_additional_must_be_plain_json(additional: dict[str, Any], message: str) -> None:
    """Regression: NaN / non-JSON values in Extra.additional failed only at send time."""
    with pytest.raises(InvalidRequestError, match=f"^{message}"):
        Extra(additional=additional)


def test_additional_nesting_is_bounded() -> None:
    deep: Any = 1
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(InvalidRequestError, match="must nest at most 32 levels"):
        Extra(additional={"x": deep})
    ok: Any = 1
    for _ in range(31):
        ok = [ok]
    extra = Extra(additional={"x": ok, "n": None, "b": True, "f": 1.5, "s": "\u00e9"})
    assert json.loads(json.dumps(request_body(req(), extra), allow_nan=False))["extra"]["x"] == ok


@pytest.mark.parametrize(
    ("build_", "message"),
    [
        (lambda: req(width=99999), "width must be 128-2048, got 99999"),
        (lambda: req(guidance_scale=31.5), "guidance_scale must be 1-30, got 31.5"),
        (lambda: req(seed=2**32), "seed must be -1 to 4294967295, got 4294967296"),
        (lambda: req(seed=-2), "seed must be -1 to 4294967295, got -2"),
        (lambda: req(steps=2.0), "steps must be an integer, got 2.0"),
        (lambda: req(steps=math.nan), "steps must be an integer, got nan"),
        (lambda: req(guidance_scale=math.inf), "guidance_scale must be finite, got inf"),
        (lambda: req(prompt=""), "prompt must have 1-1024 characters, got 0"),
        (lambda: req(sampler_name="Fast"), "sampler_name must be one of "),
        (lambda: req(model_name=None), "model_name is required (got None)"),
        (lambda: req(loras="lora"), "loras must be a sequence, got 'lora'"),
        (lambda: req(embeddings=[1]), "embeddings items must be Embedding, got 1"),
        (lambda: req(loras=[Lora(model_name="l", strength=1)] * 6), "loras must have at most 5"),
        (lambda: req(restore_faces=1), "restore_faces must be a bool, got 1"),
        (lambda: req(hires_fix={}), "hires_fix must be a HiresFix, got {}"),
        (lambda: Lora(model_name="l", strength=2), "strength must be 0-1, got 2"),
        (
            lambda: HiresFix(target_width=5000, target_height=1024, strength=0.5),
            "target_width must be 128-4096, got 5000",
        ),
        (
            lambda: Extra(nsfw_detection_level=3),
            "nsfw_detection_level must be one of 0, 1, 2, got 3",
        ),
        (lambda: Extra(additional=[1]), "additional must be a mapping, got [1]"),
        (lambda: Webhook(url="ftp://x"), "url must be an http(s) URL, got 'ftp://x'"),
    ],
)
def test_messages_name_the_field_as_written(build_: Callable[[], Any], message: str) -> None:
    """Every validation message reads ``<field as passed> <what is wrong>, got <value>``."""
    with pytest.raises(InvalidRequestError) as info:
        build_()
    assert str(info.value).startswith(message), str(info.value)
