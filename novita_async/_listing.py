"""``GET /v3/model``: filters, and cursor pagination that follows ``next_cursor`` verbatim.

The official SDK sends ``filter.type`` (the docs spell it ``filter.types``),
prefixes cursors itself and pages by offset; here the opaque cursor Novita
returns is passed back untouched, and paging stops on an empty or absent
cursor, an empty page, or a cursor already seen (so a server bug cannot loop
forever).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import httpx

from ._convert import model as parse_model
from ._errors import InvalidRequestError, MalformedResponseError
from ._results import Model
from ._transport import Transport

__all__ = ["MAX_PAGE_SIZE", "MODEL_PATH", "ModelIterator", "iter_models", "model_params"]

MODEL_PATH = "/v3/model"
#: ``pagination.limit`` must be in (0, 100].
MAX_PAGE_SIZE = 100


@attrs.frozen(kw_only=True)
class _Page:
    models: tuple[Model, ...]
    next_cursor: str


def _parse_page(data: Any) -> _Page:
    if isinstance(data, Mapping) and "models" not in data and isinstance(data.get("data"), Mapping):
        data = data["data"]  # tolerate a v2-style {"code", "data": {...}} envelope
    if not isinstance(data, Mapping):
        raise MalformedResponseError("model list is not a JSON object", body=repr(data)[:2000])
    raw_models = data.get("models")
    if raw_models is None:
        raw_models = []
    if not isinstance(raw_models, list):
        raise MalformedResponseError("'models' is not a list", body=repr(data)[:2000])
    pagination = data.get("pagination")
    cursor = pagination.get("next_cursor") if isinstance(pagination, Mapping) else None
    return _Page(
        models=tuple(parse_model(item) for item in raw_models),
        next_cursor=cursor if isinstance(cursor, str) else "",
    )


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"{name} must be a non-empty str, got {value!r}")
    return value


def _flag(name: str, value: Any) -> str:
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be a bool, got {value!r}")
    return "true" if value else "false"


def model_params(
    *,
    visibility: str | None = None,
    types: str | Sequence[str] | None = None,
    source: str | None = None,
    is_sdxl: bool | None = None,
    is_inpainting: bool | None = None,
    query: str | None = None,
) -> list[tuple[str, str]]:
    """The ``filter.*`` query parameters (validated); unset filters are omitted.

    Several ``types`` are sent as repeated ``filter.types`` parameters.
    """
    params: list[tuple[str, str]] = []
    if visibility is not None:
        params.append(("filter.visibility", _text("visibility", visibility)))
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not names:
            raise InvalidRequestError("types must not be empty")
        params.extend(("filter.types", _text("types", name)) for name in names)
    if source is not None:
        params.append(("filter.source", _text("source", source)))
    if is_sdxl is not None:
        params.append(("filter.is_sdxl", _flag("is_sdxl", is_sdxl)))
    if is_inpainting is not None:
        params.append(("filter.is_inpainting", _flag("is_inpainting", is_inpainting)))
    if query is not None:
        params.append(("filter.query", _text("query", query)))
    return params


def iter_models(
    transport: Transport,
    *,
    visibility: str | None = None,
    types: str | Sequence[str] | None = None,
    source: str | None = None,
    is_sdxl: bool | None = None,
    is_inpainting: bool | None = None,
    query: str | None = None,
    limit: int | None = None,
    page_size: int = MAX_PAGE_SIZE,
) -> ModelIterator:
    """Validate the arguments now; return an async iterator over every matching model.

    ``limit`` caps the number of models yielded (and shrinks the last page
    requested). Breaking out of the loop early is safe.
    """
    if isinstance(page_size, bool) or not isinstance(page_size, int):
        raise InvalidRequestError(f"page_size must be an int, got {page_size!r}")
    if not 0 < page_size <= MAX_PAGE_SIZE:
        raise InvalidRequestError(f"page_size must be in [1, {MAX_PAGE_SIZE}], got {page_size}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise InvalidRequestError(f"limit must be an int >= 0 or None, got {limit!r}")
    filters = model_params(
        visibility=visibility,
        types=types,
        source=source,
        is_sdxl=is_sdxl,
        is_inpainting=is_inpainting,
        query=query,
    )
    return ModelIterator(transport, filters, limit=limit, page_size=page_size)


class ModelIterator:
    """Async iterator over the pages of ``GET /v3/model``.

    A plain object, not an async generator: it holds nothing open between
    pages, so leaving an ``async for`` early needs no cleanup (and triggers no
    "garbage collected before it had been exhausted" warnings). Not meant to be
    iterated by two tasks at once.
    """

    def __init__(
        self,
        transport: Transport,
        filters: list[tuple[str, str]],
        *,
        limit: int | None,
        page_size: int,
    ) -> None:
        self._transport = transport
        self._filters = filters
        self._remaining = limit
        self._page_size = page_size
        self._buffer: deque[Model] = deque()
        self._cursor = ""
        self._seen: set[str] = set()
        self._done = limit == 0

    def __aiter__(self) -> ModelIterator:
        return self

    async def __anext__(self) -> Model:
        while not self._buffer:
            if self._done:
                raise StopAsyncIteration
            await self._next_page()
        if self._remaining is not None:
            self._remaining -= 1
            if self._remaining <= 0:
                self._done = True
        return self._buffer.popleft()

    async def aclose(self) -> None:
        """Stop early (nothing to release; for symmetry with async generators)."""
        self._done = True
        self._buffer.clear()

    async def _next_page(self) -> None:
        size = self._page_size
        if self._remaining is not None:
            size = min(size, self._remaining)
        params = [*self._filters, ("pagination.limit", str(size))]
        if self._cursor:
            params.append(("pagination.cursor", self._cursor))
        page = await self._transport.get(
            MODEL_PATH, params=httpx.QueryParams(tuple(params)), parse=_parse_page
        )
        models = page.models if self._remaining is None else page.models[: self._remaining]
        self._buffer.extend(models)
        cursor = page.next_cursor
        if not page.models or not cursor or cursor in self._seen:
            self._done = True
        self._seen.add(cursor)
        self._cursor = cursor
