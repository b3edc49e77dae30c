"""Writes deploy/grafana/dashboards/loraplex.json (and the Helm chart's copy).

The dashboard is generated so that its queries stay readable and consistent here
(one filter, one legend style); the JSON is committed because Grafana provisioning
reads JSON. tests/unit/test_deploy_grafana.py fails when the two disagree:
after editing this file, run `python deploy/grafana/build_dashboard.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUTPUTS = [
    HERE / "dashboards" / "loraplex.json",
    HERE.parent / "helm" / "loraplex" / "files" / "loraplex-dashboard.json",
]

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Every router query is filtered by the two template variables.
SEL = 'adapter=~"$adapter", tenant=~"$tenant"'
RATE = "[$__rate_interval]"


def _target(expr: str, legend: str = "", ref: str = "A") -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref}


def _quantiles(metric: str, by: str, quantiles: tuple[float, ...], selector: str = SEL) -> list:
    group = f"{by}, le" if by else "le"
    matchers = f"{{{selector}}}" if selector else ""
    legend_by = f" {{{{{by}}}}}" if by else ""
    return [
        _target(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{matchers}{RATE})))",
            f"p{round(q * 100)}{legend_by}",
            chr(ord("A") + i),
        )
        for i, q in enumerate(quantiles)
    ]


class DashboardBuilder:
    """Lays panels out left to right in rows of 24 grid units."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self._x = 0
        self._y = 0
        self._row_height = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "id": len(self.panels) + 1,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self._y},
                "panels": [],
            }
        )
        self._y += 1

    def panel(
        self,
        title: str,
        targets: list[dict[str, Any]],
        *,
        unit: str = "short",
        kind: str = "timeseries",
        width: int = 12,
        height: int = 8,
        description: str = "",
        stack: bool = False,
        thresholds: list[dict[str, Any]] | None = None,
    ) -> None:
        if self._x + width > 24:
            self._newline()
        defaults: dict[str, Any] = {"unit": unit}
        if thresholds:
            defaults["thresholds"] = {"mode": "absolute", "steps": thresholds}
            defaults["color"] = {"mode": "thresholds"}
        if kind == "timeseries":
            defaults["custom"] = {
                "drawStyle": "line",
                "lineWidth": 1,
                "fillOpacity": 10 if stack else 0,
                "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                "showPoints": "never",
                "spanNulls": False,
            }
        panel: dict[str, Any] = {
            "id": len(self.panels) + 1,
            "type": kind,
            "title": title,
            "description": description,
            "datasource": DATASOURCE,
            "gridPos": {"h": height, "w": width, "x": self._x, "y": self._y},
            "targets": targets,
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": (
                {
                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "background",
                    "graphMode": "area",
                    "textMode": "auto",
                }
                if kind == "stat"
                else {
                    "legend": {
                        "displayMode": "table",
                        "placement": "right",
                        "calcs": ["mean", "max", "lastNotNull"],
                    },
                    "tooltip": {"mode": "multi", "sort": "desc"},
                }
            ),
        }
        self.panels.append(panel)
        self._x += width
        self._row_height = max(self._row_height, height)

    def _newline(self) -> None:
        self._y += self._row_height
        self._x = 0
        self._row_height = 0


def _variable(name: str, query: str, label: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-values"},
        "definition": query,
        "refresh": 2,
        "sort": 1,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "hide": 0,
        "regex": "",
    }


def build() -> dict[str, Any]:
    d = DashboardBuilder()
    ok = [{"color": "red", "value": None}, {"color": "green", "value": 1}]
    d.row("Overview")
    d.panel(
        "Backend up",
        [_target("min(loraplex_backend_up)", "backend up")],
        kind="stat",
        width=4,
        height=4,
        thresholds=ok,
        description="1 when every router replica reaches its vLLM backend.",
    )
    d.panel(
        "Requests/s",
        [_target(f"sum(rate(loraplex_requests_total{{{SEL}}}{RATE}))")],
        unit="reqps",
        kind="stat",
        width=5,
        height=4,
    )
    d.panel(
        "5xx error ratio",
        [
            _target(
                # `or vector(0)`: no 5xx series yet reads 0 %, not "No data".
                f'(sum(rate(loraplex_requests_total{{{SEL}, status=~"5.."}}{RATE})) or vector(0)) '
                f"/ sum(rate(loraplex_requests_total{{{SEL}}}{RATE}))"
            )
        ],
        unit="percentunit",
        kind="stat",
        width=5,
        height=4,
        thresholds=[
            {"color": "green", "value": None},
            {"color": "orange", "value": 0.01},
            {"color": "red", "value": 0.05},
        ],
    )
    d.panel(
        "In flight",
        [_target(f"sum(loraplex_requests_in_flight{{{SEL}}})")],
        kind="stat",
        width=5,
        height=4,
    )
    d.panel(
        "TTFT p95",
        _quantiles("loraplex_time_to_first_token_seconds", "", (0.95,)),
        unit="s",
        kind="stat",
        width=5,
        height=4,
    )

    d.row("Traffic")
    d.panel(
        "Requests/s by adapter and status",
        [
            _target(
                f"sum by (adapter, status) (rate(loraplex_requests_total{{{SEL}}}{RATE}))",
                "{{adapter}} {{status}}",
            )
        ],
        unit="reqps",
        stack=True,
    )
    d.panel(
        "Requests/s by tenant",
        [_target(f"sum by (tenant) (rate(loraplex_requests_total{{{SEL}}}{RATE}))", "{{tenant}}")],
        unit="reqps",
        stack=True,
    )
    d.panel(
        "Tokens/s by adapter",
        [
            _target(
                f"sum by (adapter) (rate(loraplex_prompt_tokens_total{{{SEL}}}{RATE}))",
                "prompt {{adapter}}",
                "A",
            ),
            _target(
                f"sum by (adapter) (rate(loraplex_completion_tokens_total{{{SEL}}}{RATE}))",
                "completion {{adapter}}",
                "B",
            ),
        ],
        unit="short",
        description="Prompt tokens read and completion tokens generated per second.",
    )
    d.panel(
        "Requests in flight by adapter",
        [_target(f"sum by (adapter) (loraplex_requests_in_flight{{{SEL}}})", "{{adapter}}")],
        stack=True,
    )

    d.row("Latency")
    d.panel(
        "Time to first token p50/p95/p99 by adapter",
        _quantiles("loraplex_time_to_first_token_seconds", "adapter", (0.5, 0.95, 0.99)),
        unit="s",
    )
    d.panel(
        "End-to-end latency p50/p95/p99 by adapter",
        _quantiles("loraplex_request_duration_seconds", "adapter", (0.5, 0.95, 0.99)),
        unit="s",
    )
    d.panel(
        "Time per output token p50/p95 by adapter",
        _quantiles("loraplex_time_per_output_token_seconds", "adapter", (0.5, 0.95)),
        unit="s",
    )
    d.panel(
        "TTFT SLO: share of requests slower than 2.5 s",
        [
            _target("loraplex:ttft_slow_ratio:rate5m", "5m", "A"),
            _target("loraplex:ttft_slow_ratio:rate1h", "1h", "B"),
        ],
        unit="percentunit",
        description="Recording rules from alerts.yml (all adapters). "
        "SLO: at most 1 %; LoraplexTTFTBudgetBurnFast fires above 14.4 % over 1h and 5m.",
        thresholds=[{"color": "green", "value": None}, {"color": "red", "value": 0.01}],
    )

    d.row("Adapters")
    adapter_sel = 'adapter=~"$adapter"'
    d.panel(
        "Adapter loads/s by result",
        [
            _target(
                f"sum by (result) (rate(loraplex_adapter_loads_total{{{adapter_sel}}}{RATE}))",
                "{{result}}",
            )
        ],
        unit="ops",
        stack=True,
    )
    d.panel(
        "Adapter load failures by adapter",
        [
            _target(
                f"sum by (adapter) (increase(loraplex_adapter_loads_total{{{adapter_sel}, "
                f'result="error"}}{RATE}))',
                "{{adapter}}",
            )
        ],
        kind="timeseries",
        description="Failed registrations with the backend; the router log says why.",
    )
    d.panel(
        "Adapter load latency p50/p95/p99",
        _quantiles("loraplex_adapter_load_duration_seconds", "", (0.5, 0.95, 0.99), ""),
        unit="s",
    )
    d.panel(
        "Adapter evictions per minute",
        [_target(f"sum(rate(loraplex_adapter_evictions_total{RATE})) * 60", "evictions/min")],
        description="Sustained evictions mean the adapter working set exceeds the backend's "
        "max_cpu_loras / max_loras.",
    )

    d.row("Tenants and quotas")
    d.panel(
        "Quota rejections/s by tenant and limit",
        [
            _target(
                "sum by (tenant, limit) (rate(loraplex_quota_rejections_total"
                f'{{tenant=~"$tenant"}}{RATE}))',
                "{{tenant}} {{limit}}",
            )
        ],
        unit="reqps",
        stack=True,
    )
    d.panel(
        "Tokens/s by tenant",
        [
            _target(
                f"sum by (tenant) (rate(loraplex_prompt_tokens_total{{{SEL}}}{RATE}) "
                f"+ rate(loraplex_completion_tokens_total{{{SEL}}}{RATE}))",
                "{{tenant}}",
            )
        ],
        stack=True,
        description="Prompt plus completion tokens: what tokens-per-minute quotas count.",
    )

    d.row("Backend (vLLM)")
    d.panel(
        "Backend up by router replica",
        [_target("loraplex_backend_up", "{{instance}}")],
        width=8,
        thresholds=ok,
    )
    d.panel(
        "vLLM requests running / waiting",
        [
            _target("sum(vllm:num_requests_running)", "running", "A"),
            _target("sum(vllm:num_requests_waiting)", "waiting", "B"),
        ],
        width=8,
    )
    d.panel(
        "vLLM KV cache usage",
        [_target("max by (instance) (vllm:kv_cache_usage_perc)", "{{instance}}")],
        unit="percentunit",
        width=8,
    )
    d.panel(
        "TTFT p95: router vs engine",
        [
            *_quantiles("loraplex_time_to_first_token_seconds", "", (0.95,)),
            _target(
                f"histogram_quantile(0.95, sum by (le) "
                f"(rate(vllm:time_to_first_token_seconds_bucket{RATE})))",
                "engine p95",
                "B",
            ),
        ],
        unit="s",
        width=8,
        description="The gap is the router's share: adapter resolution, registration and proxying.",
    )
    d.panel(
        "vLLM generation tokens/s",
        [
            _target(f"sum(rate(vllm:generation_tokens_total{RATE}))", "generated", "A"),
            _target(f"sum(rate(vllm:prompt_tokens_total{RATE}))", "prompt", "B"),
        ],
        width=8,
    )
    d.panel(
        "vLLM preemptions/s",
        [_target(f"sum(rate(vllm:num_preemptions_total{RATE}))", "preemptions")],
        unit="ops",
        width=8,
    )

    return {
        "uid": "loraplex-overview",
        "title": "loraplex",
        "description": "Requests, tokens, latency, adapters, quotas and backend health.",
        "tags": ["loraplex", "llm", "vllm"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "regex": "",
                    "options": [],
                },
                _variable("adapter", "label_values(loraplex_requests_total, adapter)", "Adapter"),
                _variable(
                    "tenant",
                    'label_values(loraplex_requests_total{adapter=~"$adapter"}, tenant)',
                    "Tenant",
                ),
            ]
        },
        "annotations": {
            "list": [
                {
                    "name": "Alerts",
                    "datasource": DATASOURCE,
                    "enable": True,
                    "iconColor": "red",
                    "expr": 'ALERTS{alertname=~"Loraplex.*", alertstate="firing"}',
                    "titleFormat": "{{alertname}}",
                    "textFormat": "{{summary}}",
                    "step": "60s",
                },
            ]
        },
        "panels": d.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main() -> None:
    text = render()
    for path in OUTPUTS:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path)


if __name__ == "__main__":
    main()
