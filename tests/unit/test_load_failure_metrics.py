"""A request for an adapter the engine cannot load (issue 12, item 10) is counted under
the adapter's own name in loraplex_requests_total, as the load counter counts it, not
under adapter="unknown"."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from loraplex.router.metrics import ADAPTER_LOADS
from tests.unit.test_registry_router import Setup, make_setup


@pytest.fixture
def setup(tmp_path) -> Iterator[Setup]:
    yield from make_setup(tmp_path)


def _requests(adapter: str, status: str) -> float:
    total = 0.0
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            labels = sample.labels
            if (
                sample.name == "loraplex_requests_total"
                and labels.get("adapter") == adapter
                and labels.get("status") == status
            ):
                total += sample.value
    return total


def test_a_load_failure_is_counted_under_the_adapters_name(setup: Setup) -> None:
    name = f"acme/broken{uuid.uuid4().hex[:6]}"  # metrics are global to the process
    bad = setup.publish(name, seed=2)
    weights = setup.tmp / "store" / "blobs" / bad.digest / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    unknown_before = _requests("unknown", "500")
    response = setup.ask(name)
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "adapter_corrupt"
    assert ADAPTER_LOADS.labels(adapter=name, result="error")._value.get() == 1
    assert _requests(name, "500") == 1
    assert _requests("unknown", "500") == unknown_before
