"""A backend that answers instantly in vLLM's shapes, to measure the router's own overhead.

Streams (`"stream": true`) are `max_tokens` chunks of one token, with usage the way vLLM
sends it: on every chunk with `stream_options.continuous_usage_stats`, in a final chunk
with `include_usage`.

Usage: python bench/stub_backend.py PORT
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

app = FastAPI()

COMPLETION = {
    "id": "cmpl-stub",
    "object": "text_completion",
    "created": 0,
    "model": "stub",
    "choices": [{"index": 0, "text": " hello", "finish_reason": "length", "logprobs": None}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


@app.get("/health")
async def health() -> dict:
    return {}


@app.post("/v1/load_lora_adapter")
async def load_lora_adapter() -> str:
    return "Success"


@app.post("/v1/completions", response_model=None)
async def completions(request: Request) -> dict | StreamingResponse:
    body = await request.json()
    if body.get("stream"):
        return StreamingResponse(_events(body), media_type="text/event-stream")
    return COMPLETION | {"model": body["model"]}


async def _events(body: dict) -> AsyncIterator[bytes]:
    options = body.get("stream_options") or {}
    final = bool(options.get("include_usage"))
    every = final and bool(options.get("continuous_usage_stats"))
    tokens = int(body.get("max_tokens") or 16)
    head = {"id": "cmpl-stub", "object": "text_completion", "created": 0, "model": body["model"]}
    for count in range(1, tokens + 1):
        finish = "length" if count == tokens else None
        chunk = head | {"choices": [{"index": 0, "text": " hi", "finish_reason": finish}]}
        if every:
            usage = {"prompt_tokens": 1, "total_tokens": 1 + count, "completion_tokens": count}
            chunk["usage"] = usage
        yield b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
    if final:
        usage = {"prompt_tokens": 1, "total_tokens": 1 + tokens, "completion_tokens": tokens}
        chunk = head | {"choices": [], "usage": usage}
        yield b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
