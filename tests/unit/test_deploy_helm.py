"""deploy/helm/loraplex: rendered and linted by the real Helm library (helm-python-sdk bundles
it), manifests validated against the Kubernetes OpenAPI schemas (kubernetes-validate, offline),
and the chart's wiring checked: probes, GPU resources, secrets, ServiceMonitors, rules.

No cluster exists here: nothing is applied."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from loraplex.router.backend_pool import parse_discovery
from tests.unit.deploy_support import ALERTS, CHART, DASHBOARD, unknown_settings

helm = pytest.importorskip("helm_python", reason="helm-python-sdk not installed (test extras)")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

# The oldest Kubernetes the chart declares (kubeVersion) and the newest schemas at hand.
KUBE_VERSIONS = ["1.25.0", kubernetes_validate.latest_version()]
ADMIN = {"auth": {"adminKey": "test-admin-key"}}
FULL = {
    "auth": {"adminKey": "test-admin-key"},
    "router": {"replicas": 3, "autoscaling": {"enabled": True}},
    "database": {"postgresql": {"host": "pg.db.svc", "password": "p@ss/word"}},
    "registry": {
        "store": "s3://adapters/prod",
        "s3": {
            "endpointUrl": "http://minio:9000",
            "region": "eu-west-1",
            "accessKeyId": "AKIA",
            "secretAccessKey": "secret",
        },
    },
    "vllm": {"replicas": 3, "modelCache": {"persistence": {"enabled": True}}},
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
        "prometheusRule": {"enabled": True},
        "grafanaDashboard": {"enabled": True},
    },
}
CPU = {
    **ADMIN,
    "image": {"flavour": "cpu"},
    "vllm": {"gpu": {"enabled": False}},
    "networkPolicy": {"enabled": False},
    "sharedData": {"persistence": {"enabled": False}},
}


def render(values: dict) -> list[dict]:
    manifests = helm.Chart.load(str(CHART)).render(values, name="lp", namespace="ml")
    return [
        doc
        for path, text in manifests.items()
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def find(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, (kind, name, [(d["kind"], d["metadata"]["name"]) for d in docs])
    return matches[0]


def container(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("values", [ADMIN, FULL, CPU], ids=["defaults", "full", "cpu"])
def test_helm_lint_is_clean(values):
    report = helm.lint(str(CHART), values, strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", [ADMIN, FULL, CPU], ids=["defaults", "full", "cpu"])
def test_rendered_manifests_match_the_kubernetes_schemas(values, kube_version):
    checked = set()
    for doc in render(values):
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # CRDs: checked by their own tests below
        kubernetes_validate.validate(doc, kube_version, strict=True)
        checked.add(doc["kind"])
    assert {"Deployment", "Service", "ConfigMap", "Secret"} <= checked


def test_schema_validation_would_catch_a_typo():
    deployment = find(render(ADMIN), "Deployment", "lp-loraplex-router")
    deployment["spec"]["replicaz"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[-1], strict=True)


def test_install_without_an_admin_key_is_refused():
    with pytest.raises(helm.HelmError, match=r"auth\.adminKey is required"):
        render({})
    # A Secret managed outside the chart is fine.
    docs = render({"auth": {"existingSecret": "my-keys"}})
    env = {e["name"]: e for e in container(find(docs, "Deployment", "lp-loraplex-router"))["env"]}
    assert env["LORAPLEX_ADMIN_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "my-keys",
        "key": "admin-key",
    }


def test_several_routers_need_a_shared_database():
    with pytest.raises(helm.HelmError, match="needs a shared database"):
        render({**ADMIN, "router": {"replicas": 2}})
    with pytest.raises(helm.HelmError, match="needs a shared database"):
        render({**ADMIN, "router": {"autoscaling": {"enabled": True}}})


def test_router_deployment():
    docs = render(FULL)
    router = find(docs, "Deployment", "lp-loraplex-router")
    assert "replicas" not in router["spec"]  # the HPA owns it
    hpa = find(docs, "HorizontalPodAutoscaler", "lp-loraplex-router")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "lp-loraplex-router"
    main = container(router)
    assert main["args"] == ["router"]
    assert main["livenessProbe"]["httpGet"]["path"] == "/health"
    assert main["readinessProbe"]["httpGet"]["path"] == "/ready"
    env = {e["name"]: e for e in main["env"]}
    secret_refs = {
        n: e["valueFrom"]["secretKeyRef"]["key"] for n, e in env.items() if "valueFrom" in e
    }
    assert secret_refs == {
        "LORAPLEX_ADMIN_KEY": "admin-key",
        "LORAPLEX_DATABASE_URL": "database-url",
        "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
    }
    secret = find(docs, "Secret", "lp-loraplex-secrets")["stringData"]
    # The password is URL-quoted inside the SQLAlchemy URL.
    assert secret["database-url"] == (
        "postgresql+psycopg://loraplex:p%40ss%2Fword@pg.db.svc:5432/loraplex?sslmode=require"
    )
    assert find(docs, "PodDisruptionBudget", "lp-loraplex-router")["spec"]["minAvailable"] == 1
    config = find(docs, "ConfigMap", "lp-loraplex")["data"]
    # The engines are found by DNS, not given as one URL.
    assert env["LORAPLEX_BACKEND_DISCOVERY"]["value"] == "dns:lp-loraplex-vllm-headless.ml.svc:8100"
    assert "LORAPLEX_BACKEND_URL" not in config and "LORAPLEX_BACKEND_URL" not in env
    assert config["LORAPLEX_REGISTRY_STORE"] == "s3://adapters/prod"
    assert "LORAPLEX_DATABASE_URL" not in config  # comes from the Secret


def test_vllm_deployment_on_gpu_and_cpu():
    vllm = container(find(render(ADMIN), "Deployment", "lp-loraplex-vllm"))
    assert vllm["args"] == ["backend"]
    assert vllm["image"] == "loraplex:0.1.0-gpu"
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert vllm[probe]["httpGet"]["path"] == "/health"
    mounts = {m["name"]: m["mountPath"] for m in vllm["volumeMounts"]}
    assert mounts == {"data": "/var/lib/loraplex", "models": "/models", "shm": "/dev/shm"}

    cpu = container(find(render(CPU), "Deployment", "lp-loraplex-vllm"))
    assert cpu["image"] == "loraplex:0.1.0-cpu"
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})


def test_vllm_replicas_sit_behind_a_headless_service_the_router_discovers():
    docs = render(FULL)
    services = [
        d
        for d in docs
        if d["kind"] == "Service"
        and d["metadata"]["labels"]["app.kubernetes.io/component"] == "vllm"
    ]
    # One Service for the engines, and it has no virtual IP: a ClusterIP would spread
    # requests round-robin behind the router's back.
    assert [s["metadata"]["name"] for s in services] == ["lp-loraplex-vllm-headless"]
    headless = services[0]["spec"]
    assert headless["clusterIP"] == "None"
    assert headless["publishNotReadyAddresses"] is False  # starting engines are not addresses
    deployment = find(docs, "Deployment", "lp-loraplex-vllm")
    assert deployment["spec"]["replicas"] == 3
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert headless["selector"].items() <= pod_labels.items()
    vllm = container(deployment)
    port = headless["ports"][0]
    assert (
        port["targetPort"] == "http"
        and {"name": "http", "containerPort": port["port"]}.items() <= vllm["ports"][0].items()
    )
    router_env = {
        e["name"]: e.get("value")
        for e in container(find(docs, "Deployment", "lp-loraplex-router"))["env"]
    }
    # The router resolves exactly that Service, in the release's namespace, on that port
    # (read by the router's own parser).
    discovery = parse_discovery(router_env["LORAPLEX_BACKEND_DISCOVERY"])
    assert discovery == (f"{services[0]['metadata']['name']}.ml.svc", port["port"])
    interval = float(router_env["LORAPLEX_DISCOVERY_INTERVAL_S"])
    # Engines load adapters lazily through the plugin's resolvers: no pre-registration.
    env = {e["name"]: e.get("value") for e in vllm["env"]}
    assert env["VLLM_PLUGINS"] == "loraplex"
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    # A stopping engine keeps serving until every router has re-resolved the name.
    sleep = vllm["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert float(sleep.removeprefix("import time; time.sleep(").removesuffix(")")) > interval
    # Rolling, one engine at a time; no surge pod that would need a spare GPU.
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}
    budget = find(docs, "PodDisruptionBudget", "lp-loraplex-vllm")["spec"]
    assert budget["maxUnavailable"] == 1
    assert budget["selector"]["matchLabels"].items() <= pod_labels.items()
    # One engine: no budget (there is no other engine to keep serving during a drain).
    assert not [
        d
        for d in render(ADMIN)
        if d["kind"] == "PodDisruptionBudget" and d["metadata"]["name"] == "lp-loraplex-vllm"
    ]


def test_model_cache_and_shared_data_claims():
    docs = render(FULL)
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    assert claims["lp-loraplex-data"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "lp-loraplex-models" in claims
    volumes = find(docs, "Deployment", "lp-loraplex-vllm")["spec"]["template"]["spec"]["volumes"]
    by_name = {v["name"]: v for v in volumes}
    assert by_name["models"]["persistentVolumeClaim"]["claimName"] == "lp-loraplex-models"
    router_volumes = find(docs, "Deployment", "lp-loraplex-router")["spec"]["template"]["spec"][
        "volumes"
    ]
    assert router_volumes[0]["persistentVolumeClaim"]["claimName"] == "lp-loraplex-data"


def test_configuration_names_are_loraplex_settings():
    docs = render(FULL)
    names = set(find(docs, "ConfigMap", "lp-loraplex")["data"])
    for name in ("lp-loraplex-router", "lp-loraplex-vllm"):
        names |= {e["name"] for e in container(find(docs, "Deployment", name))["env"]}
    assert not unknown_settings(names)


def test_service_monitors_select_the_services_and_set_the_rules_job_names():
    docs = render(FULL)
    for component, job, service_name in (
        ("router", "loraplex-router", "lp-loraplex-router"),
        ("vllm", "loraplex-vllm", "lp-loraplex-vllm-headless"),
    ):
        monitor = find(docs, "ServiceMonitor", f"lp-loraplex-{component}")
        service = find(docs, "Service", service_name)
        assert monitor["metadata"]["labels"]["release"] == "kps"
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert selector.items() <= service["metadata"]["labels"].items()
        endpoint = monitor["spec"]["endpoints"][0]
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        assert endpoint["path"] == "/metrics"
        assert {"action": "replace", "targetLabel": "job", "replacement": job} in endpoint[
            "relabelings"
        ]
    assert not [d for d in render(ADMIN) if d["kind"] in {"ServiceMonitor", "PrometheusRule"}]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_prometheus_rule_carries_the_alert_rules(tmp_path):
    rule = find(render(FULL), "PrometheusRule", "lp-loraplex")
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text())
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rule["spec"]))
    result = subprocess.run(
        ["promtool", "check", "rules", "rules.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_config_map_for_the_grafana_sidecar():
    config_map = find(render(FULL), "ConfigMap", "lp-loraplex-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["data"]["loraplex.json"] == DASHBOARD.read_text().rstrip("\n")


def test_network_policy_admits_only_the_router_and_the_scrapers():
    policy = find(render(ADMIN), "NetworkPolicy", "lp-loraplex-vllm")
    sources = policy["spec"]["ingress"][0]["from"]
    assert sources[0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "router"
    assert sources[1]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }


def test_notes_render():
    notes = helm.Chart.load(str(CHART)).render(ADMIN, name="lp", namespace="ml")[
        "loraplex/templates/NOTES.txt"
    ]
    assert "lp-loraplex-router.ml.svc:8000/v1" in notes
    assert "loraplex keys create --tenant acme" in notes
