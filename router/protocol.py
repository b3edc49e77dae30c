"""OpenAI's request bodies as the router reads them, and the limits on a body.

The completion models carry OpenAI's fields and vLLM's sampling extras, typed, so one
parse checks them and `/openapi.json` documents them (router/openapi.py); fields they do
not name pass through unchanged to vLLM, which validates them and answers in the same
error shape. Types are strict as OpenAI's API is: `"stream": 1` or `"true"`, `"n": "2"`,
`"temperature": "0.5"` are 400s naming the field, so every layer (quota guard, route)
reads one typed request and none can read a field differently.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError
from typing_extensions import TypedDict

from loraplex.router.errors import APIError

MAX_MODEL_NAME_CHARS = 256
"""Longer `model` strings are a 400 before any lookup; logs never carry more than this."""
MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays/objects a request body may have (OpenAI's bodies need < 10)."""


def _integral(value: Any) -> Any:
    """JSON has one number type: `16.0` is the integer 16 (JSON Schema says so, and vLLM
    takes it). `16.5`, `"16"` and `true` stay errors (strict validation after this)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Integer = Annotated[int, BeforeValidator(_integral)]
"""An integer field: strict, but an integral JSON number such as `16.0` counts."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool | None = None
    continuous_usage_stats: StrictBool | None = None
    """vLLM's: usage on every chunk too (the router asks for it on every stream to bill
    cut streams, and passes it on only to clients that asked)."""


class _RoutedRequest(BaseModel):
    # Strict types as OpenAI's API (a JSON integer is still a valid float); unknown fields
    # pass through to vLLM unchanged. Field docstrings are the OpenAPI descriptions.
    model_config = ConfigDict(extra="allow", strict=True, use_attribute_docstrings=True)

    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME_CHARS)
    """The base model's name, or an adapter: `tenant/name`, `tenant/name@alias`,
    `tenant/name:vN`, or a local adapter folder's name."""
    stream: bool | None = False
    """Answer as server-sent events (`text/event-stream`), ending with `data: [DONE]`."""
    stream_options: StreamOptions | None = None
    n: Integer | None = Field(None, ge=1)
    """How many choices to generate (each counts against the token quota)."""
    max_tokens: Integer | None = Field(None, ge=1)
    max_completion_tokens: Integer | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    stop: str | list[str] | None = None
    seed: Integer | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's sampling parameters beyond OpenAI's.
    top_k: Integer | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: Integer | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[Integer] | None = None
    skip_special_tokens: bool | None = None

    def worst_case_tokens(self) -> int | None:
        """The most completion tokens this request may generate (`n` × the max), or None
        when the body sets no maximum (then only the model's context length bounds it)."""
        limit = self.max_completion_tokens or self.max_tokens
        return None if limit is None else (self.n or 1) * limit


class ChatMessage(TypedDict, total=False):
    """One chat message. A TypedDict, not a model: messages stay the plain dicts they were
    sent as, and a request validates faster (39 µs against 50 µs for a one-message request
    with a model per message, measured here)."""

    __pydantic_config__ = ConfigDict(extra="allow", strict=True)  # type: ignore[misc]

    role: str
    """`system`, `user`, `assistant`, `tool` (or `developer`). Not required: vLLM also
    takes harmony messages (gpt-oss), which name an `author` instead."""
    content: str | list[dict[str, Any] | str] | None
    """Text, or a list of content parts (`{"type": "text", "text": ...}`; vLLM also takes
    a plain string as a part)."""
    name: str


class ChatCompletionRequest(_RoutedRequest):
    """OpenAI's chat completion request (the fields vLLM accepts; others pass through)."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: Integer | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_RoutedRequest):
    """OpenAI's (legacy) completion request (the fields vLLM accepts; others pass through)."""

    prompt: str | list[str] | list[Integer] | list[list[Integer]]
    """Text, texts, token ids, or lists of token ids."""
    echo: bool | None = None
    logprobs: Integer | None = None
    suffix: str | None = None


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
        field = ".".join(str(part) for part in first["loc"] if not _union_tag(part)) or None
        raise APIError(400, f"Invalid field '{field}': {first['msg']}", param=field) from None


def _union_tag(part: int | str) -> bool:
    """Pydantic names the member of a union that failed in `loc` (`stop.str`,
    `prompt.list[int]`); the client's field is the path without it."""
    return isinstance(part, str) and ("[" in part or part in _UNION_MEMBERS)


_UNION_MEMBERS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


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
