"""A backend that answers instantly in vLLM's shapes, to measure the router's own overhead.

Usage: python bench/stub_backend.py PORT
"""

from __future__ import annotations

import sys

import uvicorn
from fastapi import FastAPI, Request

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


@app.post("/v1/completions")
async def completions(request: Request) -> dict:
    body = await request.json()
    return COMPLETION | {"model": body["model"]}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
