"""vLLM's own OpenAPI schema, fuzzed through the router to the real engine (issue 12,
item 12): every request vLLM's schema allows for the two completion endpoints, sent to
`loraplex serve` (SmolLM2 on the CPU engine, demo adapters), answers no 5xx. The
router's typed request models must not turn what vLLM accepts into a server error, and
nothing vLLM accepts may break the router's quota, routing or stream relay.
"""

from __future__ import annotations

import copy
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import BASE_NAME, Server
from tests.schemathesis_run import run_schemathesis

pytestmark = pytest.mark.integration

COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")
# Bounds on what one request may ask of the CPU engine: unbounded, a single fuzzed
# request asks for the whole context (minutes of generation on 2 cores).
BOUNDS = {
    "max_tokens": {"type": "integer", "minimum": 1, "maximum": 4},
    "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": 4},
    "min_tokens": {"type": "integer", "minimum": 0, "maximum": 4},
    "n": {"type": "integer", "minimum": 1, "maximum": 2},
    "logprobs": {"type": "integer", "minimum": 0, "maximum": 5},
    "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 5},
    "prompt_logprobs": {"type": "integer", "minimum": 0, "maximum": 5},
    # Ranges vLLM enforces but its schema does not state: without them nearly every
    # generated request is the engine's 400 and none is served.
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": 1, "maximum": 50},
    "min_p": {"type": "number", "minimum": 0, "maximum": 1},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "repetition_penalty": {"type": "number", "exclusiveMinimum": 0, "maximum": 2},
}


def completion_schema(vllm_schema: dict, models: list[str]) -> dict:
    """vLLM's schema for the two completion endpoints, `model` one of the served names
    (random names end at the router's 404 before the engine), the bounds above, and the
    body fields the router requires."""
    schema = copy.deepcopy(vllm_schema)
    schema["paths"] = {path: {"post": schema["paths"][path]["post"]} for path in COMPLETION_PATHS}
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        request = schema["components"]["schemas"][name]
        properties = request["properties"]
        properties["model"] = {"type": "string", "enum": models}
        for field, bound in BOUNDS.items():
            if field in properties and not (field == "logprobs" and name.startswith("Chat")):
                properties[field] = bound
        # What the router requires of a body that vLLM's schema leaves optional.
        body_field = "messages" if name.startswith("Chat") else "prompt"
        request["required"] = sorted(
            {*request.get("required", []), "model", "max_tokens", body_field}
        )
        if body_field == "messages":
            properties["messages"]["minItems"] = 1
    return schema


def test_vllm_schema_through_the_router_has_no_server_errors(
    server: Server, tmp_path: Path
) -> None:
    vllm_schema = httpx.get(
        f"{server.backend_url}/openapi.json", headers=server.engine_headers, timeout=30
    ).json()
    assert set(COMPLETION_PATHS) <= set(vllm_schema["paths"])
    # The base model and the demo adapters: other tests of the session leave registry
    # adapters behind whose blobs they corrupted on purpose (a 500 adapter_corrupt there is
    # the documented answer, not a fault of the request).
    served = {card["id"] for card in httpx.get(f"{server.url}/v1/models").json()["data"]}
    models = [name for name in (BASE_NAME, *server.adapter_names) if name in served]
    assert len(models) == 1 + len(server.adapter_names), served
    result = run_schemathesis(
        completion_schema(vllm_schema, models),
        server.url,
        tmp_path,
        checks=("not_a_server_error",),
        max_examples=40,
        phases="examples,fuzzing",
        # Schema-valid bodies: malformed ones end at the router's own 400 (the router-schema
        # fuzz, tests/unit/test_openapi_fuzz.py, sends those).
        mode="positive",
        max_time_s=90,
    )
    print(f"\nvLLM schema through the router: {result.summary()}\n{result.common_errors()}")
    assert result.returncode == 0, result.output[-6000:]
    assert result.server_errors == 0
    # Generated requests reached the engine and were served, not only refused.
    assert result.statuses[200] > 0, result.common_errors()
