"""Weighted aliases (canary) on the real catalog (SQLite and PostgreSQL) and through the
router against a stand-in vLLM: split proportions, stickiness per end user, weights moved
mid-run on two routers sharing the catalog, the refusals, the version header and metrics,
and the rollback guard (a corrupt canary answering 500 goes back to its incumbent)."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from loraplex.adapters.catalog import Catalog, CatalogConflict, CatalogLookupError
from loraplex.adapters.local_store import LocalAdapterStore
from loraplex.adapters.names import InvalidAdapterName
from loraplex.adapters.refs import parse_adapter_ref, parse_registry_name
from loraplex.adapters.registry import Registry
from loraplex.adapters.splits import InvalidSplit, RolloutGuard, parse_guard, parse_weights
from loraplex.router.adapter_loading import AdapterResolver, ServedAdapter
from loraplex.router.app import create_app
from loraplex.router.version_metrics import (
    ROLLOUT_ROLLBACKS,
    VERSION_COMPLETION_TOKENS,
    VERSION_PROMPT_TOKENS,
    VERSION_REQUESTS,
    VERSION_TIME_TO_FIRST_TOKEN,
    VersionLabels,
    VersionMiddleware,
)
from tests.unit.race_helpers import run_together
from tests.unit.registry_helpers import make_adapter_dir, make_base_dir
from tests.unit.test_registry_cli import run
from tests.unit.test_registry_router import Setup, make_setup

SUPPORT = parse_registry_name("acme/support")
D = [str(i) * 64 for i in range(1, 6)]
ADMIN = {"authorization": "Bearer admin-secret-123"}


@pytest.fixture
def catalog(database_url: str) -> Catalog:
    catalog = Catalog.open(database_url)
    for digest in D[:4]:  # v1..v4
        catalog.add_version(SUPPORT, digest, 10, None)
    return catalog


def resolver_on(catalog: Catalog) -> AdapterResolver:
    registry = Registry(catalog, store=None, cache=None)  # type: ignore[arg-type]
    return AdapterResolver(LocalAdapterStore(Path("/nonexistent")), "base", registry)


# ---- the catalog ----------------------------------------------------------------------


@pytest.fixture
def sqlite_catalog(tmp_path: Path) -> Catalog:
    """The 2,000-request run on SQLite only (PostgreSQL answers the same query; on a busy
    2-core runner its round trips made this one test 21 s)."""
    catalog = Catalog.open(f"sqlite:///{tmp_path}/loraplex.db")
    for digest in D[:4]:
        catalog.add_version(SUPPORT, digest, 10, None)
    return catalog


def test_split_of_2000_users_is_within_binomial_bounds(sqlite_catalog: Catalog):
    catalog = sqlite_catalog
    catalog.set_alias_weights(SUPPORT, "prod", {3: 90, 4: 10})
    resolver = resolver_on(catalog)
    served = Counter(
        resolver.resolve("acme/support@prod", f"user-{i}").version for i in range(2000)
    )
    # 10 % of 2000: mean 200, sd sqrt(2000 * 0.1 * 0.9) = 13.4; 4 sd either side.
    assert set(served) == {3, 4}
    assert abs(served[4] - 200) <= 4 * math.sqrt(2000 * 0.1 * 0.9), served


def test_the_same_user_keeps_their_version_while_the_weights_stand(catalog: Catalog):
    catalog.set_alias_weights(SUPPORT, "prod", {3: 50, 4: 50})
    resolver = resolver_on(catalog)
    first = {u: resolver.resolve("acme/support@prod", u).version for u in map(str, range(60))}
    assert set(first.values()) == {3, 4}
    for _ in range(2):
        assert {u: resolver.resolve("acme/support@prod", u).version for u in first} == first
    # Raising the canary only moves users onto it: nobody on v4 goes back to v3.
    catalog.set_alias_weights(SUPPORT, "prod", {3: 20, 4: 80})
    after = {u: resolver.resolve("acme/support@prod", u).version for u in first}
    assert all(after[u] == 4 for u, v in first.items() if v == 4)
    assert sum(v == 4 for v in after.values()) > sum(v == 4 for v in first.values())


def test_a_split_refuses_missing_versions_and_deleting_a_version_in_it(catalog: Catalog):
    with pytest.raises(CatalogLookupError, match="has no version v9"):
        catalog.set_alias_weights(SUPPORT, "prod", {3: 90, 9: 10})
    catalog.set_alias_weights(SUPPORT, "prod", {3: 90, 4: 10})
    with pytest.raises(CatalogConflict, match=r"v4 is in the weighted alias @prod \(v3=90,v4=10\)"):
        catalog.delete_version(SUPPORT, 4, force=True)
    with pytest.raises(CatalogConflict, match="v3 is in the weighted alias @prod"):
        catalog.delete_version(SUPPORT, 3)
    catalog.set_alias_weights(SUPPORT, "prod", {3: 100})  # promote/abort first: then it may go
    assert catalog.delete_version(SUPPORT, 4, force=True).deleted.number == 4  # @latest moves
    [adapter] = catalog.list_adapters()
    assert adapter.aliases["prod"] == 3 and "prod" not in adapter.weights


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("v3=90,v4=20", "weights sum to 110"),
        ("v3=100,v4=0", "weight of v4 is 0"),
        ("v3=90,v3=10", "v3 appears twice"),
        ("v3=ninety,v4=10", "use an integer"),
        ("v3,v4", "expected vN=WEIGHT"),
        ("3=90,v4=10", "invalid version"),
    ],
)
def test_bad_splits_say_why(text: str, message: str):
    with pytest.raises(InvalidAdapterName, match=message):  # InvalidSplit or a bad vN
        parse_weights(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("error_rate<=2x", "needs both"),
        ("error_rate<=0.5x,min_requests=10", "below 1x"),
        ("errors<=2x,min_requests=10", "not understood"),
        ("error_rate<=2x,min_requests=0", "at least 1"),
    ],
)
def test_bad_guards_say_why(text: str, message: str):
    with pytest.raises(InvalidSplit, match=message):
        parse_guard(text)


@pytest.mark.parametrize(
    ("canary", "incumbent", "tripped"),
    [
        ((200, 0), (900, 0), False),  # no errors: never
        ((199, 199), (900, 0), False),  # fewer than min_requests
        ((200, 1), (900, 0), True),  # any error rate beats 2 x 0
        ((200, 4), (1000, 10), False),  # 2.0 % is not above 2 x 1.0 %
        ((200, 5), (1000, 10), True),  # 2.5 % is
    ],
)
def test_guard_compares_error_rates_by_the_factor(canary, incumbent, tripped):
    assert RolloutGuard(2.0, 200).tripped(canary, incumbent) is tripped


def test_guard_counts_add_up_across_writers_and_roll_back_once(catalog: Catalog):
    catalog.set_alias_weights(SUPPORT, "prod", {3: 80, 4: 20}, "error_rate<=2x,min_requests=10")
    generation = catalog.resolve_target(parse_adapter_ref("acme/support@prod")).generation
    assert generation is not None
    # Two routers' batches: 6 + 4 canary requests, all failed, make the run of 10.
    assert catalog.record_outcomes(SUPPORT, "prod", generation, {3: (20, 0), 4: (6, 6)}) is None
    event = catalog.record_outcomes(SUPPORT, "prod", generation, {4: (4, 4)})
    assert event is not None and event.kind == "rollback"
    assert "canary v4 server-error rate 100.0% (10/10)" in event.detail
    assert "incumbent v3 0.0% (0/20)" in event.detail
    # A late batch from the old setting changes nothing.
    assert catalog.record_outcomes(SUPPORT, "prod", generation, {4: (50, 50)}) is None
    [adapter] = catalog.list_adapters()
    assert adapter.aliases["prod"] == 3 and adapter.weights == {} and adapter.guards == {}
    assert [e.detail for e in adapter.events] == [event.detail]


# ---- through the router ---------------------------------------------------------------


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    yield from make_setup(tmp_path)  # open: no keys needed (the API key is only a user key)


@pytest.fixture
def admin_setup(tmp_path: Path) -> Iterator[Setup]:
    yield from make_setup(tmp_path, admin_key="admin-secret-123")


def split(setup: Setup, weights: dict[int, int], guard: str | None = None) -> None:
    setup.catalog.set_alias_weights(SUPPORT, "prod", weights, guard)


def ask(client: TestClient, user: str | None = None, **headers: str):
    body: dict = {"model": "acme/support@prod", "prompt": "hi"}
    if user is not None:
        body["user"] = user
    return client.post("/v1/completions", json=body, headers=headers)


def test_the_router_tags_answers_with_the_version_and_keeps_users_sticky(setup: Setup):
    versions = {n: setup.publish("acme/support", seed=n) for n in (1, 2)}
    split(setup, {1: 50, 2: 50})
    seen = {}
    for user in map(str, range(40)):
        answer = ask(setup.client, user)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "acme/support@prod"  # the client's own name
        version = answer.headers["x-loraplex-adapter-version"]
        # The header names the version whose files answered (the stand-in echoes them).
        assert Path(answer.json()["choices"][0]["text"]).name == versions[int(version[1:])].digest
        seen[user] = version
    assert set(seen.values()) == {"v1", "v2"}
    for user, version in seen.items():  # the `user` field is sticky
        assert ask(setup.client, user).headers["x-loraplex-adapter-version"] == version
    # Without `user`: the session header, else the API key, decides; the same every time.
    by_session = {
        ask(setup.client, **{"x-loraplex-session": "s-7"}).headers["x-loraplex-adapter-version"]
        for _ in range(10)
    }
    by_key = {
        ask(setup.client, authorization="Bearer k-1").headers.get("x-loraplex-adapter-version")
        for _ in range(10)
    }
    assert len(by_session) == 1 and len(by_key) == 1


def test_weights_moved_mid_run_apply_on_the_next_request_on_every_router(setup: Setup):
    for n in (1, 2):
        setup.publish("acme/support", seed=n)
    # A second router replica on the same catalog (no cache in front of it).
    with TestClient(create_app(setup.settings, setup.backend_url)) as other:
        for weights, expected in [
            ({1: 100}, {"v1"}),
            ({2: 100}, {"v2"}),
            ({1: 90, 2: 10}, {"v1", "v2"}),
            ({1: 100}, {"v1"}),
        ]:
            split(setup, weights)
            served = {
                ask(client, f"u{i}").headers["x-loraplex-adapter-version"]
                for client in (setup.client, other)
                for i in range(20)
            }
            assert served == expected


def test_admin_api_sets_splits_and_refuses_bad_ones(admin_setup: Setup):
    setup = admin_setup
    for n in (1, 2):
        setup.publish("acme/support", seed=n)
    path = "/admin/adapters/acme/support/aliases/prod"
    body = {"weights": {"v1": 90, "v2": 10}, "guard": "error_rate<=2x,min_requests=50"}
    response = setup.client.put(path, json=body, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "adapter": "acme/support",
        "alias": "prod",
        "version": "v1",
        "weights": {"v1": 90, "v2": 10},
        "guard": "error_rate<=2x,min_requests=50",
        "previous": None,
    }
    listed = setup.client.get("/admin/adapters", headers=ADMIN).json()["data"][0]
    assert listed["weights"] == {"prod": {"v1": 90, "v2": 10}}
    assert listed["guards"] == {"prod": "error_rate<=2x,min_requests=50"}
    answer = setup.client.post(
        "/v1/completions",
        json={"model": "acme/support@prod", "prompt": "hi", "user": "u1"},
        headers=ADMIN,
    )
    assert answer.headers["x-loraplex-adapter-version"] in {"v1", "v2"}
    cases = [
        ({"weights": {"v1": 60, "v2": 60}}, 400, "weights sum to 120"),
        ({"weights": {"v1": 90, "v9": 10}}, 404, "has no version v9"),
        ({"weights": {"v1": "90", "v2": 10}}, 400, "weights.v1"),
        ({"version": "v1", "weights": {"v1": 100}}, 400, "either 'version' or 'weights'"),
        ({"version": "v1", "guard": "error_rate<=2x,min_requests=5"}, 409, "needs a canary"),
        ({"weights": {"v1": 100}, "guard": "bogus"}, 400, "not understood"),
    ]
    for body, status, message in cases:
        response = setup.client.put(path, json=body, headers=ADMIN)
        assert response.status_code == status, (body, response.text)
        assert message in response.json()["error"]["message"], response.text


def test_a_corrupt_canary_is_rolled_back_by_its_guard(setup: Setup):
    v1 = setup.publish("acme/support", seed=1)
    v2 = setup.publish("acme/support", seed=2)
    weights = setup.tmp / "store" / "blobs" / v2.digest / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")  # fails hash verification
    split(setup, {1: 80, 2: 20}, "error_rate<=2x,min_requests=5")
    rollbacks = ROLLOUT_ROLLBACKS.labels("acme/support", "prod", "error_rate")._value.get()
    statuses: Counter[tuple[str, int]] = Counter()
    for i in range(80):
        answer = ask(setup.client, f"u{i}")
        statuses[(answer.headers["x-loraplex-adapter-version"], answer.status_code)] += 1
        if (answer.headers["x-loraplex-adapter-version"], answer.status_code) == ("v2", 500):
            assert answer.json()["error"]["code"] == "adapter_corrupt"
    # Exactly the guard's run of 5 canary requests failed; then only the incumbent served.
    assert statuses[("v2", 500)] == 5 and statuses[("v1", 200)] == 75, statuses
    assert ROLLOUT_ROLLBACKS.labels("acme/support", "prod", "error_rate")._value.get() == (
        rollbacks + 1
    )
    failed = VERSION_REQUESTS.labels("acme/support", "prod", "v2", "canary", "500")._value.get()
    assert failed >= 5
    [listed] = setup.catalog.list_adapters()
    assert listed.aliases["prod"] == 1 and listed.weights == {}
    assert "canary v2 server-error rate 100.0% (5/5)" in listed.events[0].detail
    assert v1.digest != v2.digest


# ---- the command line ---------------------------------------------------------------------


def test_cli_canary_promote_and_listing(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("LORAPLEX_DATABASE_URL", f"sqlite:///{tmp_path}/loraplex.db")
    monkeypatch.setenv("LORAPLEX_REGISTRY_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("LORAPLEX_REGISTRY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LORAPLEX_BASE_MODEL", str(make_base_dir(tmp_path / "base")))
    for n in (1, 2):
        folder = make_adapter_dir(tmp_path / f"v{n}", seed=n)
        code, _, err = run(capsys, "publish", str(folder), "--name", "acme/support", "--force")
        assert code == 0, err
    code, out, err = run(capsys, "alias", "acme/support", "prod", "--to", "v1")
    assert (code, out.strip()) == (0, "acme/support@prod → v1"), err
    code, out, err = run(
        capsys,
        "alias",
        "acme/support",
        "prod",
        "--to",
        "v1=90,v2=10",
        "--guard",
        "error_rate<=2x,min_requests=200",
    )
    assert code == 0, err
    assert out.strip() == (
        "acme/support@prod → v1=90,v2=10 (was v1), rollback guard error_rate<=2x,min_requests=200"
    )
    code, out, _ = run(capsys, "list")
    assert "@prod=v1=90,v2=10 [guard error_rate<=2x,min_requests=200]" in out
    assert "@prod:90%" in out and "@latest @prod:10%" in out  # each version's share
    code, _, err = run(capsys, "alias", "acme/support", "prod", "--to", "v1=90,v2=20")
    assert code == 2 and "weights sum to 110" in err
    code, _, err = run(capsys, "delete", "acme/support:v2", "--force")
    assert code == 2 and "in the weighted alias @prod" in err
    code, out, _ = run(capsys, "alias", "acme/support", "prod", "--to", "v2")
    assert out.strip() == "acme/support@prod → v2 (was v1=90,v2=10)"
    code, out, _ = run(capsys, "list", "--json")
    assert json.loads(out)[0]["aliases"]["prod"] == 2


def test_replicas_adding_counts_at_once_lose_none_and_roll_back_once(catalog: Catalog):
    # 8 routers each report 1 canary error at the same moment (run of 8): every count
    # lands, and exactly one of them trips the guard.
    catalog.set_alias_weights(SUPPORT, "prod", {3: 80, 4: 20}, "error_rate<=2x,min_requests=8")
    generation = catalog.resolve_target(parse_adapter_ref("acme/support@prod")).generation
    assert generation is not None
    outcomes = run_together(
        lambda i: catalog.record_outcomes(SUPPORT, "prod", generation, {3: (4, 0), 4: (1, 1)})
    )
    assert not [o for o in outcomes if isinstance(o, Exception)], outcomes
    events = [o for o in outcomes if o is not None]
    assert len(events) == 1, outcomes
    assert "canary v4 server-error rate 100.0% (8/8)" in events[0].detail
    assert "incumbent v3 0.0% (0/" in events[0].detail


async def _streaming_app(scope: dict, receive: Any, send: Any) -> None:
    """A stand-in completion endpoint: resolves to v2 of a weighted alias and streams two
    text chunks and the usage chunk, as vLLM does with include_usage."""
    scope.setdefault("state", {})["served_adapter"] = ServedAdapter(
        SUPPORT, "acme/support@prod", "lpx-x", None, D[1], 2, alias="prod", role="canary"
    )
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream")],
        }
    )
    events = [
        {"choices": [{"text": "Par"}]},
        {"choices": [{"text": "is"}]},
        {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}},
    ]
    for event in events:
        body = b"data: " + json.dumps(event).encode() + b"\n\n"
        await send({"type": "http.response.body", "body": body, "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


def test_streamed_answers_count_tokens_and_ttft_per_version():
    labels = ("acme/support", "prod", "v2", "canary")
    before = (
        VERSION_COMPLETION_TOKENS.labels(*labels)._value.get(),
        VERSION_PROMPT_TOKENS.labels(*labels)._value.get(),
        _histogram_count(VERSION_TIME_TO_FIRST_TOKEN, labels),
    )
    app = VersionMiddleware(_streaming_app, labels=VersionLabels(10))
    client = TestClient(app)
    response = client.post("/v1/completions", json={})
    assert response.headers["x-loraplex-adapter-version"] == "v2"
    assert '"usage"' in response.text  # passed through untouched (the guard drops it)
    after = (
        VERSION_COMPLETION_TOKENS.labels(*labels)._value.get(),
        VERSION_PROMPT_TOKENS.labels(*labels)._value.get(),
        _histogram_count(VERSION_TIME_TO_FIRST_TOKEN, labels),
    )
    assert (after[0] - before[0], after[1] - before[1], after[2] - before[2]) == (2, 7, 1)


def _histogram_count(histogram: Any, labels: tuple[str, ...]) -> float:
    for metric in histogram.collect():
        for sample in metric.samples:
            if (
                sample.name.endswith("_count")
                and tuple(sample.labels[k] for k in ("adapter", "alias", "version", "role"))
                == labels
            ):
                return sample.value
    return 0.0
