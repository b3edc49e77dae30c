"""The router's Prometheus metrics: one definition per metric, shared by every module.

Names follow Prometheus conventions (`loraplex_` prefix, base units, `_total` for
counters). Labels `adapter` and `tenant` take user-controlled values, so their
cardinality is bounded: the first `max_label_values` distinct values of each keep
their own series; later ones are reported as `other` (and logged once).
The deploy/ dashboards and alert rules query exactly these names.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import Counter, Gauge, Histogram

log = logging.getLogger(__name__)

OVERFLOW_LABEL = "other"

# Latency buckets for an LLM: TTFT from tens of ms to minutes on CPU under load.
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

REQUESTS = Counter(
    "loraplex_requests",
    "Completed API requests by HTTP status.",
    ["adapter", "tenant", "status"],
)
PROMPT_TOKENS = Counter("loraplex_prompt_tokens", "Prompt tokens processed.", ["adapter", "tenant"])
COMPLETION_TOKENS = Counter(
    "loraplex_completion_tokens", "Completion tokens generated.", ["adapter", "tenant"]
)
TIME_TO_FIRST_TOKEN = Histogram(
    "loraplex_time_to_first_token_seconds",
    "Time from request to the first output token.",
    ["adapter", "tenant"],
    buckets=_LATENCY_BUCKETS,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "loraplex_time_per_output_token_seconds",
    "Mean time between output tokens of a request.",
    ["adapter", "tenant"],
    buckets=_PER_TOKEN_BUCKETS,
)
REQUEST_DURATION = Histogram(
    "loraplex_request_duration_seconds",
    "End-to-end request latency.",
    ["adapter", "tenant"],
    buckets=_LATENCY_BUCKETS,
)
IN_FLIGHT = Gauge("loraplex_requests_in_flight", "Requests being served.", ["adapter", "tenant"])
QUOTA_REJECTIONS = Counter(
    "loraplex_quota_rejections",
    "Requests refused with 429, by the limit that was hit.",
    ["tenant", "limit"],
)
ADAPTER_LOADS = Counter(
    "loraplex_adapter_loads",
    "Adapter requests sent to a backend replica whose router-side record does not hold the "
    "adapter (the replica's resolver loads it on that request), by result: success when the "
    "replica answered 2xx, error otherwise.",
    ["adapter", "result"],
)
ADAPTER_LOAD_DURATION = Histogram(
    "loraplex_adapter_load_duration_seconds",
    "Time to the first answer of a request that made a replica load its adapter (the whole "
    "answer when not streamed).",
    buckets=_LATENCY_BUCKETS,
)

# ---- scale-out: backends as a set (router/backend_pool.py, router/forwarding.py) ----
# `backend` label values are backend URLs, bounded by a LabelLimiter (DNS discovery may
# bring an unbounded stream of pod IPs over time).
BACKEND_UP = Gauge(
    "loraplex_backend_up",
    "1 when the backend replica is admitted and healthy, 0 when it is ejected.",
    ["backend"],
)
BACKEND_REPLICAS = Gauge(
    "loraplex_backend_replicas", "Backend replicas known to the router, by state.", ["state"]
)
BACKEND_IN_FLIGHT = Gauge(
    "loraplex_backend_in_flight", "Requests the router has in flight on a replica.", ["backend"]
)
PICKER_DECISIONS = Counter(
    "loraplex_picker_decisions",
    "Replica choices by kind: least_loaded (base model), affinity_hit (a candidate that holds "
    "the adapter), miss (a candidate that does not), spill (no candidate under the load bound).",
    ["decision"],
)
BACKEND_RETRIES = Counter(
    "loraplex_backend_retries",
    "Requests retried on another replica, by what failed on the first: connect, reset, "
    "status_502, status_503, engine_dead (vLLM's 500 when its engine core died) (504 and read "
    "timeouts are never retried: the request may have run).",
    ["reason"],
)
RETRY_BUDGET_EXHAUSTED = Counter(
    "loraplex_retry_budget_exhausted",
    "Retries wanted but refused because the retry budget (share of requests per minute) was spent.",
)
BACKEND_EJECTIONS = Counter(
    "loraplex_backend_ejections",
    "Replicas taken out of rotation, by why: health_check (failed probes) or errors "
    "(consecutive failed requests).",
    ["backend", "reason"],
)
STREAM_INTERRUPTIONS = Counter(
    "loraplex_stream_interruptions",
    "Streams that broke after their first byte; the client got an error event and [DONE].",
)


class LabelLimiter:
    """Caps the distinct values one label may take; the rest become `other`."""

    def __init__(self, label: str, max_values: int) -> None:
        self.label = label
        self.max_values = max_values
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._warned = False

    def known(self, value: str) -> bool:
        """Whether `value` already has its own series (without claiming a place for it)."""
        return value in self._seen

    def __call__(self, value: str | None) -> str:
        value = value or "none"
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) < self.max_values:
                self._seen.add(value)
                return value
            if not self._warned:
                self._warned = True
                log.warning(
                    "metric label limit reached; further values are reported as 'other'",
                    extra={"label": self.label, "max_values": self.max_values},
                )
        return OVERFLOW_LABEL
