"""The converter: lenient parsing of what Novita really sends, using the spec's own bodies."""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
from _support import SPEC_RESULT_JSON

from novita_async import (
    Audio,
    AudioMetadata,
    DebugInfo,
    Image,
    MalformedResponseError,
    Model,
    NsfwDetectionResult,
    ResultExtra,
    Task,
    TaskResult,
    TaskStatus,
    Video,
    _convert,
)
from novita_async._convert import (
    converter,
    decode_json,
    envelope_error,
    model,
    parse_error_body,
    submit_task_id,
    task_result,
    task_result_for,
    webhook_event,
)

# --------------------------------------------------------------------------- the spec's bodies
# The six task-result response bodies of novita-txt2img-v3.txt, verbatim.

EXAMPLE_1 = SPEC_RESULT_JSON  # shared with other tests: tests/_support.py

EXAMPLE_2 = r"""
{
    "extra": {
        "seed": "123"
    },
    "task": {
        "task_id": "6469ca5b-5929-4200-b263-241020763eb8",
        "task_type": "TXT_TO_IMG",
        "status": "TASK_STATUS_SUCCEED",
        "reason": "",
        "eta": 0,
        "progress_percent": 0
    },
    "images": [
        {
            "image_url": "https://faas-output-image.s3.ap-southeast-1.amazonaws.com/prod/6469ca5b-5929-4200-b263-241020763eb8/xxx.jpeg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIASVPYCN6LRCW3SOUV%2F20240111%2Fap-southeast-1%2Fs3%2Faws4_request&X-Amz-Date=20240111T134101Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&x-id=GetObject&X-Amz-Signature=bbe71142c83df530e1dfb6be1a26faa1d9907b24f0fc77b2aee399683c51b134",
            "image_url_ttl": "3600",
            "image_type": "jpeg"
        },
        {
            "image_url": "https://faas-output-image.s3.ap-southeast-1.amazonaws.com/prod/6469ca5b-5929-4200-b263-241020763eb8/xxx.jpeg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIASVPYCN6LRCW3SOUV%2F20240111%2Fap-southeast-1%2Fs3%2Faws4_request&X-Amz-Date=20240111T134101Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&x-id=GetObject&X-Amz-Signature=8fc609a70c35d7b12f7690443dae6e59d2550b76461e73b2fd8296ec4333e208",
            "image_url_ttl": "3600",
            "image_type": "jpeg"
        }
    ],
    "videos": []
}
"""

EXAMPLE_3 = r"""
{
    "extra": {
        "seed": "123",
        "enable_nsfw_detection": false
    },
    "task": {
        "task_id": "6469ca5b-5929-4200-b263-241020763eb8",
        "task_type": "TXT_TO_IMG",
        "status": "TASK_STATUS_SUCCEED",
        "reason": "",
        "eta": 0,
        "progress_percent": 0
    },
    "images": [
        {
            "image_url": "https://faas-output-image.s3.ap-southeast-1.amazonaws.com/prod/6469ca5b-5929-4200-b263-241020763eb8/23a98c94383e466289b4ae39a2d1fe73.jpeg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIASVPYCN6LRCW3SOUV%2F20240307%2Fap-southeast-1%2Fs3%2Faws4_request&X-Amz-Date=20240307T034029Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&x-id=GetObject&X-Amz-Signature=3f45b6214e176fc90f3c78e04bc01e5883f25a0a8122409eb00ae8ea971d1be6",
            "image_url_ttl": "3600",
            "image_type": "jpeg",
            "nsfw_detection_result": null
        },
        {
            "image_url": "https://faas-output-image.s3.ap-southeast-1.amazonaws.com/prod/6469ca5b-5929-4200-b263-241020763eb8/19146c52474445e4ae2554ad807f7f6b.jpeg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIASVPYCN6LRCW3SOUV%2F20240307%2Fap-southeast-1%2Fs3%2Faws4_request&X-Amz-Date=20240307T034029Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&x-id=GetObject&X-Amz-Signature=a69c62262cdec60dd74f2efc2fd965cb98473112ce291542930d5b7d9b37755a",
            "image_url_ttl": "3600",
            "image_type": "jpeg",
            "nsfw_detection_result": null
        }
    ],
    "videos": []
}
"""

EXAMPLE_4 = r"""
{
    "extra": {
        "seed": "3706472920",
        "enable_nsfw_detection": false
    },
    "task": {
        "task_id": "346b3562-ae4e-4849-a9fb-9318cb1a689d",
        "task_type": "TXT_TO_IMG",
        "status": "TASK_STATUS_SUCCEED",
        "reason": "",
        "eta": 0,
        "progress_percent": 0
    },
    "images": [
        {
            "image_url": "https://faas-output-image.s3.ap-southeast-1.amazonaws.com/prod/346b3562-ae4e-4849-a9fb-9318cb1a689d/5698013f545d425cbcdeae00cef8c435.jpeg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIASVPYCN6LRCW3SOUV%2F20240307%2Fap-southeast-1%2Fs3%2Faws4_request&X-Amz-Date=20240307T033747Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&x-id=GetObject&X-Amz-Signature=68f00e2800de145d5c2c9d05f957a684283fa8dce41049337b8ce59267c49cf2",
            "image_url_ttl": "3600",
            "image_type": "jpeg",
            "nsfw_detection_result": null
        }
    ],
    "videos": []
}
"""

EXAMPLE_5 = r"""
{
    "extra": {
        "seed": "767172278",
        "enable_nsfw_detection": false
    },
    "task": {
        "task_id": "22388880-1c37-4ae1-8738-2fe7f5e8af57",
        "task_type": "TXT_TO_IMG",
        "status": "TASK_STATUS_SUCCEED",
        "reason": "",
        "eta": 0,
        "progress_percent": 0
    },
    "images": [
        {
            "image_url": "https://faas-output-image.s3.ap-southeast-1.amazonaws.com/prod/6469ca5b-5929-4200-b263-241020763eb8/72768e59c4884965824347bfb400e3fd.jpeg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIASVPYCN6LRCW3SOUV%2F20240307%2Fap-southeast-1%2Fs3%2Faws4_request&X-Amz-Date=20240307T035327Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&x-id=GetObject&X-Amz-Signature=e0a44ec5fe21d9e64dc59b1b53017df737218b8c7db6f4e6d2cd46ca8e42b2ab",
            "image_url_ttl": "3600",
            "image_type": "jpeg",
            "nsfw_detection_result": null
        }
    ],
    "videos": []
}
"""

EXAMPLE_6 = r"""
{
    "extra": {
        "seed": "1998521869",
        "enable_nsfw_detection": true
    },
    "task": {
        "task_id": "0fe0f291-05c9-41a4-83bb-3365d4b54f8b",
        "task_type": "TXT_TO_IMG",
        "status": "TASK_STATUS_SUCCEED",
        "reason": "",
        "eta": 0,
        "progress_percent": 0
    },
    "images": [
        {
            "image_url": "https://faas-output-image.s3.ap-southeast-1.amazonaws.com/prod/0fe0f291-05c9-41a4-83bb-3365d4b54f8b/50dc49337e5d4ea289050198206b6a11.jpeg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIASVPYCN6LRCW3SOUV%2F20240308%2Fap-southeast-1%2Fs3%2Faws4_request&X-Amz-Date=20240308T091609Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&x-id=GetObject&X-Amz-Signature=b8cdebb0ffa90fa869843cbab9d2e348678f621bad35c4bf1f3f90637c512f59",
            "image_url_ttl": "3600",
            "image_type": "jpeg",
            "nsfw_detection_result": {
                "valid": true,
                "confidence": 93.7176
            }
        },
        {
            "image_url": "https://faas-output-image.s3.ap-southeast-1.amazonaws.com/prod/0fe0f291-05c9-41a4-83bb-3365d4b54f8b/9692d408ce65497ba2c1f5da99a72f12.jpeg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIASVPYCN6LRCW3SOUV%2F20240308%2Fap-southeast-1%2Fs3%2Faws4_request&X-Amz-Date=20240308T091609Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&x-id=GetObject&X-Amz-Signature=f213cbabdf6d411d9e414377ae2d538cd8dff692befdbe3fa0183c737aeea0c6",
            "image_url_ttl": "3600",
            "image_type": "jpeg",
            "nsfw_detection_result": {
                "valid": true,
                "confidence": 94.4329
            }
        },
        {
            "image_url": "https://faas-output-image.s3.ap-southeast-1.amazonaws.com/prod/0fe0f291-05c9-41a4-83bb-3365d4b54f8b/68336b4bd7194b9b87b53aabcfcd92cf.jpeg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIASVPYCN6LRCW3SOUV%2F20240308%2Fap-southeast-1%2Fs3%2Faws4_request&X-Amz-Date=20240308T091609Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&x-id=GetObject&X-Amz-Signature=faa315d2a0a97706486ff00d02399dc12dcd5eb08e9a538c9997bdf389137269",
            "image_url_ttl": "3600",
            "image_type": "jpeg",
            "nsfw_detection_result": {
                "valid": true,
                "confidence": 94.4224
            }
        },
        {
            "image_url": "https://faas-output-image.s3.ap-southeast-1.amazonaws.com/prod/0fe0f291-05c9-41a4-83bb-3365d4b54f8b/a8bc5e8263aa4d9389215b749e56af45.jpeg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIASVPYCN6LRCW3SOUV%2F20240308%2Fap-southeast-1%2Fs3%2Faws4_request&X-Amz-Date=20240308T091609Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&x-id=GetObject&X-Amz-Signature=4197c88e751861bbd30e8b9f1fadb67a6808f26e91b57c0ae5ed0512e05bb8ab",
            "image_url_ttl": "3600",
            "image_type": "jpeg",
            "nsfw_detection_result": {
                "valid": true,
                "confidence": 94.6823
            }
        }
    ],
    "videos": []
}
"""

SPEC_RESULTS = [EXAMPLE_1, EXAMPLE_2, EXAMPLE_3, EXAMPLE_4, EXAMPLE_5, EXAMPLE_6]
SPEC_SEEDS = [392212448, 123, 123, 3706472920, 767172278, 1998521869]
SPEC_IMAGE_COUNTS = [2, 2, 2, 1, 1, 4]

# The Task Result doc's example (D-TR): int ttl, nsfw {}, videos and audios present.
DOC_TASK_RESULT: dict[str, Any] = {
    "extra": {
        "seed": "1234",
        "enable_nsfw_detection": False,
        "debug_info": {
            "request_info": "",
            "submit_time_ms": "",
            "execute_time_ms": "",
            "complete_time_ms": "",
        },
    },
    "task": {
        "task_id": "t-doc",
        "task_type": "TXT_TO_IMG",
        "status": "TASK_STATUS_SUCCEED",
        "reason": "",
        "eta": 0,
        "progress_percent": 100,
    },
    "images": [
        {
            "image_url": "https://img.test/a.png",
            "image_url_ttl": 3600,
            "image_type": "png",
            "nsfw_detection_result": {},
        }
    ],
    "videos": [
        {"video_url": "https://img.test/v.mp4", "video_url_ttl": "3600", "video_type": "mp4"}
    ],
    "audios": [
        {
            "audio_url": "https://img.test/a.wav",
            "audio_url_ttl": "3600",
            "audio_type": "wav",
            "audio_metadata": {"text": "hello", "start_time": 0.5, "end_time": "1.25"},
        }
    ],
}


def minimal(**overrides: Any) -> dict[str, Any]:
    return {"task": {"task_id": "t1", "status": "TASK_STATUS_PROCESSING"}, **overrides}


# --------------------------------------------------------------------------- spec examples


@pytest.mark.parametrize("index", range(6))
def test_spec_result_bodies_parse(index: int) -> None:
    raw = json.loads(SPEC_RESULTS[index])
    result = task_result(raw)
    assert isinstance(result, TaskResult)
    assert result.status is TaskStatus.SUCCEED
    assert result.is_finished
    assert result.task.task_type == "TXT_TO_IMG"
    assert result.task.reason == ""
    assert result.task.eta == 0
    assert result.task.progress_percent == 0
    assert result.task_id == raw["task"]["task_id"]
    # seed is a decimal string on the wire and an int here
    assert isinstance(raw["extra"]["seed"], str)
    assert result.extra.seed == SPEC_SEEDS[index]
    assert type(result.extra.seed) is int
    assert len(result.images) == SPEC_IMAGE_COUNTS[index]
    for image, raw_image in zip(result.images, raw["images"], strict=True):
        assert image.image_url == raw_image["image_url"]
        assert raw_image["image_url_ttl"] == "3600"
        assert image.image_url_ttl == 3600
        assert image.image_type == "jpeg"
    assert result.videos == ()
    assert result.audios == ()  # absent in every spec example
    assert "audios" not in raw or raw["audios"] == []


def test_spec_example_1_debug_info() -> None:
    result = task_result(json.loads(EXAMPLE_1))
    debug = result.extra.debug_info
    assert isinstance(debug, DebugInfo)
    assert debug.request_info == {
        "model": "sd_xl_base_1.0.safetensors",
        "prompts": ["a cute dog"],
        "negative_prompts": ["nsfw, bottle,bad face"],
        "seeds": [392212448],
        "height": 384,
        "width": 512,
        "guidance_scale": 7.5,
        "num_images_per_prompt": 2,
        "num_inference_steps": 20,
        "sampler_name": "Euler a",
        "clip_skip": 1,
    }
    assert debug.submit_time_ms == 1715052533293
    assert debug.execute_time_ms == 1715052533362
    assert debug.complete_time_ms == 1715052537148
    assert result.extra.enable_nsfw_detection is False
    assert [image.nsfw_detection_result for image in result.images] == [None, None]


def test_spec_example_2_without_nsfw_key_or_enable_flag() -> None:
    result = task_result(json.loads(EXAMPLE_2))
    assert result.extra == ResultExtra(seed=123)
    assert result.extra.enable_nsfw_detection is None
    assert result.extra.debug_info is None
    assert all(image.nsfw_detection_result is None for image in result.images)


def test_spec_example_6_nsfw_results() -> None:
    result = task_result(json.loads(EXAMPLE_6))
    assert result.extra.enable_nsfw_detection is True
    assert [image.nsfw_detection_result for image in result.images] == [
        NsfwDetectionResult(valid=True, confidence=93.7176),
        NsfwDetectionResult(valid=True, confidence=94.4329),
        NsfwDetectionResult(valid=True, confidence=94.4224),
        NsfwDetectionResult(valid=True, confidence=94.6823),
    ]


def test_doc_example_with_int_ttl_empty_nsfw_videos_and_audios() -> None:
    result = task_result(DOC_TASK_RESULT)
    assert result.images == (
        Image(
            image_url="https://img.test/a.png",
            image_type="png",
            image_url_ttl=3600,
            nsfw_detection_result=None,
        ),
    )
    assert result.videos == (
        Video(video_url="https://img.test/v.mp4", video_type="mp4", video_url_ttl=3600),
    )
    assert result.audios == (
        Audio(
            audio_url="https://img.test/a.wav",
            audio_type="wav",
            audio_url_ttl=3600,
            audio_metadata=AudioMetadata(text="hello", start_time=0.5, end_time=1.25),
        ),
    )
    debug = result.extra.debug_info
    assert debug == DebugInfo(
        request_info=None, submit_time_ms=None, execute_time_ms=None, complete_time_ms=None
    )
    assert result.task.progress_percent == 100


# --------------------------------------------------------------------------- each quirk


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        ("392212448", 392212448),
        ("3706472920", 3706472920),  # > 2**31
        (" 42 ", 42),
        ("-1", -1),
        ("12.0", 12),
        (42, 42),
        (42.0, 42),
        ("", None),
        (None, None),
        ("abc", None),
        (True, None),
        ({}, None),
    ],
)
def test_seed_is_parsed_leniently(wire: Any, expected: int | None) -> None:
    result = task_result(minimal(extra={"seed": wire}))
    assert result.extra.seed == expected
    assert result.extra.seed is None or type(result.extra.seed) is int


@pytest.mark.parametrize(
    ("wire", "expected"), [("3600", 3600), (3600, 3600), ("", None), (None, None)]
)
def test_image_url_ttl_string_or_int(wire: Any, expected: int | None) -> None:
    result = task_result(minimal(images=[{"image_url": "u", "image_url_ttl": wire}]))
    assert result.images[0].image_url_ttl == expected


def test_image_url_ttl_missing_is_none() -> None:
    assert task_result(minimal(images=[{"image_url": "u"}])).images[0].image_url_ttl is None


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (None, None),
        ({}, None),
        (
            {"valid": True, "confidence": 93.7176},
            NsfwDetectionResult(valid=True, confidence=93.7176),
        ),
        ({"valid": False, "confidence": 0}, NsfwDetectionResult(valid=False, confidence=0.0)),
        ({"valid": "true", "confidence": "12.5"}, NsfwDetectionResult(valid=True, confidence=12.5)),
        ({"confidence": 50}, NsfwDetectionResult(valid=None, confidence=50.0)),
        ({"valid": True}, NsfwDetectionResult(valid=True, confidence=None)),
        ("garbage", None),
        ([], None),
    ],
)
def test_nsfw_detection_result_variants(wire: Any, expected: NsfwDetectionResult | None) -> None:
    result = task_result(minimal(images=[{"image_url": "u", "nsfw_detection_result": wire}]))
    assert result.images[0].nsfw_detection_result == expected


def test_nsfw_key_absent_is_none() -> None:
    assert task_result(minimal(images=[{"image_url": "u"}])).images[0].nsfw_detection_result is None


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        ('{"model": "m", "seeds": [1]}', {"model": "m", "seeds": [1]}),
        ("", None),
        ("   ", None),
        ("not json", None),
        ("[1, 2]", None),  # JSON, but not an object
        ('"string"', None),
        ({"already": "parsed"}, {"already": "parsed"}),
        (None, None),
        (5, None),
    ],
)
def test_request_info_json_string_is_parsed(wire: Any, expected: Any) -> None:
    result = task_result(minimal(extra={"debug_info": {"request_info": wire}}))
    assert result.extra.debug_info is not None
    assert result.extra.debug_info.request_info == expected


@pytest.mark.parametrize("field", ["submit_time_ms", "execute_time_ms", "complete_time_ms"])
@pytest.mark.parametrize(
    ("wire", "expected"), [("", None), ("1715052533293", 1715052533293), (17, 17)]
)
def test_time_ms_fields(field: str, wire: Any, expected: int | None) -> None:
    result = task_result(minimal(extra={"debug_info": {field: wire}}))
    assert result.extra.debug_info is not None
    assert getattr(result.extra.debug_info, field) == expected


@pytest.mark.parametrize("wire", ["", None, [], "x"])
def test_debug_info_not_an_object_is_none(wire: Any) -> None:
    assert task_result(minimal(extra={"debug_info": wire})).extra.debug_info is None


@pytest.mark.parametrize("wire", [None, "", [], "x", 3])
def test_extra_missing_or_not_an_object_gives_empty_extra(wire: Any) -> None:
    assert task_result(minimal(extra=wire)).extra == ResultExtra()
    assert task_result(minimal()).extra == ResultExtra()


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        ("TASK_STATUS_QUEUED", TaskStatus.QUEUED),
        ("TASK_STATUS_PROCESSING", TaskStatus.PROCESSING),
        ("TASK_STATUS_SUCCEED", TaskStatus.SUCCEED),
        ("TASK_STATUS_FAILED", TaskStatus.FAILED),
        ("TASK_STATUS_UNKNOWN", TaskStatus.UNKNOWN),
        ("SUCCEED", TaskStatus.SUCCEED),
        ("task_status_failed", TaskStatus.FAILED),
        ("TASK_STATUS_PAUSED", TaskStatus.UNKNOWN),
        ("", TaskStatus.UNKNOWN),
        (None, TaskStatus.UNKNOWN),
        (3, TaskStatus.UNKNOWN),
        ({}, TaskStatus.UNKNOWN),
    ],
)
def test_status_mapping_with_unknown_fallback(wire: Any, expected: TaskStatus) -> None:
    result = task_result({"task": {"task_id": "t", "status": wire}})
    assert result.status is expected
    assert result.is_finished is (expected in (TaskStatus.SUCCEED, TaskStatus.FAILED))


def test_missing_status_is_unknown() -> None:
    assert task_result({"task": {"task_id": "t"}}).status is TaskStatus.UNKNOWN


def test_failed_task_keeps_reason() -> None:
    result = task_result(
        {"task": {"task_id": "t", "status": "TASK_STATUS_FAILED", "reason": "NSFW detected"}}
    )
    assert result.status is TaskStatus.FAILED
    assert result.task.reason == "NSFW detected"


@pytest.mark.parametrize("key", ["images", "videos", "audios"])
@pytest.mark.parametrize("wire", ["absent", None, [], {}, "x"])
def test_missing_or_null_media_lists_are_empty(key: str, wire: Any) -> None:
    data = minimal() if wire == "absent" else minimal(**{key: wire})
    assert getattr(task_result(data), key) == ()


def test_unknown_fields_are_ignored_everywhere() -> None:
    data = {
        "brand_new_top_level": {"x": 1},
        "extra": {
            "seed": "7",
            "webhook": {"url": "https://echo.test"},
            "response_image_type": "png",
            "debug_info": {"request_info": "", "new_timing_ms": "5"},
        },
        "task": {
            "task_id": "t",
            "status": "TASK_STATUS_SUCCEED",
            "queue_position": 3,
            "eta": "12",
        },
        "images": [
            {"image_url": "u", "width": 512, "nsfw_detection_result": {"valid": True, "score": 1}}
        ],
        "videos": [{"video_url": "v", "fps": 24}],
        "audios": [{"audio_url": "a", "audio_metadata": {"text": "t", "speaker": "x"}}],
    }
    result = task_result(data)
    assert result.extra.seed == 7
    assert result.task.eta == 12.0
    assert result.images[0].nsfw_detection_result == NsfwDetectionResult(valid=True)
    assert result.audios[0].audio_metadata == AudioMetadata(text="t")
    assert result.videos[0] == Video(video_url="v")


def test_audio_without_metadata() -> None:
    result = task_result(minimal(audios=[{"audio_url": "a", "audio_metadata": None}]))
    assert result.audios == (Audio(audio_url="a"),)


def test_results_are_frozen_and_tuples() -> None:
    result = task_result(json.loads(EXAMPLE_6))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        result.task = result.task  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        result.images[0].image_url = "x"  # type: ignore[misc]
    assert isinstance(result.images, tuple)
    for cls in (TaskResult, Task, Image, NsfwDetectionResult, ResultExtra, DebugInfo, Audio):
        assert "__slots__" in cls.__dict__


def test_enveloped_task_result_is_unwrapped() -> None:
    inner = json.loads(EXAMPLE_2)
    result = task_result({"code": 0, "msg": "", "data": inner})
    assert result == task_result(inner)


def test_result_round_trips_through_the_converter() -> None:
    """The journal stores ``converter.unstructure(result)`` as JSON and reads it back."""
    for raw in [*SPEC_RESULTS, json.dumps(DOC_TASK_RESULT)]:
        result = task_result(json.loads(raw))
        stored = json.dumps(converter.unstructure(result))
        assert task_result(json.loads(stored)) == result


# --------------------------------------------------------------------------- malformed bodies


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        [1, 2],
        "text",
        42,
        {},
        {"task": None},
        {"task": "t"},
        {"task": []},
        {"task": {}},  # no task_id
        {"task": {"task_id": None}},
        {"task": {"task_id": ""}},
        {"task": {"task_id": {"id": 1}}},
        {"task": {"task_id": "t"}, "images": [None]},
        {"task": {"task_id": "t"}, "images": ["url"]},
        {"task": {"task_id": "t"}, "images": [{"image_type": "png"}]},  # no image_url
        {"task": {"task_id": "t"}, "videos": [{}]},
        {"task": {"task_id": "t"}, "audios": [7]},
    ],
)
def test_malformed_bodies_raise_malformed_response_error(body: Any) -> None:
    with pytest.raises(MalformedResponseError) as caught:
        task_result(body)
    assert isinstance(caught.value.body, str)


def test_structure_wraps_every_failure() -> None:
    with pytest.raises(MalformedResponseError, match="Model"):
        _convert.structure({"name": "x"}, Model)  # no id
    with pytest.raises(MalformedResponseError):
        _convert.structure({"id": "not a number"}, Model)
    with pytest.raises(MalformedResponseError):
        _convert.structure([], TaskResult)
    deep: Any = {"task_id": "t"}
    with pytest.raises(MalformedResponseError) as caught:
        _convert.structure({"task": deep, "images": [{"image_url": {"nested": [1]}}]}, TaskResult)
    assert caught.value.__cause__ is not None


def test_the_shared_converter_itself_reads_novitas_odd_values() -> None:
    """There is one converter, and it is the one carrying the lenient hooks: the journal
    stores and re-reads results with ``converter`` directly, so a second, hooked converter
    behind ``task_result`` would leave the journal reading with plain cattrs rules."""
    wire: dict[str, Any] = {
        "task": {"task_id": "t", "status": "processing", "eta": "", "reason": None},
        "extra": {"seed": "", "debug_info": {"request_info": '{"seeds": [7]}'}},
        "images": [{"image_url": "u", "image_url_ttl": "3600", "nsfw_detection_result": {}}],
    }
    direct = converter.structure(wire, TaskResult)
    assert direct == task_result(wire)
    assert direct.status is TaskStatus.PROCESSING  # bare name, lower case
    assert (direct.task.eta, direct.task.reason, direct.extra.seed) == (None, "", None)
    assert direct.extra.debug_info is not None
    assert direct.extra.debug_info.request_info == {"seeds": [7]}  # a JSON string, parsed
    assert direct.images[0].nsfw_detection_result is None  # {} means none
    assert converter.structure({"task": {"task_id": "t", "status": 3}}, TaskResult).status is (
        TaskStatus.UNKNOWN
    )


# --------------------------------------------------------------------------- submit responses


def test_submit_plain_shape() -> None:
    assert submit_task_id({"task_id": "f10333f2-2dd7-4f56-a177-e3c02a774d9a"}) == (
        "f10333f2-2dd7-4f56-a177-e3c02a774d9a"
    )


def test_submit_envelope_shape_from_spec_example_6() -> None:
    body = {"code": 0, "msg": "", "data": {"task_id": "0fe0f291-05c9-41a4-83bb-3365d4b54f8b"}}
    assert envelope_error(body) is None
    assert submit_task_id(body) == "0fe0f291-05c9-41a4-83bb-3365d4b54f8b"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"task_id": ""},
        {"task_id": None},
        {"task_id": 5},
        {"data": {}},
        {"data": "x"},
        [],
        None,
        "id",
    ],
)
def test_submit_without_task_id_is_malformed(body: Any) -> None:
    with pytest.raises(MalformedResponseError):
        submit_task_id(body)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"code": 0, "msg": "", "data": {"task_id": "t"}}, None),
        ({"code": 200, "data": {}}, None),
        ({"code": 6, "msg": "param range error"}, (6, "param range error")),
        ({"code": "7", "message": "balance"}, (7, "balance")),
        ({"code": 400, "reason": "INVALID_REQUEST_BODY", "message": "bad"}, (400, "bad")),
        ({"code": -1}, (-1, "")),
        ({"code": 5, "task_id": "t"}, None),  # carries an answer anyway
        ({"code": None}, None),
        ({"task_id": "t"}, None),
        ([], None),
    ],
)
def test_envelope_error_detection(body: Any, expected: tuple[int, str] | None) -> None:
    assert envelope_error(body) == expected


# --------------------------------------------------------------------------- other bodies


def test_parse_error_body() -> None:
    text = json.dumps(
        {
            "code": 400,
            "reason": "INVALID_REQUEST_BODY",
            "message": "model features function calling not support",
            "metadata": {"field": "steps"},
        }
    )
    assert parse_error_body(text) == (
        "INVALID_REQUEST_BODY",
        "model features function calling not support",
        {"field": "steps"},
    )
    assert parse_error_body("") == ("", "", {})
    assert parse_error_body("<html>Bad Gateway</html>") == ("", "<html>Bad Gateway</html>", {})
    assert parse_error_body('{"msg": "old style", "metadata": []}') == ("", "old style", {})
    assert parse_error_body("[1]") == ("", "[1]", {})


def test_webhook_event_payload_is_a_task_result() -> None:
    event = webhook_event({"event_type": "ASYNC_TASK_RESULT", "payload": json.loads(EXAMPLE_6)})
    assert event.event_type == "ASYNC_TASK_RESULT"
    assert event.payload is not None
    assert event.payload.extra.seed == 1998521869
    other = webhook_event({"event_type": "SOMETHING_ELSE", "payload": {"x": 1}})
    assert other.payload is None
    with pytest.raises(MalformedResponseError):
        webhook_event([])
    with pytest.raises(MalformedResponseError):
        webhook_event({"event_type": "ASYNC_TASK_RESULT", "payload": None})


def test_model_listing_entry() -> None:
    parsed = model(
        {
            "id": 55199,
            "name": "Detail Tweaker",
            "hash_sha256": "abcdef0123",
            "sd_name": "add_detail_44319.safetensors",
            "type": {"name": "locon", "display_name": "LyCORIS"},
            "categories": ["detail"],
            "status": 1,
            "download_url": "https://dl.test/x",
            "download_url_ttl": "2592000",
            "tags": ["tool"],
            "cover_url": "https://c.test/x.png",
            "source": "civitai",
            "base_model": "SD 1.5",
            "base_model_type": "Standard",
            "sd_name_in_api": "add_detail_44319",
            "is_sdxl": False,
            "unknown": {"x": 1},
        }
    )
    assert parsed.id == 55199
    assert parsed.type.name == "locon"
    assert parsed.download_url_ttl == 2592000
    assert parsed.categories == ("detail",)
    assert parsed.is_available
    assert model({"id": "7", "type": "lora"}).type.name == "lora"


@pytest.mark.parametrize(("wire", "expected"), [(None, ""), ("", ""), ("NSFW", "NSFW"), (5, "5")])
def test_string_fields_accept_null_and_scalars(wire: Any, expected: str) -> None:
    result = task_result({"task": {"task_id": "t", "reason": wire, "task_type": wire}})
    assert result.task.reason == expected
    assert result.task.task_type == expected


# --------------------------------------------------------------------------- hostile answers


def nested(depth: int) -> list[Any]:
    """``[[[…]]]`` ``depth`` levels deep, built without recursion."""
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


DEEP_TEXT = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("content", [DEEP_TEXT, DEEP_TEXT.encode(), b"{", b"\xff\xfe", ""])
def test_decode_json_raises_only_malformed_response(content: str | bytes) -> None:
    with pytest.raises(MalformedResponseError, match="task-result body is") as info:
        decode_json(content, what="task-result")
    assert len(info.value.body) <= 2000


def test_decode_json_returns_the_document() -> None:
    assert decode_json(b'{"task_id": "t"}') == {"task_id": "t"}


def test_deeply_nested_answers_are_malformed_not_recursion_errors() -> None:
    """Regression: a deeply nested answer escaped as a raw RecursionError."""
    deep = nested(100_000)
    with pytest.raises(MalformedResponseError) as info:
        task_result({"task": {"task_id": deep}})
    assert "too deeply" in info.value.body
    with pytest.raises(MalformedResponseError):
        task_result(deep)
    with pytest.raises(MalformedResponseError):
        model({"id": deep})
    with pytest.raises(MalformedResponseError):
        submit_task_id({"task_id": deep})
    with pytest.raises(MalformedResponseError):
        webhook_event({"event_type": "ASYNC_TASK_RESULT", "payload": {"task": deep}})
    reason, message, metadata = parse_error_body(DEEP_TEXT)
    assert (reason, len(message), metadata) == ("", 500, {})
    _, _, metadata = parse_error_body(json.dumps({"metadata": {"a": nested(500)}}))
    assert metadata == {}


def test_deep_request_info_is_dropped_and_the_result_dumps_again() -> None:
    """``request_info`` too deep to dump again (the journal stores results as JSON) is None."""
    as_text = minimal(extra={"debug_info": {"request_info": DEEP_TEXT}})
    as_object = minimal(extra={"debug_info": {"request_info": {"x": nested(900)}}})
    for body in (as_text, as_object):
        result = task_result(body)
        assert result.extra.debug_info is not None
        assert result.extra.debug_info.request_info is None
        json.dumps(converter.unstructure(result))
    shallow = minimal(extra={"debug_info": {"request_info": {"x": nested(10)}}})
    info = task_result(shallow).extra.debug_info
    assert info is not None
    assert info.request_info == {"x": nested(10)}


def test_task_result_for_checks_the_task_id() -> None:
    """Regression (issue #10): an answer for another task resolved the wait for T1."""
    body = minimal()
    body["task"]["task_id"] = "OTHER"
    with pytest.raises(MalformedResponseError, match="'OTHER', not the task asked for"):
        task_result_for(body, "T1")
    body["task"]["task_id"] = "T1"
    assert task_result_for(body, "T1") == task_result(body)
    assert task_result_for({"code": 0, "data": body}, "T1").task_id == "T1"  # v2 envelope


@pytest.mark.parametrize("missing", [None, "", "absent"])
def test_task_result_for_fills_in_a_missing_task_id(missing: str | None) -> None:
    body = minimal()
    if missing == "absent":
        del body["task"]["task_id"]
    else:
        body["task"]["task_id"] = missing
    result = task_result_for(body, "T1")
    assert result.task_id == "T1"
    assert result.status is TaskStatus.PROCESSING
    with pytest.raises(MalformedResponseError):
        task_result(body)  # without the asked id there is nothing to fill in


@pytest.mark.parametrize("body", [None, [], {"task": None}, {"images": []}, "text"])
def test_task_result_for_rejects_bodies_without_a_task(body: Any) -> None:
    with pytest.raises(MalformedResponseError):
        task_result_for(body, "T1")
