"""The registry on the real engine: 64 published adapters served concurrently through 4
engine slots (and 16 backend registrations), each answer equal to that adapter's answer
alone; publishing v2 serves v2 on the next request; rollback serves v1 again."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.adapters.blob_store import open_blob_store
from loraplex.adapters.catalog import Catalog
from loraplex.adapters.publish import PublishChecks, publish_adapter
from loraplex.adapters.refs import parse_registry_name
from loraplex.cli_registry import served_base
from loraplex.settings import ServeSettings
from loraplex.training.demo_adapters import DemoAdapterSpec, build_demo_adapter
from tests.integration.conftest import BASE_NAME, Server

pytestmark = pytest.mark.integration

FLEET = 64
RANK, STRENGTH = 8, 0.4  # the demo adapters' recipe: decisive changes, fluent text
PROMPT = "The capital of France is"


@dataclass
class Fleet:
    names: list[str]
    sources: dict[str, Path]
    """Unpublished copies kept for the hot-swap test (v1/v2 contents)."""
    solo: dict[str, str]


def complete(server: Server, model: str) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=600)


def answer(server: Server, model: str) -> str:
    response = complete(server, model)
    assert response.status_code == 200, f"{model}: {response.text}"
    assert response.json()["model"] == model  # the client's name, not the version id
    return response.json()["choices"][0]["text"]


def seeded_variant(template: Path, out: Path, seed: int) -> Path:
    """Another adapter with the template's shapes and config, weights drawn from `seed`
    exactly as training/demo_adapters.py draws them (no model load: milliseconds)."""
    tensors = load_file(str(template / "adapter_model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name in sorted(tensors):
        shape = tensors[name].shape
        if "lora_A" in name:
            weights[name] = torch.randn(shape, generator=generator) / shape[1] ** 0.5
        else:
            weights[name] = torch.randn(shape, generator=generator) * STRENGTH / RANK**0.5
    out.mkdir(parents=True)
    save_file(weights, str(out / "adapter_model.safetensors"))
    shutil.copy(template / "adapter_config.json", out / "adapter_config.json")
    return out


@pytest.fixture(scope="module")
def fleet(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    work = tmp_path_factory.mktemp("fleet")
    template = build_demo_adapter(
        server.model_dir, DemoAdapterSpec("fleet/template", RANK, 1000, STRENGTH), work / "t"
    )
    catalog = Catalog.open(server.env["LORAPLEX_DATABASE_URL"])
    store = open_blob_store(server.env["LORAPLEX_REGISTRY_STORE"])
    base, modules = served_base(ServeSettings(base_model=str(server.model_dir)))
    checks = PublishChecks(16, 1 << 30, served_base=base, known_modules=modules)
    names = []
    for i in range(FLEET):
        name = f"fleet{i % 4}/adapter-{i}"  # four tenants
        source = seeded_variant(template, work / f"a{i}", seed=i + 1)
        publish_adapter(
            source, parse_registry_name(name), catalog=catalog, store=store, checks=checks
        )
        shutil.rmtree(source)
        names.append(name)
    sources = {
        key: seeded_variant(template, work / key, seed=seed)
        for key, seed in (("v1", 5001), ("v2", 5002))
    }
    solo = {name: answer(server, name) for name in [BASE_NAME, *names]}
    return Fleet(names, sources, solo)


def test_fleet_adapters_change_the_answer(fleet: Fleet):
    answers = [fleet.solo[name] for name in fleet.names]
    assert len(set(answers)) >= FLEET // 2, answers  # the comparison below means something
    assert fleet.solo[BASE_NAME] not in answers


def test_concurrent_mixed_requests_each_get_their_own_adapter(server: Server, fleet: Fleet):
    models = [*fleet.names, *fleet.names, *[BASE_NAME] * 8]
    random.Random(0).shuffle(models)
    with ThreadPoolExecutor(max_workers=32) as pool:
        responses = list(pool.map(lambda m: complete(server, m), models))
    wrong = []
    for model, response in zip(models, responses, strict=True):
        assert response.status_code == 200, f"{model}: {response.text}"
        if response.json()["choices"][0]["text"] != fleet.solo[model]:
            wrong.append(model)
    assert not wrong, f"{len(wrong)} answers differ from the adapter's solo answer: {wrong[:5]}"
    metrics = httpx.get(f"{server.url}/metrics", timeout=30)
    if metrics.status_code == 200:  # the metrics endpoint is another component's
        loads = [
            float(line.split()[1])
            for line in metrics.text.splitlines()
            if line.startswith("loraplex_adapter_loads_total{")
        ]
        # The replica's resolvers load each adapter on first use and vLLM's LRU (32 host
        # slots) evicts: the router counts more loads than the 64 distinct adapters.
        assert sum(loads) > FLEET


def cli(server: Server, *argv: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "loraplex.cli", "adapters", *argv],
        env=server.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_publish_v2_serves_v2_next_and_rollback_serves_v1(server: Server, fleet: Fleet):
    name = "acme/swap"
    # Generated weights have no held-out scores: published past the quality gate, forced.
    force = "--force"
    assert "acme/swap:v1" in cli(server, "publish", str(fleet.sources["v1"]), "--name", name, force)
    first = answer(server, name)
    assert first == answer(server, f"{name}:v1")

    assert "acme/swap:v2" in cli(server, "publish", str(fleet.sources["v2"]), "--name", name, force)
    second = answer(server, name)  # the very next request, no restart
    assert second != first
    assert second == answer(server, f"{name}:v2") == answer(server, f"{name}@latest")

    cli(server, "alias", f"{name}@stable", "v1")
    assert answer(server, f"{name}@stable") == first
    cli(server, "rollback", name)
    assert answer(server, name) == first
    listed = json.loads(cli(server, "list", "--tenant", "acme", "--json"))
    assert listed[0]["aliases"] == {"latest": 1, "stable": 1}


def test_unknown_version_is_404_and_bad_names_400(server: Server, fleet: Fleet):
    assert complete(server, f"{fleet.names[0]}:v99").status_code == 404
    assert complete(server, f"{fleet.names[0]}@nope").status_code == 404
    assert complete(server, f"{fleet.names[0]}@../x").status_code == 400
    assert complete(server, "fleet0/../adapter-0").status_code == 400


def test_stock_vllm_resolves_a_version_id_through_the_plugin(server: Server, fleet: Fleet):
    """Straight to the backend, no router: vLLM asks the plugin's resolver, which fetches
    and verifies the version into the cache on first request."""
    catalog = Catalog.open(server.env["LORAPLEX_DATABASE_URL"])
    store = open_blob_store(server.env["LORAPLEX_REGISTRY_STORE"])
    source = seeded_variant(fleet.sources["v1"], fleet.sources["v1"].parent / "direct", 7001)
    checks = PublishChecks(16, 1 << 30)
    record, _ = publish_adapter(
        source, parse_registry_name("acme/direct"), catalog=catalog, store=store, checks=checks
    )
    body = {"model": record.version_id, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    direct = httpx.post(
        f"{server.backend_url}/v1/completions",
        json=body,
        headers=server.engine_headers,
        timeout=600,
    )
    assert direct.status_code == 200, direct.text
    assert direct.json()["choices"][0]["text"] == answer(server, "acme/direct")
    unknown = dict(body, model="lpx-" + "0" * 64)
    headers = server.engine_headers
    url = f"{server.backend_url}/v1/completions"
    assert httpx.post(url, json=unknown, headers=headers).status_code == 404
