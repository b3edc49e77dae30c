"""The rollout parts of deploy/: the dashboard's "Canary vs incumbent" row and the alert on a
canary failing more than its incumbent query series and label values the router emits
(their behaviour: promtool's unit test in deploy/prometheus/alerts.test.yml)."""

from __future__ import annotations

import json
import re

from loraplex.router.version_metrics import VERSION_REQUESTS
from tests.unit.deploy_support import DEPLOY, alert_rules

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "loraplex.json"
ROLES = {"single", "incumbent", "canary"}  # router/adapter_loading.py ServedAdapter.role


def test_canary_vs_incumbent_panel_compares_versions_by_role():
    panels = {p["title"]: p for p in json.loads(DASHBOARD.read_text())["panels"]}
    [target] = panels["Canary vs incumbent"]["targets"]
    assert "loraplex_version_requests_total" in target["expr"]
    assert "sum by (adapter, alias, version, role)" in target["expr"]
    assert {"Requests/s by adapter version", "Automatic rollbacks"} <= set(panels)


def test_canary_alert_compares_roles_the_router_emits():
    [rule] = [r for r in alert_rules() if r["alert"] == "LoraplexCanaryErrorRateAboveIncumbent"]
    roles = set(re.findall(r'role="([a-z]+)"', rule["expr"]))
    assert roles == {"canary", "incumbent"} and roles <= ROLES
    assert "role" in VERSION_REQUESTS._labelnames and "alias" in VERSION_REQUESTS._labelnames
