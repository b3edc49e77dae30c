"""deploy/prometheus and deploy/alertmanager: real promtool/amtool checks, rule unit tests,
metric names that exist, and a real Prometheus that loads the rules and parses every
dashboard and alert query."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.unit.deploy_support import (
    ALERTS,
    CHART,
    DEPLOY,
    PROMETHEUS_BUILTINS,
    ROOT,
    alert_rules,
    dashboard_queries,
    promql_metric_names,
    recording_rule_names,
    router_metric_names,
    vllm_metric_names,
)
from tests.unit.registry_helpers import free_port

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (make services)"
)


def _run(*command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


@needs_promtool
def test_promtool_accepts_the_config_and_its_rule_file(tmp_path):
    # promtool opens every credentials file; the admin key's exists only in the container
    # (a compose secret), so the check reads a stand-in.
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    for job in config["scrape_configs"]:
        if "authorization" in job:
            job["authorization"]["credentials_file"] = str(tmp_path / "admin-key")
    (tmp_path / "admin-key").write_text("stand-in\n")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    result = _run("promtool", "check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


@needs_promtool
def test_promtool_accepts_the_rules():
    result = _run("promtool", "check", "rules", "alerts.yml", cwd=DEPLOY / "prometheus")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alert_rules_fire_and_stay_silent_as_their_unit_tests_say():
    result = _run("promtool", "test", "rules", "alerts.test.yml", cwd=DEPLOY / "prometheus")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_severity_summary_and_description():
    rules = alert_rules()
    names = {rule["alert"] for rule in rules}
    # What the issue asks for, at least.
    assert {
        "LoraplexBackendDown",
        "LoraplexHighErrorRate",
        "LoraplexTTFTBudgetBurnFast",
        "LoraplexAdapterLoadFailures",
        # Scale-out (issue 13).
        "LoraplexBackendReplicaEjected",
        "LoraplexRetryBudgetExhausted",
        "LoraplexEngineRestartLoop",
    } <= names
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert len(rule["annotations"]["description"]) > 60, rule["alert"]


def test_every_alert_is_exercised_or_listed_as_untested():
    tests = yaml.safe_load((DEPLOY / "prometheus" / "alerts.test.yml").read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test.get("alert_rule_test", [])}
    # Threshold-on-a-gauge rules whose logic is one comparison; the rest have unit tests.
    untested = {
        "LoraplexRouterDown",
        "LoraplexVLLMMetricsDown",
        "LoraplexSlowDecoding",
        "LoraplexAdapterLoadSlow",
        "LoraplexMetricLabelOverflow",
        "LoraplexTenantThrottled",
        "LoraplexVLLMQueueBacklog",
        "LoraplexVLLMKVCacheFull",
        "LoraplexVLLMPreempting",
        "LoraplexTTFTBudgetBurnSlow",
    }
    assert {rule["alert"] for rule in alert_rules()} - tested <= untested


def _known_names() -> set[str]:
    known = set(router_metric_names()) | recording_rule_names() | PROMETHEUS_BUILTINS
    return known | set(vllm_metric_names() or ())


def _all_queries() -> list[tuple[str, str]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    rules = [
        (f"rule {rule.get('alert') or rule.get('record')}", rule["expr"])
        for group in groups
        for rule in group["rules"]
    ]
    return rules + dashboard_queries()


def test_queries_use_only_metrics_that_exist():
    """Every name in alerts.yml and the dashboard is a router metric (router/metrics.py with
    prometheus_client's suffixes), a vllm:* metric of the installed vLLM, a recording rule
    of alerts.yml, or a Prometheus built-in."""
    known = _known_names()
    if vllm_metric_names() is None:
        known |= {
            n for _, e in _all_queries() for n in promql_metric_names(e) if n.startswith("vllm:")
        }
    unknown = {
        (where, name)
        for where, expr in _all_queries()
        for name in promql_metric_names(expr)
        if name not in known
    }
    assert not unknown


def test_vllm_names_come_from_the_installed_vllm():
    names = vllm_metric_names()
    if names is None:
        pytest.skip("vLLM not installed: vllm:* names not checked")
    assert {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"} <= names


def test_name_extraction_catches_a_typo():
    names = promql_metric_names(
        "histogram_quantile(0.95, sum by (adapter, le) (rate(loraplex_time_to_first_tokn_seconds_bucket"
        '{adapter=~"$adapter", le="2.5"}[$__rate_interval]))) > 2 and on() up offset 5m'
    )
    assert names == {"loraplex_time_to_first_tokn_seconds_bucket", "up"}
    assert not names <= _known_names()


def test_label_values_in_queries_are_ones_the_router_emits():
    source = "\n".join(p.read_text() for p in (ROOT / "router").rglob("*.py"))
    emitted = set(_literal_label_values(source, "result"))
    assert emitted, "router no longer labels adapter loads by result?"
    used = set()
    for _, expr in _all_queries():
        used.update(v for v in _matcher_values(expr, "result"))
    assert used and used <= emitted, (used, emitted)
    # The label-overflow alert matches the value the router's label limiter reports.
    from loraplex.router.metrics import OVERFLOW_LABEL

    overflow = next(r for r in alert_rules() if r["alert"] == "LoraplexMetricLabelOverflow")
    assert f'adapter="{OVERFLOW_LABEL}"' in overflow["expr"]


def test_scale_out_label_values_in_queries_are_ones_the_router_names():
    """decision, state and reason values the queries filter on are string literals of the
    router's code (the picker's decision kinds, the pool's states and reasons)."""
    source = "\n".join(p.read_text() for p in (ROOT / "router").rglob("*.py"))
    literals = set(re.findall(r'"([a-z0-9_]+)"', source))
    used = {
        (label, value)
        for _, expr in _all_queries()
        for label in ("decision", "state", "reason")
        for value in _matcher_values(expr, label)
    }
    assert used, "no query filters on decision/state/reason any more?"
    assert not {(label, value) for label, value in used if value not in literals}


def _literal_label_values(source: str, label: str) -> list[str]:
    """`label="a"`, and both values of `label="a" if ... else "b"`."""
    values = []
    for first, second in re.findall(
        rf'\b{label}="([^"]+)"(?:\s+if\s[^\n]*?\selse\s+"([^"]+)")?', source
    ):
        values += [first, second] if second else [first]
    return values


def _matcher_values(expr: str, label: str) -> list[str]:
    return re.findall(rf'\b{label}!?=~?"([^"]+)"', expr)


def test_helm_chart_ships_the_same_rules():
    assert (CHART / "files" / "alerts.yml").read_text() == ALERTS.read_text(), (
        "copy deploy/prometheus/alerts.yml to deploy/helm/loraplex/files/alerts.yml"
    )


def test_compose_scrape_jobs_match_the_rules():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["loraplex-router"]["static_configs"][0]["targets"] == ["router:8000"]
    # Every backend container, like the router's own discovery (dns:backend:8100).
    assert jobs["loraplex-vllm"]["dns_sd_configs"] == [
        {"names": ["backend"], "type": "A", "port": 8100, "refresh_interval": "15s"}
    ]
    exprs = " ".join(rule["expr"] for rule in alert_rules())
    assert 'job="loraplex-router"' in exprs and 'job="loraplex-vllm"' in exprs


@pytest.mark.skipif(shutil.which("amtool") is None, reason="amtool not installed (make services)")
def test_amtool_accepts_the_alertmanager_config():
    result = _run("amtool", "check-config", "alertmanager.yml", cwd=DEPLOY / "alertmanager")
    assert result.returncode == 0, result.stdout + result.stderr


def test_inhibited_alerts_exist():
    config = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    names = {rule["alert"] for rule in alert_rules()}
    for rule in config["inhibit_rules"]:
        for matcher in rule["source_matchers"] + rule["target_matchers"]:
            value = matcher.split("=", 1)[1].strip('~"')
            assert set(value.split("|")) <= names, matcher


# ---- a real Prometheus server ---------------------------------------------------------


def _get(url: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:  # 400 bad_data carries the parse error as JSON
        return json.load(exc)


@pytest.fixture(scope="module")
def prometheus_url(tmp_path_factory):
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed (make services)")
    workdir = tmp_path_factory.mktemp("prometheus")
    shutil.copy(ALERTS, workdir / "alerts.yml")
    # The compose config minus its targets (router/backend names do not resolve here).
    (workdir / "prometheus.yml").write_text(
        yaml.safe_dump({"global": {"evaluation_interval": "1s"}, "rule_files": ["alerts.yml"]})
    )
    port = free_port()
    process = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None, "prometheus exited"
            assert time.monotonic() < deadline, "prometheus not ready after 30 s"
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_real_prometheus_loads_every_rule_group(prometheus_url):
    groups = _get(f"{prometheus_url}/api/v1/rules")["data"]["groups"]
    expected = yaml.safe_load(ALERTS.read_text())["groups"]
    assert sorted(g["name"] for g in groups) == sorted(g["name"] for g in expected)
    # Rules evaluate (every second here) without errors, e.g. no many-to-many matches.
    deadline = time.monotonic() + 15
    while True:
        rules = [
            r for g in _get(f"{prometheus_url}/api/v1/rules")["data"]["groups"] for r in g["rules"]
        ]
        # Before its first evaluation a rule reports health "unknown".
        if all(r["health"] == "ok" for r in rules):
            break
        assert time.monotonic() < deadline, [r for r in rules if r["health"] != "ok"]
        time.sleep(0.5)


def test_real_prometheus_parses_every_dashboard_and_rule_query(prometheus_url):
    # Grafana substitutes its variables before sending a query; do the same.
    substitutions = {"$__rate_interval": "1m", "$__range": "1h", "$adapter": ".*", "$tenant": ".*"}
    rejected = []
    for where, expr in _all_queries():
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        answer = _get(f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        if answer["status"] != "success":
            rejected.append((where, answer.get("error")))
    assert not rejected
    # And the check can fail: an unbalanced query is refused.
    control = _get(f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": "sum(up"}))
    assert control["status"] == "error" and control["errorType"] == "bad_data"
