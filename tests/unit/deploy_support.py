"""Shared by the deploy/ tests: paths, the metric names that exist, PromQL name extraction."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import re
from functools import cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "loraplex.json"
CHART = DEPLOY / "helm" / "loraplex"

# LORAPLEX_* names the deploy files may use that are not ServeSettings fields.
DEPLOY_ONLY_ENV = {
    "LORAPLEX_ROLE",  # entrypoint.py: router | backend
    "LORAPLEX_ROLE_FILE",
    "LORAPLEX_BACKEND_HOST",  # entrypoint.py: bind address of vLLM in a container
}

# Series Prometheus itself provides.
PROMETHEUS_BUILTINS = {"up", "ALERTS", "ALERTS_FOR_STATE"}

_SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
}


# Modules whose module-level metrics the router's /metrics exports: the router's own, and
# the engine supervisor's (`loraplex serve` runs it in the router's process).
METRIC_MODULES = (
    "loraplex.router.metrics",
    "loraplex.router.version_metrics",
    "loraplex.serving.supervisor",
)


@cache
def router_metric_names() -> frozenset[str]:
    """Series names the router's /metrics exposes: the metrics of METRIC_MODULES (those that
    exist) after prometheus_client's suffixes."""
    from prometheus_client.metrics import MetricWrapperBase

    names = set()
    for module_name in METRIC_MODULES:
        if importlib.util.find_spec(module_name) is None:
            continue  # not written yet: its names stay unknown, so queries on them fail
        module = importlib.import_module(module_name)
        for value in vars(module).values():
            if isinstance(value, MetricWrapperBase):
                for family in value.describe():
                    names.update(family.name + s for s in _SAMPLE_SUFFIXES[family.type])
    return frozenset(names)


@cache
def vllm_metric_names() -> frozenset[str] | None:
    """vllm:* series the installed vLLM defines (read from its source), None without vLLM."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        return None
    source = Path(spec.origin).parent / "v1" / "metrics" / "loggers.py"
    kinds = {"_gauge_cls": "gauge", "_counter_cls": "counter", "_histogram_cls": "histogram"}
    names = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        kind = kinds.get(node.func.attr)
        for keyword in node.keywords:
            if kind and keyword.arg == "name" and isinstance(keyword.value, ast.Constant):
                base = str(keyword.value.value).removesuffix("_total")
                names.update(base + s for s in _SAMPLE_SUFFIXES[kind])
    return frozenset(names)


def recording_rule_names() -> set[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard_queries(dashboard: dict | None = None) -> list[tuple[str, str]]:
    """(where, expr) for every PromQL expression of the dashboard: panels, variables, annotations."""
    dashboard = dashboard or json.loads(DASHBOARD.read_text())
    queries = [
        (f"panel {panel['title']!r}", target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            # label_values(<selector>, label) is Grafana's, not PromQL: check the selector.
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["query"]["query"])
            assert match, variable
            queries.append((f"variable {variable['name']}", match.group(1)))
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            queries.append((f"annotation {annotation['name']}", annotation["expr"]))
    return queries


_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "inf",
    "nan",
    "atan2",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(\s*\()?")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (functions, keywords, labels and literals removed)."""
    expr = _STRING.sub('""', expr)
    expr = _BRACES.sub(" ", expr)
    expr = _BRACKETS.sub(" ", expr)
    expr = _GROUPING.sub(" ", expr)
    names = set()
    for match in _IDENT.finditer(expr):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def unknown_settings(names: set[str]) -> set[str]:
    from loraplex.settings import ServeSettings

    fields = {f"LORAPLEX_{name.upper()}" for name in ServeSettings.model_fields}
    return {n for n in names if n.startswith("LORAPLEX_")} - fields - DEPLOY_ONLY_ENV
