"""The names other code imports from ``novita_async`` (the issues' contract)."""

from __future__ import annotations

import attrs
import pytest

import novita_async

CONTRACT = [
    "AsyncNovita",
    "Txt2ImgRequest",
    "Extra",
    "Lora",
    "Embedding",
    "HiresFix",
    "Refiner",
    "Webhook",
    "TaskResult",
    "Task",
    "TaskStatus",
    "Image",
    "NsfwDetectionResult",
    "NovitaError",
    "InvalidRequestError",
    "APIStatusError",
    "BadRequestError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "RateLimitError",
    "ServerError",
    "APIConnectionError",
    "APITimeoutError",
    "SubmissionUncertainError",
    "TaskFailedError",
    "TaskTimeoutError",
]


@pytest.mark.parametrize("name", CONTRACT)
def test_contract_name_is_exported(name: str) -> None:
    assert name in novita_async.__all__
    assert getattr(novita_async, name) is not None


def test_all_names_resolve() -> None:
    missing = [name for name in novita_async.__all__ if not hasattr(novita_async, name)]
    assert missing == []


def test_task_status_members() -> None:
    assert {s.name for s in novita_async.TaskStatus} == {
        "QUEUED",
        "PROCESSING",
        "SUCCEED",
        "FAILED",
        "UNKNOWN",
    }


@pytest.mark.parametrize(
    "cls",
    [novita_async.Txt2ImgRequest, novita_async.Extra, novita_async.TaskResult, novita_async.Image],
)
def test_models_are_frozen_slotted_kw_only(cls: type) -> None:
    assert attrs.has(cls)
    assert "__slots__" in cls.__dict__
    assert all(field.kw_only for field in attrs.fields(cls))
    with pytest.raises(TypeError):
        cls("positional")  # keyword-only


def test_error_hierarchy() -> None:
    n = novita_async
    assert issubclass(n.InvalidRequestError, n.NovitaError)
    assert issubclass(n.InvalidRequestError, ValueError)
    for cls in (
        n.BadRequestError,
        n.AuthenticationError,
        n.PermissionDeniedError,
        n.NotFoundError,
        n.RateLimitError,
        n.ServerError,
    ):
        assert issubclass(cls, n.APIStatusError)
    assert issubclass(n.APIStatusError, n.NovitaError)
    assert issubclass(n.APITimeoutError, n.APIConnectionError)
    assert issubclass(n.SubmissionUncertainError, n.NovitaError)
    assert issubclass(n.TaskTimeoutError, n.NovitaError)
    assert issubclass(n.TaskFailedError, n.NovitaError)


def test_py_typed_marker_ships() -> None:
    from importlib import resources

    assert resources.files("novita_async").joinpath("py.typed").is_file()


def test_converted_fields_keep_precise_init_types() -> None:
    """Type checkers read a converted field's ``__init__`` type from its converter: an
    ``Any`` there let ``loras=[1, 2]`` or ``additional=[1]`` pass mypy --strict."""
    from collections.abc import Iterable, Mapping
    from typing import Any, get_type_hints

    n = novita_async
    request = get_type_hints(n.Txt2ImgRequest.__init__)
    assert request["loras"] == Iterable[n.Lora]
    assert request["embeddings"] == Iterable[n.Embedding]
    assert get_type_hints(n.Extra.__init__)["additional"] == Mapping[str, Any]


def test_emulator_client_kwargs_are_asyncnovitas() -> None:
    """``emu.client(**kwargs)`` and ``server.client(**kwargs)`` take AsyncNovita's
    parameters, typed (``**kwargs: Any`` let ``emu.client(max_conections=3)`` pass
    mypy --strict): ``ClientOptions`` must list exactly those parameters."""
    import inspect

    from novita_async._client import ClientOptions
    from novita_async.testing import EmulatorServer, NovitaEmulator

    parameters = inspect.signature(novita_async.AsyncNovita).parameters
    assert list(ClientOptions.__annotations__) == list(parameters)
    for name, annotation in ClientOptions.__annotations__.items():
        text = getattr(annotation, "__forward_arg__", annotation)  # a ForwardRef on 3.11
        assert text == parameters[name].annotation, name
    for method in (NovitaEmulator.client, EmulatorServer.client):
        assert method.__annotations__["kwargs"] == "Unpack[ClientOptions]"
