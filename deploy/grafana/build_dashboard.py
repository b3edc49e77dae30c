"""Writes deploy/grafana/dashboards/loraplex.json (and the Helm chart's copy).

The dashboard is built with Grafana's own typed builders (grafana-foundation-sdk, the
11.5 line to match the Grafana of deploy/compose.yaml) so that panels, queries and
options are checked names rather than hand-written JSON keys. It is generated so that
its queries stay readable and consistent here (one filter, one legend style); the JSON
is committed because Grafana provisioning reads JSON. tests/unit/test_deploy_grafana.py
fails when the two disagree: after editing this file, run
`python deploy/grafana/build_dashboard.py`.

One piece is written by hand: the SDK's AnnotationQuery has no field for Prometheus'
annotation formats (titleFormat, textFormat, step), so `render` adds them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as grafana
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model

HERE = Path(__file__).resolve().parent
OUTPUTS = [
    HERE / "dashboards" / "loraplex.json",
    HERE.parent / "helm" / "loraplex" / "files" / "loraplex-dashboard.json",
]

DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
# Every router query is filtered by the two template variables.
SEL = 'adapter=~"$adapter", tenant=~"$tenant"'
RATE = "[$__rate_interval]"

# Threshold steps: (colour, value from which it applies); the first starts at -inf.
Steps = list[tuple[str, float | None]]
UP_IS_GREEN: Steps = [("red", None), ("green", 1)]
ALERT_ANNOTATION = "Alerts"


def query(expr: str, legend: str = "", ref: str = "A") -> prometheus.Dataquery:
    return (
        prometheus.Dataquery().datasource(DATASOURCE).expr(expr).legend_format(legend).ref_id(ref)
    )


def quantiles(
    metric: str, by: str, levels: tuple[float, ...], selector: str = SEL
) -> list[prometheus.Dataquery]:
    group = f"{by}, le" if by else "le"
    matchers = f"{{{selector}}}" if selector else ""
    legend_by = f" {{{{{by}}}}}" if by else ""
    return [
        query(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{matchers}{RATE})))",
            f"p{round(q * 100)}{legend_by}",
            chr(ord("A") + i),
        )
        for i, q in enumerate(levels)
    ]


def _thresholds(steps: Steps) -> grafana.ThresholdsConfig:
    return (
        grafana.ThresholdsConfig()
        .mode(model.ThresholdsMode.ABSOLUTE)
        .steps([model.Threshold(color=color, value=value) for color, value in steps])
    )


def stat_panel(
    title: str,
    targets: list[prometheus.Dataquery],
    *,
    unit: str = "short",
    width: int = 5,
    height: int = 4,
    description: str = "",
    thresholds: Steps | None = None,
) -> stat.Panel:
    """One number, its background coloured by `thresholds` when given."""
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(targets)
        .unit(unit)
        .span(width)
        .height(height)
        .reduce_options(
            common_builders.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False)
        )
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .graph_mode(common.BigValueGraphMode.AREA)
        .text_mode(common.BigValueTextMode.AUTO)
    )
    if thresholds:
        panel.thresholds(_thresholds(thresholds)).color_scheme(
            grafana.FieldColor().mode(model.FieldColorModeId.THRESHOLDS)
        )
    return panel


def graph_panel(
    title: str,
    targets: list[prometheus.Dataquery],
    *,
    unit: str = "short",
    width: int = 12,
    height: int = 8,
    description: str = "",
    stack: bool = False,
    thresholds: Steps | None = None,
) -> timeseries.Panel:
    """Lines over time with a table legend (mean, max, last) on the right."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(targets)
        .unit(unit)
        .span(width)
        .height(height)
        .draw_style(common.GraphDrawStyle.LINE)
        .line_width(1)
        .fill_opacity(10 if stack else 0)
        .stacking(
            common_builders.StackingConfig()
            .mode(common.StackingMode.NORMAL if stack else common.StackingMode.NONE)
            .group("A")
        )
        .show_points(common.VisibilityMode.NEVER)
        .span_nulls(False)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.RIGHT)
            .show_legend(True)
            .calcs(["mean", "max", "lastNotNull"])
        )
        .tooltip(
            common_builders.VizTooltipOptions()
            .mode(common.TooltipDisplayMode.MULTI)
            .sort(common.SortOrder.DESCENDING)
        )
    )
    if thresholds:
        panel.thresholds(_thresholds(thresholds)).color_scheme(
            grafana.FieldColor().mode(model.FieldColorModeId.THRESHOLDS)
        )
    return panel


def filter_variable(name: str, label: str, values_query: str) -> grafana.QueryVariable:
    """A multi-select label filter whose "All" matches every value (`.*`)."""
    return (
        grafana.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query({"query": values_query, "refId": f"{name}-values"})
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(model.VariableOption(selected=True, text=["All"], value=["$__all"]))
    )


# ---- rows ------------------------------------------------------------------------------


def overview() -> list[Any]:
    return [
        stat_panel(
            "Backend up",
            [query("min(loraplex_backend_up)", "backend up")],
            width=4,
            thresholds=UP_IS_GREEN,
            description="1 when every router has every backend replica up; 0 when any "
            "replica is ejected (see the Replicas row).",
        ),
        stat_panel(
            "Requests/s",
            [query(f"sum(rate(loraplex_requests_total{{{SEL}}}{RATE}))")],
            unit="reqps",
        ),
        stat_panel(
            "5xx error ratio",
            [
                query(
                    # `or vector(0)`: no 5xx series yet reads 0 %, not "No data".
                    f'(sum(rate(loraplex_requests_total{{{SEL}, status=~"5.."}}{RATE})) '
                    f"or vector(0)) / sum(rate(loraplex_requests_total{{{SEL}}}{RATE}))"
                )
            ],
            unit="percentunit",
            thresholds=[("green", None), ("orange", 0.01), ("red", 0.05)],
        ),
        stat_panel("In flight", [query(f"sum(loraplex_requests_in_flight{{{SEL}}})")]),
        stat_panel(
            "TTFT p95",
            quantiles("loraplex_time_to_first_token_seconds", "", (0.95,)),
            unit="s",
        ),
    ]


def traffic() -> list[Any]:
    return [
        graph_panel(
            "Requests/s by adapter and status",
            [
                query(
                    f"sum by (adapter, status) (rate(loraplex_requests_total{{{SEL}}}{RATE}))",
                    "{{adapter}} {{status}}",
                )
            ],
            unit="reqps",
            stack=True,
        ),
        graph_panel(
            "Requests/s by tenant",
            [
                query(
                    f"sum by (tenant) (rate(loraplex_requests_total{{{SEL}}}{RATE}))", "{{tenant}}"
                )
            ],
            unit="reqps",
            stack=True,
        ),
        graph_panel(
            "Tokens/s by adapter",
            [
                query(
                    f"sum by (adapter) (rate(loraplex_prompt_tokens_total{{{SEL}}}{RATE}))",
                    "prompt {{adapter}}",
                    "A",
                ),
                query(
                    f"sum by (adapter) (rate(loraplex_completion_tokens_total{{{SEL}}}{RATE}))",
                    "completion {{adapter}}",
                    "B",
                ),
            ],
            description="Prompt tokens read and completion tokens generated per second.",
        ),
        graph_panel(
            "Requests in flight by adapter",
            [query(f"sum by (adapter) (loraplex_requests_in_flight{{{SEL}}})", "{{adapter}}")],
            stack=True,
        ),
    ]


def replicas() -> list[Any]:
    adapter_decisions = 'decision!="least_loaded"'
    return [
        stat_panel(
            "Replicas up",
            [query('min(loraplex_backend_replicas{state="up"})', "up")],
            width=6,
            thresholds=UP_IS_GREEN,
            description="Backend replicas admitted and healthy (the fewest any router sees).",
        ),
        stat_panel(
            "Replicas ejected",
            [query('max(loraplex_backend_replicas{state="ejected"})', "ejected")],
            width=6,
            thresholds=[("green", None), ("orange", 1)],
            description="Replicas out of rotation after failed health checks or errors "
            "(the most any router has ejected).",
        ),
        stat_panel(
            "Affinity hit ratio",
            [
                query(
                    f'sum(rate(loraplex_picker_decisions_total{{decision="affinity_hit"}}{RATE})) '
                    f"/ sum(rate(loraplex_picker_decisions_total{{{adapter_decisions}}}{RATE}))"
                )
            ],
            unit="percentunit",
            width=6,
            description="Adapter requests sent to a replica that already held the adapter.",
        ),
        stat_panel(
            "Retries refused by the budget",
            [query("sum(increase(loraplex_retry_budget_exhausted_total[$__range]))")],
            width=6,
            thresholds=[("green", None), ("orange", 1)],
            description="Failed requests that a retry on another replica could have saved, "
            "in the time range shown.",
        ),
        graph_panel(
            "Replicas by router and state",
            [query("loraplex_backend_replicas", "{{instance}} {{state}}")],
        ),
        graph_panel(
            "In flight by backend replica",
            [query("sum by (backend) (loraplex_backend_in_flight)", "{{backend}}")],
            stack=True,
            description="Requests the routers have in flight on each replica; the picker keeps "
            "each under load_factor x the mean.",
        ),
        graph_panel(
            "Picker decisions/s by kind",
            [
                query(
                    f"sum by (decision) (rate(loraplex_picker_decisions_total{RATE}))",
                    "{{decision}}",
                )
            ],
            unit="ops",
            stack=True,
            description="least_loaded: base model; affinity_hit: a home replica that holds the "
            "adapter; miss: a home replica that does not (it loads the adapter); spill: every "
            "home replica was over the load bound.",
        ),
        graph_panel(
            "Adapter requests by picker decision",
            [
                query(
                    f"sum by (decision) (rate(loraplex_picker_decisions_total"
                    f"{{{adapter_decisions}}}{RATE})) / ignoring (decision) group_left "
                    f"sum(rate(loraplex_picker_decisions_total{{{adapter_decisions}}}{RATE}))",
                    "{{decision}}",
                )
            ],
            unit="percentunit",
            stack=True,
            description="Share of adapter requests: a falling affinity_hit share with rising "
            "miss means adapters are reloaded often (too few slots or replicas churning).",
        ),
        graph_panel(
            "Retries/s by reason",
            [
                query(
                    f"sum by (reason) (rate(loraplex_backend_retries_total{RATE}))",
                    "{{reason}}",
                    "A",
                ),
                query(
                    f"sum(rate(loraplex_retry_budget_exhausted_total{RATE}))",
                    "refused by the budget",
                    "B",
                ),
            ],
            unit="ops",
            description="Requests retried on another replica after the first failed before "
            "answering, and retries refused because the budget was spent.",
        ),
        graph_panel(
            "Ejections by replica and reason",
            [
                query(
                    f"sum by (backend, reason) (increase(loraplex_backend_ejections_total{RATE}))",
                    "{{backend}} {{reason}}",
                )
            ],
            description="health_check: failed probes; errors: consecutive failed requests.",
        ),
        graph_panel(
            "Stream interruptions per minute",
            [
                query(
                    f"sum(rate(loraplex_stream_interruptions_total{RATE})) * 60",
                    "interrupted streams/min",
                )
            ],
            description="Streams whose replica failed after the first byte: the client got "
            "an error event and [DONE] (they cannot be retried).",
        ),
        graph_panel(
            "Engine restarts by replica",
            [
                query(
                    f"sum by (instance, replica) (increase(loraplex_engine_restarts_total{RATE}))",
                    "{{instance}} engine {{replica}}",
                )
            ],
            description="Local engines restarted by `loraplex serve --replicas N` after they "
            "died or hung. On Kubernetes the kubelet restarts engine pods instead (see "
            "kube-state-metrics).",
        ),
        graph_panel(
            "Local engines up",
            [query("loraplex_engine_up", "{{instance}} engine {{replica}}")],
            width=24,
            height=6,
            thresholds=UP_IS_GREEN,
            description="1 while a local engine of `loraplex serve` answers /health; 0 while "
            "it is down or being restarted.",
        ),
    ]


def latency() -> list[Any]:
    return [
        graph_panel(
            "Time to first token p50/p95/p99 by adapter",
            quantiles("loraplex_time_to_first_token_seconds", "adapter", (0.5, 0.95, 0.99)),
            unit="s",
        ),
        graph_panel(
            "End-to-end latency p50/p95/p99 by adapter",
            quantiles("loraplex_request_duration_seconds", "adapter", (0.5, 0.95, 0.99)),
            unit="s",
        ),
        graph_panel(
            "Time per output token p50/p95 by adapter",
            quantiles("loraplex_time_per_output_token_seconds", "adapter", (0.5, 0.95)),
            unit="s",
        ),
        graph_panel(
            "TTFT SLO: share of requests slower than 2.5 s",
            [
                query("loraplex:ttft_slow_ratio:rate5m", "5m", "A"),
                query("loraplex:ttft_slow_ratio:rate1h", "1h", "B"),
            ],
            unit="percentunit",
            description="Recording rules from alerts.yml (all adapters). SLO: at most 1 %; "
            "LoraplexTTFTBudgetBurnFast fires above 14.4 % over 1h and 5m.",
            thresholds=[("green", None), ("red", 0.01)],
        ),
    ]


def adapters() -> list[Any]:
    adapter_sel = 'adapter=~"$adapter"'
    return [
        graph_panel(
            "Adapter loads/s by result",
            [
                query(
                    f"sum by (result) (rate(loraplex_adapter_loads_total{{{adapter_sel}}}{RATE}))",
                    "{{result}}",
                )
            ],
            unit="ops",
            stack=True,
            width=8,
            description="Requests sent to a replica that did not hold their adapter (by the "
            "router's record): the replica's resolver loads it on that request. vLLM's own LRU "
            "(max_cpu_loras) evicts adapters; those evictions are not counted here.",
        ),
        graph_panel(
            "Adapter load failures by adapter",
            [
                query(
                    f"sum by (adapter) (increase(loraplex_adapter_loads_total{{{adapter_sel}, "
                    f'result="error"}}{RATE}))',
                    "{{adapter}}",
                )
            ],
            width=8,
            description="Failed first requests for an adapter on a replica that did not "
            "hold it (its resolver could not load it); the router log says why.",
        ),
        graph_panel(
            "Adapter load latency p50/p95/p99",
            quantiles("loraplex_adapter_load_duration_seconds", "", (0.5, 0.95, 0.99), ""),
            unit="s",
            width=8,
            description="Time to the first answer of requests that made a replica load their "
            "adapter (fetch, verify, load into vLLM, then the request itself).",
        ),
    ]


def rollouts() -> list[Any]:
    """Weighted aliases (canary): each version's series carries `role` (incumbent, canary,
    or single for a name that resolves to one version) from router/version_metrics.py."""
    sel = 'adapter=~"$adapter"'
    by = "adapter, alias, version, role"
    legend = "{{adapter}}@{{alias}} {{version}} ({{role}})"
    return [
        graph_panel(
            "Canary vs incumbent",
            [
                query(
                    # `or ... * 0`: a version without any 5xx reads 0 %, not "No data".
                    f'(sum by ({by}) (rate(loraplex_version_requests_total{{{sel}, status=~"5.."}}'
                    f"{RATE})) or sum by ({by}) (rate(loraplex_version_requests_total{{{sel}}}"
                    f"{RATE})) * 0) / sum by ({by}) (rate(loraplex_version_requests_total"
                    f"{{{sel}}}{RATE}))",
                    legend,
                )
            ],
            unit="percentunit",
            width=6,
            description="Server-error (5xx) ratio of each version of a weighted alias. "
            "LoraplexCanaryErrorRateAboveIncumbent fires when a canary's is over twice its "
            "incumbent's; an alias with --guard rolls itself back (Automatic rollbacks).",
        ),
        graph_panel(
            "Requests/s by adapter version",
            [
                query(
                    f"sum by ({by}) (rate(loraplex_version_requests_total{{{sel}}}{RATE}))",
                    legend,
                )
            ],
            unit="reqps",
            width=6,
            description="The split as served: a 90/10 alias shows about nine incumbent "
            "requests per canary request (per end user, so fewer users give a rougher split).",
        ),
        graph_panel(
            "TTFT p95 by adapter version",
            [
                query(
                    f"histogram_quantile(0.95, sum by ({by}, le) "
                    f"(rate(loraplex_version_time_to_first_token_seconds_bucket{{{sel}}}{RATE})))",
                    legend,
                )
            ],
            unit="s",
            width=6,
            description="Streams only (a non-streamed answer has no first-token time).",
        ),
        graph_panel(
            "Automatic rollbacks",
            [
                query(
                    "sum by (adapter, alias, reason) "
                    f"(increase(loraplex_rollout_rollbacks_total{{{sel}}}{RATE}))",
                    "{{adapter}}@{{alias}} {{reason}}",
                )
            ],
            width=6,
            description="Weighted aliases moved back to their incumbent by their guard; "
            "`loraplex adapters list` shows each event with the numbers that tripped it.",
        ),
    ]


def tenants() -> list[Any]:
    return [
        graph_panel(
            "Quota rejections/s by tenant and limit",
            [
                query(
                    "sum by (tenant, limit) (rate(loraplex_quota_rejections_total"
                    f'{{tenant=~"$tenant"}}{RATE}))',
                    "{{tenant}} {{limit}}",
                )
            ],
            unit="reqps",
            stack=True,
        ),
        graph_panel(
            "Tokens/s by tenant",
            [
                query(
                    f"sum by (tenant) (rate(loraplex_prompt_tokens_total{{{SEL}}}{RATE}) "
                    f"+ rate(loraplex_completion_tokens_total{{{SEL}}}{RATE}))",
                    "{{tenant}}",
                )
            ],
            stack=True,
            description="Prompt plus completion tokens: what tokens-per-minute quotas count.",
        ),
    ]


def backend() -> list[Any]:
    return [
        graph_panel(
            "Backend replica up, by router",
            [query("loraplex_backend_up", "{{instance}} {{backend}}")],
            width=8,
            thresholds=UP_IS_GREEN,
        ),
        graph_panel(
            "vLLM requests running / waiting",
            [
                query("sum(vllm:num_requests_running)", "running", "A"),
                query("sum(vllm:num_requests_waiting)", "waiting", "B"),
            ],
            width=8,
        ),
        graph_panel(
            "vLLM KV cache usage",
            [query("max by (instance) (vllm:kv_cache_usage_perc)", "{{instance}}")],
            unit="percentunit",
            width=8,
        ),
        graph_panel(
            "TTFT p95: router vs engine",
            [
                *quantiles("loraplex_time_to_first_token_seconds", "", (0.95,)),
                query(
                    "histogram_quantile(0.95, sum by (le) "
                    f"(rate(vllm:time_to_first_token_seconds_bucket{RATE})))",
                    "engine p95",
                    "B",
                ),
            ],
            unit="s",
            width=8,
            description="The gap is the router's share: adapter resolution, picking a "
            "replica and proxying.",
        ),
        graph_panel(
            "vLLM generation tokens/s",
            [
                query(f"sum(rate(vllm:generation_tokens_total{RATE}))", "generated", "A"),
                query(f"sum(rate(vllm:prompt_tokens_total{RATE}))", "prompt", "B"),
            ],
            width=8,
        ),
        graph_panel(
            "vLLM preemptions/s",
            [query(f"sum(rate(vllm:num_preemptions_total{RATE}))", "preemptions")],
            unit="ops",
            width=8,
        ),
    ]


ROWS = [
    ("Overview", overview),
    ("Traffic", traffic),
    ("Replicas", replicas),
    ("Latency", latency),
    ("Adapters", adapters),
    ("Rollouts (canary vs incumbent)", rollouts),
    ("Tenants and quotas", tenants),
    ("Backend (vLLM)", backend),
]


def build() -> model.Dashboard:
    dashboard = (
        grafana.Dashboard("loraplex")
        .uid("loraplex-overview")
        .description(
            "Requests, tokens, latency, backend replicas, adapters, quotas and engine health."
        )
        .tags(["loraplex", "llm", "vllm"])
        .timezone("browser")
        .version(1)
        .editable()
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .refresh("30s")
        .time("now-1h", "now")
        .with_variable(
            grafana.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
        .with_variable(
            filter_variable("adapter", "Adapter", "label_values(loraplex_requests_total, adapter)")
        )
        .with_variable(
            filter_variable(
                "tenant",
                "Tenant",
                'label_values(loraplex_requests_total{adapter=~"$adapter"}, tenant)',
            )
        )
        .annotation(
            grafana.AnnotationQuery()
            .name(ALERT_ANNOTATION)
            .datasource(DATASOURCE)
            .enable(True)
            .icon_color("red")
            .expr('ALERTS{alertname=~"Loraplex.*", alertstate="firing"}')
        )
    )
    # The builder lays panels out left to right in rows of 24 grid units.
    for title, panels in ROWS:
        dashboard.with_row(grafana.Row(title))
        for panel in panels():
            dashboard.with_panel(panel)
    built = dashboard.build()
    # Grafana wants panel ids unique within the dashboard; the builder leaves them unset.
    for number, panel in enumerate(built.panels or [], start=1):
        panel.id_val = number
    return built


def render() -> str:
    dashboard = json.loads(json.dumps(build(), cls=JSONEncoder))
    for annotation in dashboard["annotations"]["list"]:
        if annotation["name"] == ALERT_ANNOTATION:
            annotation |= {
                "titleFormat": "{{alertname}}",
                "textFormat": "{{summary}}",
                "step": "60s",
            }
    return json.dumps(dashboard, indent=2) + "\n"


def main() -> None:
    text = render()
    for path in OUTPUTS:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path)


if __name__ == "__main__":
    main()
