"""The parts of OpenAI's request bodies the router itself reads.

The router validates only what it needs to route (`model`, the prompt or
messages being present, `stream`); everything else passes through unchanged
to vLLM, which validates the rest and answers in the same error shape.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loraplex.router.errors import APIError


class _RoutedRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    stream: bool | None = False


class ChatCompletionRequest(_RoutedRequest):
    messages: list[dict[str, Any]] = Field(min_length=1)


class CompletionRequest(_RoutedRequest):
    prompt: str | list[Any]


def parse_request(body: bytes, schema: type[_RoutedRequest]) -> _RoutedRequest:
    """Parse and validate a request body, raising a 400 APIError naming the field at fault."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"Request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, "Request body must be a JSON object")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        raise APIError(400, f"Invalid field '{field}': {first['msg']}", param=field) from None
