"""The parts of OpenAI's request bodies the router itself reads, and the limits on a body.

The router validates what it needs to route, bill and bound (`model`, the prompt or
messages being present, `stream`, `stream_options`, `n`, `max_tokens`,
`max_completion_tokens`); everything else passes through unchanged to vLLM, which
validates the rest and answers in the same error shape. Types are strict as OpenAI's API
is: `"stream": 1` or `"true"` and `"n": "2"` are 400s naming the field, so every layer
(quota guard, route) reads one typed request and none can read a field differently.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from loraplex.router.errors import APIError

MAX_MODEL_NAME_CHARS = 256
"""Longer `model` strings are a 400 before any lookup; logs never carry more than this."""
MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays/objects a request body may have (OpenAI's bodies need < 10)."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool | None = None
    continuous_usage_stats: StrictBool | None = None
    """vLLM's: usage on every chunk too (the router asks for it on every stream to bill
    cut streams, and passes it on only to clients that asked)."""


class _RoutedRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME_CHARS, strict=True)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    n: StrictInt | None = Field(None, ge=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)

    def worst_case_tokens(self) -> int | None:
        """The most completion tokens this request may generate (`n` × the max), or None
        when the body sets no maximum (then only the model's context length bounds it)."""
        limit = self.max_completion_tokens or self.max_tokens
        return None if limit is None else (self.n or 1) * limit


class ChatCompletionRequest(_RoutedRequest):
    messages: list[dict[str, Any]] = Field(min_length=1)


class CompletionRequest(_RoutedRequest):
    prompt: str | list[Any]


def load_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400: not JSON, not an object, or nested deeper
    than MAX_JSON_DEPTH (no RecursionError escapes)."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"Request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, "Request body must be a JSON object")
    # Fewer brackets than the limit cannot nest deeper than it (C-speed count); only
    # bodies with many containers are walked.
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and _depth(data) > MAX_JSON_DEPTH:
        raise _too_deep()
    return data


def parse_request(body: bytes, schema: type[_RoutedRequest]) -> _RoutedRequest:
    """Parse and validate a request body, raising a 400 APIError naming the field at fault."""
    return validate(load_json_object(body), schema)


def validate(data: dict[str, Any], schema: type[BaseModel]) -> Any:
    """`schema` validated from `data`, or a 400 naming the first field at fault."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        raise APIError(400, f"Invalid field '{field}': {first['msg']}", param=field) from None


def _too_deep() -> APIError:
    return APIError(400, f"Request body is nested deeper than {MAX_JSON_DEPTH} levels")


def _depth(data: Any) -> int:
    """Nesting depth of parsed JSON, iteratively (a recursive walk could overflow)."""
    deepest = 0
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest
