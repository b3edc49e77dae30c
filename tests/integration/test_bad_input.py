"""Bad requests get OpenAI's error JSON with the right status, and touch nothing."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.conftest import BASE_NAME, Server

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "hi"}]

# (case id, path, raw body, status, error type, param)
BAD_REQUESTS = [
    ("malformed-json", "/v1/chat/completions", b'{"model": ', 400, "invalid_request_error", None),
    ("not-an-object", "/v1/chat/completions", b"[1, 2]", 400, "invalid_request_error", None),
    (
        "missing-model",
        "/v1/chat/completions",
        {"messages": MESSAGES},
        400,
        "invalid_request_error",
        "model",
    ),
    (
        "missing-messages",
        "/v1/chat/completions",
        {"model": BASE_NAME},
        400,
        "invalid_request_error",
        "messages",
    ),
    (
        "empty-messages",
        "/v1/chat/completions",
        {"model": BASE_NAME, "messages": []},
        400,
        "invalid_request_error",
        "messages",
    ),
    (
        "missing-prompt",
        "/v1/completions",
        {"model": BASE_NAME},
        400,
        "invalid_request_error",
        "prompt",
    ),
    (
        "unknown-adapter",
        "/v1/chat/completions",
        {"model": "demo/nope", "messages": MESSAGES},
        404,
        "invalid_request_error",
        "model",
    ),
    (
        "dot-dot",
        "/v1/chat/completions",
        {"model": "../demo/alpha", "messages": MESSAGES},
        400,
        "invalid_request_error",
        "model",
    ),
    (
        "dot-dot-inside",
        "/v1/completions",
        {"model": "demo/..", "prompt": "x"},
        400,
        "invalid_request_error",
        "model",
    ),
    (
        "absolute-path",
        "/v1/chat/completions",
        {"model": "/etc/passwd", "messages": MESSAGES},
        400,
        "invalid_request_error",
        "model",
    ),
    (
        "too-many-slashes",
        "/v1/chat/completions",
        {"model": "a/b/c", "messages": MESSAGES},
        400,
        "invalid_request_error",
        "model",
    ),
    (
        "backslash",
        "/v1/chat/completions",
        {"model": "demo\\alpha", "messages": MESSAGES},
        400,
        "invalid_request_error",
        "model",
    ),
    (
        "control-char",
        "/v1/chat/completions",
        {"model": "demo/al\npha", "messages": MESSAGES},
        400,
        "invalid_request_error",
        "model",
    ),
    (
        "too-long",
        "/v1/chat/completions",
        {"model": "a" * 300, "messages": MESSAGES},
        400,
        "invalid_request_error",
        "model",
    ),
    (
        "wrong-type",
        "/v1/chat/completions",
        {"model": 42, "messages": MESSAGES},
        400,
        "invalid_request_error",
        "model",
    ),
    (
        "vllm-rejects",
        "/v1/chat/completions",
        {"model": "demo/alpha", "messages": MESSAGES, "max_tokens": -5},
        400,
        "invalid_request_error",
        None,
    ),
    ("unknown-route", "/v1/nothing", {}, 404, "invalid_request_error", None),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "error_type", "param"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_request(
    server: Server, path: str, body: object, status: int, error_type: str | None, param: str | None
) -> None:
    if isinstance(body, bytes):
        response = httpx.post(server.url + path, content=body, timeout=30)
    else:
        response = httpx.post(server.url + path, json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["message"]
    if error_type is not None:
        assert error["type"] == error_type
    if param is not None:
        assert error["param"] == param
