"""The `model` field between client and backend: version id out, the client's name back."""

from __future__ import annotations

import asyncio
import json

from loraplex.router.model_rewrite import rename_model, rename_model_stream, request_with_model

VID = "lpx-" + "ab" * 32


def test_request_gets_the_version_id_and_keeps_everything_else():
    body = json.dumps({"model": "acme/bot@stable", "prompt": "héllo", "max_tokens": 3}).encode()
    assert json.loads(request_with_model(body, VID, "acme/bot@stable")) == {
        "model": VID,
        "prompt": "héllo",
        "max_tokens": 3,
    }
    assert request_with_model(body, "demo/alpha", "demo/alpha") is body  # local: untouched


def test_response_gets_the_clients_name_back():
    content = json.dumps({"model": VID, "choices": [{"text": "x"}]}, separators=(",", ":"))
    renamed = json.loads(rename_model(content.encode(), VID, "acme/bot@stable"))
    assert renamed["model"] == "acme/bot@stable"


def test_stream_is_rewritten_even_when_the_id_is_split_across_chunks():
    events = (
        b"".join(
            b"data: " + json.dumps({"model": VID, "choices": [{"text": t}]}).encode() + b"\n\n"
            for t in ("a", "b")
        )
        + b"data: [DONE]\n\n"
    )
    chunks = [events[i : i + 7] for i in range(0, len(events), 7)]  # cuts through the id

    async def collect() -> bytes:
        async def source():
            for chunk in chunks:
                yield chunk

        return b"".join([c async for c in rename_model_stream(source(), VID, "acme/bot")])

    out = asyncio.run(collect())
    assert VID.encode() not in out
    assert out == events.replace(json.dumps(VID).encode(), b'"acme/bot"')
