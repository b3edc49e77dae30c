"""`loraplex adapters eval` against a stand-in router (the real engine: tests/integration/
test_adapters_eval.py): versions side by side with their training-time scores, examples
where they differ, `--record` into the catalog and `show`, and errors that name the cause."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from loraplex.adapters.manifest import sha256_file
from tests.unit.registry_helpers import bound_url, free_port, uvicorn_in_thread
from tests.unit.test_quality_gate import env, scored_adapter  # noqa: F401 (fixture)
from tests.unit.test_registry_cli import run

TICKETS = {"refund please": "billing", "parcel lost": "shipping", "app crashes": "technical"}


@pytest.fixture
def router() -> Iterator[tuple[str, list[dict]]]:
    """v1 always answers "billing"; v2 answers right; other models are unknown (404)."""
    seen: list[dict] = []
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        seen.append(body)
        question = body["messages"][-1]["content"]
        answers = {"acme/support:v1": "billing", "acme/support:v2": TICKETS.get(question, "?")}
        if body["model"] not in answers:
            error = {"message": f"The model `{body['model']}` does not exist.", "code": 404}
            return JSONResponse({"error": error}, 404)
        message = {"role": "assistant", "content": answers[body["model"]]}
        return JSONResponse({"choices": [{"message": message}]})

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error")
    with uvicorn_in_thread(config) as server:
        assert server.started
        yield bound_url(server), seen


def held_out(folder: Path) -> Path:
    path = folder / "held_out.jsonl"
    lines = [json.dumps({"prompt": q, "completion": a}) for q, a in TICKETS.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_eval_side_by_side_record_and_show(env, capsys, router):  # noqa: F811
    url, seen = router
    data = held_out(env)
    first = scored_adapter(env, 1, {"base_few_shot_3": 0.0, "adapter": 1 / 3})
    second = scored_adapter(env, 2, {"base_few_shot_3": 0.0, "adapter": 1.0})
    manifest = json.loads((second / "manifest.json").read_text())
    # v2's training-time score was measured on this very file: the two are comparable.
    manifest["dataset"].update(eval_sha256=sha256_file(data), eval_examples=3)
    manifest["training_config"]["eval"]["max_new_tokens"] = 8
    (second / "manifest.json").write_text(json.dumps(manifest))
    for folder in (first, second):
        assert run(capsys, "publish", str(folder), "--name", "acme/support")[0] == 0

    argv = ["eval", "acme/support", "--data", str(data), "--against", "v1", "--url", url]
    code, out, err = run(capsys, *argv, "--record")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["version", "served", "training-time", "(manifest)"]
    assert lines[1].split()[:3] == ["v2", "100.0%", "(3/3)"]
    assert "100.0% (3/3, same examples)" in lines[1] and "served = training-time" in lines[1]
    assert lines[2].split()[:3] == ["v1", "33.3%", "(1/3)"]
    assert "other data: 60 examples" in lines[2]
    assert "2 of 3 examples answered differently; the first 2:" in out
    assert "'shipping' ✓" in out and "'billing' ✗" in out
    assert "recorded in the catalog (v2, v1)" in out
    # Greedy, the manifest's token budget, the chat turns as they are in the file.
    assert {(b["temperature"], b["max_tokens"]) for b in seen} == {(0, 8)}
    # Requests go out concurrently (--concurrency): their order is not the file's.
    assert [{"role": "user", "content": "refund please"}] in [b["messages"] for b in seen]
    assert "asking" in err  # the progress bar (stderr)

    code, out, _ = run(capsys, "show", "acme/support")
    assert code == 0
    assert "v2  training-time: base_few_shot_3 0.0%, adapter 100.0%\n" in out
    assert "gate: passed" in out
    assert f"served: 100.0% exact_match on held_out.jsonl (3 examples) via {url}" in out
    assert f"served: 33.3% exact_match on held_out.jsonl (3 examples) via {url}" in out


def test_eval_errors_name_the_cause(env, capsys, router, tmp_path):  # noqa: F811
    url, _ = router
    data = held_out(env)
    folder = scored_adapter(env, 1, {"base_few_shot_3": 0.0, "adapter": 1.0})
    assert run(capsys, "publish", str(folder), "--name", "acme/support")[0] == 0
    code, _, err = run(capsys, "eval", "acme/support:v7", "--data", str(data), "--url", url)
    assert code == 2 and "adapter acme/support has no version v7" in err
    code, _, err = run(capsys, "eval", "acme/other", "--data", str(data), "--url", url)
    assert code == 2 and "not in the registry" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    code, _, err = run(capsys, "eval", "acme/support", "--data", str(bad), "--url", url)
    assert code == 2 and f"{bad}:1" in err
    closed = f"http://127.0.0.1:{free_port()}"
    code, _, err = run(capsys, "eval", "acme/support", "--data", str(data), "--url", closed)
    assert code == 3 and "unreachable" in err
