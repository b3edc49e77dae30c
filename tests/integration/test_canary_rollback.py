"""A canary rollout on the real engine: a weighted alias whose canary's blob is corrupt
(every request it gets answers 500 adapter_corrupt) at 20 % with a rollback guard; after
the guard's run of canary requests every request is served by the incumbent, `adapters
list` shows the event, and the log and metrics say why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraplex.adapters.blob_store import open_blob_store
from loraplex.adapters.catalog import Catalog
from loraplex.adapters.publish import PublishChecks, publish_adapter
from loraplex.adapters.refs import parse_registry_name
from tests.integration.conftest import Server

pytestmark = pytest.mark.integration

NAME = "rollout/support"  # its own tenant: other registry tests list tenant acme
MIN_REQUESTS = 4


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


def ask(server: Server, user: str) -> httpx.Response:
    body = {
        "model": f"{NAME}@prod",
        "prompt": "The capital of France is",
        "max_tokens": 2,
        "temperature": 0,
        "user": user,
    }
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=600)


def test_a_corrupt_canary_is_rolled_back_to_its_incumbent(server: Server):
    # The two demo adapters (peft folders) as v1 (incumbent) and v2 (canary).
    catalog = Catalog.open(server.env["LORAPLEX_DATABASE_URL"])
    store = open_blob_store(server.env["LORAPLEX_REGISTRY_STORE"])
    published = [
        publish_adapter(
            server.adapters_dir / spec,
            parse_registry_name(NAME),
            catalog=catalog,
            store=store,
            checks=PublishChecks(16, 1 << 30),
        )[0]
        for spec in ("demo/alpha", "demo/beta")
    ]
    canary = server.env["LORAPLEX_REGISTRY_STORE"] + f"/blobs/{published[1].digest}"
    weights = next(Path(canary).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")  # fails hash verification
    out = cli(
        server,
        "alias",
        NAME,
        "prod",
        "--to",
        "v1=80,v2=20",
        "--guard",
        f"error_rate<=2x,min_requests={MIN_REQUESTS}",
    )
    assert "v1=80,v2=20" in out

    served: list[tuple[str, int]] = []
    for i in range(60):
        response = ask(server, f"user-{i}")
        version = response.headers["x-loraplex-adapter-version"]
        served.append((version, response.status_code))
        if version == "v2":
            assert response.status_code == 500
            assert response.json()["error"]["code"] == "adapter_corrupt"
        else:
            assert response.status_code == 200, response.text
            assert response.json()["model"] == f"{NAME}@prod"  # the client's own name
        if len(served) >= 12 and served.count(("v2", 500)) == MIN_REQUESTS:
            break
    # The guard's run of canary requests failed, then it rolled back: only v1 from now on,
    # for users who had the canary too.
    assert served.count(("v2", 500)) == MIN_REQUESTS, served
    canary_users = [f"user-{i}" for i, (v, _) in enumerate(served) if v == "v2"]
    for user in canary_users:
        response = ask(server, user)
        assert (response.headers["x-loraplex-adapter-version"], response.status_code) == (
            "v1",
            200,
        )

    [listed] = catalog.list_adapters("rollout")
    assert listed.aliases["prod"] == 1 and listed.weights == {}
    [event] = listed.events
    assert event.kind == "rollback"
    assert f"canary v2 server-error rate 100.0% ({MIN_REQUESTS}/{MIN_REQUESTS})" in event.detail
    assert "rollback: rollout/support@prod rolled back to v1" in cli(
        server, "list", "--tenant", "rollout"
    )
    assert "canary rolled back" in server.log_path.read_text()

    metrics = httpx.get(f"{server.url}/metrics", timeout=30)
    if metrics.status_code == 200:  # the metrics endpoint's access is another component's
        rollout = {"adapter": NAME, "alias": "prod"}
        assert sample(metrics.text, "loraplex_rollout_rollbacks_total", reason="error_rate") == 1
        failed = {"version": "v2", "role": "canary", "status": "500", **rollout}
        assert sample(metrics.text, "loraplex_version_requests_total", **failed) == MIN_REQUESTS
        tokens = {"version": "v1", "role": "incumbent", **rollout}
        assert sample(metrics.text, "loraplex_version_completion_tokens_total", **tokens) > 0


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the sample `name` whose labels include `labels` (0 when none)."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and labels.items() <= found.labels.items():
                return found.value
    return 0.0
