"""schemathesis against the router's own /openapi.json (issue 12, item 12): every endpoint,
with the admin key and without one, answers no 5xx and only what the schema documents
(statuses, content types, headers, bodies; 405 with `Allow`). The real router over HTTP
(uvicorn), a stand-in engine (tests/unit/stub_replica.py) behind it; the numbers are
printed (`-s`) and asserted.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from loraplex.router.app import create_app
from loraplex.settings import ServeSettings
from tests.schemathesis_run import run_schemathesis
from tests.unit.registry_helpers import bound_url, uvicorn_in_thread
from tests.unit.stub_replica import stub_replicas

ADMIN = {"Authorization": "Bearer admin-secret"}


@dataclass
class LiveRouter:
    url: str
    schema: dict


@pytest.fixture
def router(tmp_path: Path) -> Iterator[LiveRouter]:
    settings = ServeSettings(
        adapters_dir=tmp_path / "adapters",
        base_model_name="base",
        database_url=f"sqlite:///{tmp_path}/loraplex.db",
        registry_store=str(tmp_path / "store"),
        registry_cache_dir=tmp_path / "cache",
        health_check_interval_s=3600.0,
        admin_key="admin-secret",
    )
    with stub_replicas("a") as (replica,):
        config = uvicorn.Config(
            create_app(settings, [replica.url]), host="127.0.0.1", port=0, log_level="error"
        )
        with uvicorn_in_thread(config) as server:
            assert server.started
            url = bound_url(server)
            schema = httpx.get(f"{url}/openapi.json", headers=ADMIN).json()
            yield LiveRouter(url, schema)


def _reaching_the_engine(schema: dict) -> dict:
    """The schema with `model` limited to the served base model's name, so generated
    completion requests pass routing and reach the engine (random names are 404s before
    it; the contract tests cover those)."""
    schema = copy.deepcopy(schema)
    for model in ("ChatCompletionRequest", "CompletionRequest"):
        schema["components"]["schemas"][model]["properties"]["model"] = {"enum": ["base"]}
    return schema


def test_router_schema_with_the_admin_key(router: LiveRouter, tmp_path: Path) -> None:
    result = run_schemathesis(
        _reaching_the_engine(router.schema),
        router.url,
        tmp_path,
        headers=ADMIN,
        max_examples=5,
        max_time_s=75,
    )
    print(f"\nrouter schema, admin key: {result.summary()}")
    assert result.returncode == 0, result.output[-6000:]
    assert result.server_errors == 0
    # The time budget bounds the run; on a busy 2-core machine it gets through ~250.
    assert result.requests > 50
    # Generated completions got answers from the engine, not only refusals.
    assert result.statuses[200] > 0, result.common_errors()


def test_router_schema_without_a_key(router: LiveRouter, tmp_path: Path) -> None:
    result = run_schemathesis(
        router.schema, router.url, tmp_path, max_examples=2, phases="fuzzing", max_time_s=30
    )
    print(f"\nrouter schema, no key: {result.summary()}")
    assert result.returncode == 0, result.output[-6000:]
    assert result.server_errors == 0
    # Everything but the probes needs a key here (the router has an admin key).
    assert result.statuses[401] > 0
