"""deploy/grafana: the dashboard JSON loads, is what build_dashboard.py generates, has the
panels and variables an operator needs, and Grafana provisioning points at it."""

from __future__ import annotations

import importlib.util
import json

import pytest
import yaml

from tests.unit.deploy_support import CHART, DASHBOARD, DEPLOY, dashboard_queries


def _builder():
    # build_dashboard.py builds with grafana-foundation-sdk (test extras).
    pytest.importorskip("grafana_foundation_sdk", reason="grafana-foundation-sdk not installed")
    spec = importlib.util.spec_from_file_location(
        "build_dashboard", DEPLOY / "grafana" / "build_dashboard.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_committed_dashboards_are_the_generated_ones():
    generated = _builder().render()
    assert DASHBOARD.read_text() == generated, "run: python deploy/grafana/build_dashboard.py"
    assert (CHART / "files" / "loraplex-dashboard.json").read_text() == generated


def test_dashboard_has_the_required_panels():
    panels = {p["title"]: p for p in _dashboard()["panels"] if p["type"] != "row"}
    required = {
        "Requests/s by adapter and status": "loraplex_requests_total",
        "Tokens/s by adapter": "loraplex_completion_tokens_total",
        "Time to first token p50/p95/p99 by adapter": "loraplex_time_to_first_token_seconds_bucket",
        "End-to-end latency p50/p95/p99 by adapter": "loraplex_request_duration_seconds_bucket",
        "Requests in flight by adapter": "loraplex_requests_in_flight",
        "Adapter loads/s by result": "loraplex_adapter_loads_total",
        "Adapter load latency p50/p95/p99": "loraplex_adapter_load_duration_seconds_bucket",
        "Quota rejections/s by tenant and limit": "loraplex_quota_rejections_total",
        "Backend up": "loraplex_backend_up",
        # Scale-out (issue 13): replicas, picker, failover.
        "Replicas up": "loraplex_backend_replicas",
        "Replicas ejected": "loraplex_backend_replicas",
        "In flight by backend replica": "loraplex_backend_in_flight",
        "Picker decisions/s by kind": "loraplex_picker_decisions_total",
        "Affinity hit ratio": "loraplex_picker_decisions_total",
        "Retries/s by reason": "loraplex_backend_retries_total",
        "Retries refused by the budget": "loraplex_retry_budget_exhausted_total",
        "Ejections by replica and reason": "loraplex_backend_ejections_total",
        "Stream interruptions per minute": "loraplex_stream_interruptions_total",
        "Engine restarts by replica": "loraplex_engine_restarts_total",
        "Local engines up": "loraplex_engine_up",
    }
    for title, metric in required.items():
        assert title in panels, title
        assert any(metric in t["expr"] for t in panels[title]["targets"]), title
    for title in (
        "Time to first token p50/p95/p99 by adapter",
        "End-to-end latency p50/p95/p99 by adapter",
    ):
        exprs = [t["expr"] for t in panels[title]["targets"]]
        assert [e.split(",")[0] for e in exprs] == [
            "histogram_quantile(0.5",
            "histogram_quantile(0.95",
            "histogram_quantile(0.99",
        ]
        assert all("sum by (adapter, le)" in e for e in exprs)
        assert panels[title]["fieldConfig"]["defaults"]["unit"] == "s"


def test_router_queries_follow_the_adapter_and_tenant_variables():
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
    assert {"datasource", "adapter", "tenant"} <= set(variables)
    for name in ("adapter", "tenant"):
        assert variables[name]["multi"] and variables[name]["includeAll"]
        assert variables[name]["allValue"] == ".*"
    for where, expr in dashboard_queries():
        for metric in (
            "loraplex_requests_total{",
            "loraplex_prompt_tokens_total{",
            "loraplex_time_to_first_token_seconds_bucket{adapter",
        ):
            if metric in expr and where.startswith("panel"):
                assert 'adapter=~"$adapter"' in expr and 'tenant=~"$tenant"' in expr, (where, expr)


def test_panels_are_well_formed():
    panels = _dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_provisioning_points_at_the_dashboard_and_prometheus():
    datasources = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/loraplex.yml").read_text()
    )
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert (
        "./grafana/dashboards:/var/lib/grafana/dashboards:ro"
        in compose["services"]["grafana"]["volumes"]
    )
