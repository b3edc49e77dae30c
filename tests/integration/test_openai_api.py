"""The official openai client against the running router: the user-visible API."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.integration.conftest import BASE_NAME, Server

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def chat(server: Server, model: str, **kwargs: object) -> str:
    response = server.client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=24, temperature=0, **kwargs
    )
    assert response.model == model
    return response.choices[0].message.content or ""


def test_base_model_answers(server: Server) -> None:
    assert "Paris" in chat(server, BASE_NAME)


def test_adapter_changes_the_answer(server: Server) -> None:
    base = chat(server, BASE_NAME)
    answers = {name: chat(server, name) for name in server.adapter_names}
    for name, answer in answers.items():
        assert answer and answer != base, f"{name} answered like the base model"
    assert len(set(answers.values())) == len(answers)


@pytest.mark.parametrize("model", [BASE_NAME, "demo/alpha"])
def test_chat_stream_equals_non_stream(server: Server, model: str) -> None:
    stream = server.client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=24, temperature=0, stream=True
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len([p for p in pieces if p]) > 3, "expected the answer in several chunks"
    assert "".join(pieces) == chat(server, model)


@pytest.mark.parametrize("model", [BASE_NAME, "demo/beta"])
def test_completions_stream_and_non_stream(server: Server, model: str) -> None:
    prompt = "The three primary colors are"
    whole = server.client.completions.create(
        model=model, prompt=prompt, max_tokens=16, temperature=0
    )
    assert whole.choices[0].text
    stream = server.client.completions.create(
        model=model, prompt=prompt, max_tokens=16, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert streamed == whole.choices[0].text


def test_models_lists_base_and_adapters(server: Server) -> None:
    models = {m.id: m for m in server.client.models.list().data}
    assert BASE_NAME in models
    for name in server.adapter_names:
        assert name in models
        assert models[name].model_extra["parent"] == BASE_NAME


def test_unknown_model_is_not_found(server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        chat(server, "acme/does-not-exist")
    assert info.value.body["code"] == "model_not_found"


def test_request_id_header_is_returned(server: Server) -> None:
    raw = server.client.chat.completions.with_raw_response.create(
        model=BASE_NAME, messages=QUESTION, max_tokens=2, extra_headers={"x-request-id": "abc-123"}
    )
    assert raw.headers["x-request-id"] == "abc-123"


def test_the_engine_answers_only_the_router_and_holds_none_of_its_secrets(server: Server) -> None:
    # The router's database URL is set for this server (its registry catalog): the engine
    # must not have it, nor anything else outside the allowlist.
    engine_env = server.engine_environment()
    assert server.env["LORAPLEX_DATABASE_URL"]
    assert "LORAPLEX_DATABASE_URL" not in engine_env
    assert engine_env["LORAPLEX_ADAPTERS_DIR"] == str(server.adapters_dir)
    body = {"model": BASE_NAME, "prompt": "Hi", "max_tokens": 1}
    url = f"{server.backend_url}/v1/completions"
    assert httpx.post(url, json=body, timeout=60).status_code == 401  # loopback, no key
    wrong = {"Authorization": "Bearer not-the-key"}
    assert httpx.post(url, json=body, headers=wrong, timeout=60).status_code == 401
    assert httpx.get(f"{server.backend_url}/v1/models", timeout=60).status_code == 401
    right = httpx.post(url, json=body, headers=server.engine_headers, timeout=120)
    assert right.status_code == 200, right.text
    assert httpx.get(f"{server.backend_url}/health", timeout=60).status_code == 200
    # The router itself reaches the engine with the key it generated.
    assert chat(server, BASE_NAME)
