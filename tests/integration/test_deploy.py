"""deploy/: Prometheus config and alert rules, the Grafana dashboard and the Kubernetes manifests, offline.

promtool (Debian's ``prometheus`` package) checks the scrape configs, the rules and the PromQL of every
dashboard panel; ``kubernetes-validate`` checks the manifests against its bundled Kubernetes 1.30 schemas
(no cluster, no network).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import Counter, Histogram

from handlers import metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
KUBERNETES = DEPLOY / "kubernetes"
DASHBOARD = DEPLOY / "grafana" / "lafam-serve.json"
KUBERNETES_VERSION = "1.30"

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian: prometheus) missing")


def series_names() -> set[str]:
    """Every series name the handlers export, derived from the metric objects in handlers/metrics.py."""
    names = set()
    for value in vars(metrics).values():
        if isinstance(value, Histogram):
            for family in value.describe():
                names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
        elif isinstance(value, Counter):
            for family in value.describe():
                names.add(family.name + "_total")
    return names


METRIC_NAME = re.compile(r"\b(lafam_[a-z_]+|ts_[a-z_]+)\b")


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *map(str, args)], capture_output=True, text=True, timeout=60, check=False)


def test_series_names_cover_the_readme_table() -> None:
    assert {
        "lafam_explanation_seconds_bucket",
        "lafam_inference_seconds_bucket",
        "lafam_batch_size_sum",
        "lafam_requests_total",
        "lafam_errors_total",
        "lafam_explanations_total",
    } <= series_names()


# --- Prometheus ---------------------------------------------------------------------------------------


@needs_promtool
def test_scrape_config_and_its_rules_pass_promtool() -> None:
    result = promtool("check", "config", PROMETHEUS / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout


def test_scrape_config_targets_lafam_and_torchserve_ports() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert targets == {"lafam": ["127.0.0.1:8083"], "torchserve": ["127.0.0.1:8082"]}
    assert config["rule_files"] == ["alerts.yml"]


@needs_promtool
def test_kubernetes_scrape_config_passes_promtool() -> None:
    result = promtool("check", "config", PROMETHEUS / "prometheus-kubernetes.yml")
    if "kubernetes_sd_configs not found" in result.stdout + result.stderr:
        pytest.skip("this promtool is built without Kubernetes service discovery (Debian's +ds build)")
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_scrape_config_keeps_the_deployments_port_names() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus-kubernetes.yml").read_text())
    deployment = yaml.safe_load((KUBERNETES / "deployment.yaml").read_text())
    ports = {p["name"]: p["containerPort"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    kept = {}
    for job in config["scrape_configs"]:
        rules = {tuple(r["source_labels"]): r for r in job["relabel_configs"]}
        kept[job["job_name"]] = rules[("__meta_kubernetes_pod_container_port_name",)]["regex"]
        targets = {r["target_label"] for r in job["relabel_configs"] if "target_label" in r}
        assert {"namespace", "pod"} <= targets  # what the Prometheus adapter maps back to pods
    assert {job: ports[name] for job, name in kept.items()} == {"lafam": 8083, "torchserve": 8082}


@needs_promtool
def test_alert_rules_pass_promtool() -> None:
    result = promtool("check", "rules", PROMETHEUS / "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_cover_latency_errors_and_targets_with_known_metrics() -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"][0]["rules"]
    names = {rule["alert"] for rule in rules}
    assert {
        "LafamExplanationLatencyHigh",
        "LafamInferenceLatencyHigh",
        "LafamErrorRateHigh",
        "LafamNoTargetUp",
    } <= names
    known = series_names()
    for rule in rules:
        assert set(METRIC_NAME.findall(rule["expr"])) <= known, rule["alert"]
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
    explanation = next(r for r in rules if r["alert"] == "LafamExplanationLatencyHigh")["expr"]
    assert "sum by (le, model, method)" in explanation


@needs_promtool
def test_alerts_fire_on_synthetic_series(tmp_path: Path) -> None:
    """promtool's rule unit tests: a 5xx ratio above 5 % and a dead target fire; a healthy server does not."""
    shutil.copy(PROMETHEUS / "alerts.yml", tmp_path / "alerts.yml")
    cases = {
        "rule_files": ["alerts.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": 'lafam_requests_total{model="shapes",status="2xx"}', "values": "0+90x20"},
                    {"series": 'lafam_requests_total{model="shapes",status="5xx"}', "values": "0+10x20"},
                    {"series": 'lafam_requests_total{model="ok",status="2xx"}', "values": "0+100x20"},
                    {"series": 'up{job="lafam",instance="a:8083"}', "values": "0x20"},
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "15m",
                        "alertname": "LafamErrorRateHigh",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "critical", "model": "shapes"},
                                "exp_annotations": {
                                    "summary": "shapes: 10% of requests fail with 5xx",
                                    "description": "More than 5 % of the requests to shapes failed with a server "
                                    "error over 5 minutes; see lafam_errors_total by code.",
                                },
                            }
                        ],
                    },
                    {"eval_time": "1m", "alertname": "LafamNoTargetUp", "exp_alerts": []},
                    {
                        "eval_time": "10m",
                        "alertname": "LafamNoTargetUp",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "critical"},
                                "exp_annotations": {
                                    "summary": "No lafam-serve metrics target is up",
                                    "description": "No lafam job target has been up for 5 minutes: the server is "
                                    "down or not discovered.",
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    }
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(cases, sort_keys=False))
    result = promtool("test", "rules", tmp_path / "tests.yml")
    assert result.returncode == 0, result.stdout + result.stderr


# --- Grafana ------------------------------------------------------------------------------------------


def dashboard_targets(dashboard: dict) -> list[tuple[dict, dict]]:
    return [(panel, target) for panel in dashboard["panels"] for target in panel["targets"]]


def test_dashboard_is_valid_json_with_a_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"model", "method"} <= set(variables)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel, target in dashboard_targets(dashboard):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_every_panel_queries_an_exported_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    known = series_names()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = set(METRIC_NAME.findall(target["expr"]))
            assert used, f"{panel['title']}: no lafam metric in {target['expr']}"
            assert used <= known, f"{panel['title']}: unknown {used - known}"
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("explanation latency", "throughput", "errors by code", "inference latency", "batch size"):
        assert topic in titles


@needs_promtool
def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """Every panel's query, with Grafana's variables filled in, is valid PromQL (as a recording rule)."""
    dashboard = json.loads(DASHBOARD.read_text())
    rules = []
    for index, (_, target) in enumerate(dashboard_targets(dashboard)):
        expr = target["expr"].replace("$__rate_interval", "1m").replace("$model", ".*").replace("$method", ".*")
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", tmp_path / "dashboard.yml")
    assert result.returncode == 0, result.stdout + result.stderr


# --- Kubernetes ---------------------------------------------------------------------------------------


def manifests() -> dict[str, dict]:
    """Every document under deploy/kubernetes/, by kind/name."""
    documents = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            documents[f"{document['kind']}/{document['metadata']['name']}"] = document
    return documents


@pytest.mark.parametrize("path", sorted(KUBERNETES.glob("*.yaml")), ids=lambda p: p.name)
def test_manifest_matches_the_kubernetes_schema(path: Path) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")  # dev extra
    for document in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_schema_validation_catches_a_broken_hpa() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    hpa = manifests()["HorizontalPodAutoscaler/lafam-serve"]
    hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"] = {"seconds": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(hpa, KUBERNETES_VERSION, strict=True)


def test_manifests_are_complete() -> None:
    assert set(manifests()) == {
        "ConfigMap/lafam-serve-config",
        "ConfigMap/prometheus-adapter-lafam",
        "Deployment/lafam-serve",
        "HorizontalPodAutoscaler/lafam-serve",
        "Service/lafam-serve",
    }


def test_config_map_listens_in_cluster_and_keeps_token_auth() -> None:
    text = manifests()["ConfigMap/lafam-serve-config"]["data"]["config.properties"]
    properties = dict(
        line.split("=", 1) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    )
    assert properties["inference_address"] == "http://0.0.0.0:8080"
    assert properties["management_address"].startswith("http://127.0.0.1:")
    assert properties["enable_model_api"] == "false"
    assert properties["metrics_mode"] == "prometheus"
    assert "disable_token_authorization" not in properties
    assert int(properties["token_expiration_min"]) > 0


def test_deployment_probes_resources_and_metrics_ports() -> None:
    pod = manifests()["Deployment/lafam-serve"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = " ".join(container[probe]["exec"]["command"])
        assert "/ping" in command
        assert "key_file.json" in command  # /ping needs the token as well
    assert set(container["resources"]) == {"requests", "limits"}
    env = {variable["name"]: variable["value"] for variable in container["env"]}
    assert env["LAFAM_METRICS_ADDRESS"] == "0.0.0.0:8083"
    metrics_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == env["LAFAM_METRICS_DIR"])
    assert {"name": metrics_mount["name"], "emptyDir": {}} in pod["spec"]["volumes"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "8083"


def test_service_exposes_inference_and_metrics_with_scrape_annotations() -> None:
    service = manifests()["Service/lafam-serve"]
    assert {port["port"] for port in service["spec"]["ports"]} >= {8080, 8083}
    assert service["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert service["metadata"]["annotations"]["prometheus.io/port"] == "8083"


def test_hpa_reads_the_metrics_the_adapter_serves() -> None:
    documents = manifests()
    hpa = documents["HorizontalPodAutoscaler/lafam-serve"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    adapter = yaml.safe_load(documents["ConfigMap/prometheus-adapter-lafam"]["data"]["config.yaml"])
    served = {rule["name"]["as"] for rule in adapter["rules"]}
    assert wanted
    assert wanted <= served
    for rule in adapter["rules"]:
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        assert "<<.LabelMatchers>>" in rule["metricsQuery"]
