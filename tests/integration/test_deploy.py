"""deploy/: Prometheus config and alert rules, the Grafana dashboard and the Kubernetes manifests, offline.

promtool (Debian's ``prometheus`` package) checks the scrape configs, the rules and the PromQL of every
dashboard panel; ``kubernetes-validate`` checks the manifests against its bundled Kubernetes 1.30 schemas
(no cluster, no network). Its bundle has no schema for the custom resources (KServe's InferenceService,
KubeRay's RayService), so those are checked piecewise: their embedded pod specs as core ``v1/Pod`` objects
with ``kubernetes-validate``, the InferenceService against the KServe SDK's generated models (its OpenAPI
types), the RayService's ``serveConfigV2`` against Ray Serve's own ``ServeDeploySchema``, and the rest of
the RayService against the field names KubeRay's ``ray.io/v1`` types declare.
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


# API groups of the custom resources: not in kubernetes-validate's bundle, checked by the tests further down.
CUSTOM_RESOURCE_GROUPS = {"serving.kserve.io", "ray.io"}


def is_custom_resource(document: dict) -> bool:
    return document["apiVersion"].split("/")[0] in CUSTOM_RESOURCE_GROUPS


@pytest.mark.parametrize("path", sorted(KUBERNETES.glob("*.yaml")), ids=lambda p: p.name)
def test_manifest_matches_the_kubernetes_schema(path: Path) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")  # dev extra
    for document in yaml.safe_load_all(path.read_text()):
        if not is_custom_resource(document):
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
        "InferenceService/lafam-shapes",
        "RayService/lafam-shapes",
        "NetworkPolicy/lafam-shapes-ray",
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


# --- KServe and KubeRay (custom resources) -------------------------------------------------------------

LOOPBACK = {"127.0.0.1", "::1", "localhost"}
TOKEN_SECRET = ("lafam-token", "token")  # Secret name, key
# The fields of KServe's PredictorSpec that are not PodSpec fields (ComponentExtensionSpec, the model-format
# specs, ...): what is left of a predictor once they are dropped is a core PodSpec. Kept in step with the
# SDK by test_kserve_predictor_only_fields_match_the_sdk.
KSERVE_PREDICTOR_ONLY = {
    "annotations", "autoScaling", "batcher", "canaryTrafficPercent", "containerConcurrency", "deploymentStrategy",
    "huggingface", "labels", "lightgbm", "logger", "maxReplicas", "minReplicas", "model", "name", "onnx", "paddle",
    "pmml", "pytorch", "scaleMetric", "scaleMetricType", "scaleTarget", "sklearn", "storageContainerName",
    "storageUris", "tensorflow", "timeout", "triton", "workerSpec", "xgboost",
}  # fmt: skip
# Field names of KubeRay's ray.io/v1 types (RayServiceSpec, RayClusterSpec, HeadGroupSpec, WorkerGroupSpec,
# AutoscalerOptions) that the key check accepts, and those it requires.
RAY_SERVICE_FIELDS = {
    "serveConfigV2", "rayClusterConfig", "serveService", "upgradeStrategy", "excludeHeadPodFromServeSvc",
    "serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold", "rayClusterDeletionDelaySeconds",
}  # fmt: skip
RAY_CLUSTER_FIELDS = {
    "headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
    "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions",
}  # fmt: skip
RAY_HEAD_FIELDS = {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
RAY_WORKER_FIELDS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams", "template",
    "scaleStrategy", "suspend", "idleTimeoutSeconds",
}  # fmt: skip
RAY_AUTOSCALER_FIELDS = {
    "resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts", "securityContext",
    "idleTimeoutSeconds", "upscalingMode", "version",
}  # fmt: skip
# Ray Serve's proxy binds http_options.host, by default every interface (checked against ServeDeploySchema).
RAY_SERVE_DEFAULT_HOST = "0.0.0.0"


def inference_service() -> dict:
    return manifests()["InferenceService/lafam-shapes"]


def ray_service() -> dict:
    return manifests()["RayService/lafam-shapes"]


def serve_config() -> dict:
    return yaml.safe_load(ray_service()["spec"]["serveConfigV2"])


def pod_templates() -> dict[str, dict]:
    """Every pod the manifests make, as a PodTemplateSpec ({"metadata", "spec"}), by a readable name.

    The InferenceService's predictor is a PodSpec plus KServe's own fields; its ``labels`` and ``annotations``
    go onto the pod. A RayService's head and worker groups hold plain PodTemplateSpecs; KubeRay adds an
    autoscaler container to the head pod, from ``autoscalerOptions`` (its resources and security context are
    core types, so they are checked as a container of that pod too).
    """
    documents = manifests()
    pods = {"Deployment/lafam-serve": documents["Deployment/lafam-serve"]["spec"]["template"]}
    predictor = inference_service()["spec"]["predictor"]
    pods["InferenceService/lafam-shapes predictor"] = {
        "metadata": {"labels": predictor.get("labels", {}), "annotations": predictor.get("annotations", {})},
        "spec": {key: value for key, value in predictor.items() if key not in KSERVE_PREDICTOR_ONLY},
    }
    cluster = ray_service()["spec"]["rayClusterConfig"]
    head = json.loads(json.dumps(cluster["headGroupSpec"]["template"]))
    if cluster.get("enableInTreeAutoscaling"):
        options = cluster.get("autoscalerOptions", {})
        autoscaler = {"name": "autoscaler", "image": head["spec"]["containers"][0]["image"]}
        autoscaler |= {key: options[key] for key in ("resources", "securityContext", "env") if key in options}
        head["spec"]["containers"].append(autoscaler)
    pods["RayService/lafam-shapes head"] = head
    for group in cluster["workerGroupSpecs"]:
        pods[f"RayService/lafam-shapes worker {group['groupName']}"] = group["template"]
    return pods


def as_pod(name: str, template: dict) -> dict:
    metadata = {"name": re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-"), **template.get("metadata", {})}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}


def command_line(container: dict) -> list[str]:
    return [str(word) for word in container.get("command", []) + container.get("args", [])]


def option(words: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in a command line, or None."""
    for index, word in enumerate(words):
        if word == name and index + 1 < len(words):
            return words[index + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def secret_behind(pod: dict, container: dict, path: str) -> tuple[str, str] | None:
    """(Secret name, key) of the file ``path`` in ``container`` when a Secret volume provides it, else None."""
    volumes = {volume["name"]: volume for volume in pod["spec"].get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        secret = volumes[mount["name"]].get("secret")
        if secret is None or not path.startswith(prefix) or mount.get("subPath"):
            continue
        relative = path[len(prefix) :]
        items = secret.get("items")
        if items is None:  # every key appears as a file of its own name
            return secret["secretName"], relative
        for item in items:
            if item["path"] == relative:
                return secret["secretName"], item["key"]
    return None


def metrics_port(container: dict) -> str | None:
    env = {variable["name"]: variable.get("value") for variable in container.get("env", [])}
    address = env.get("LAFAM_METRICS_ADDRESS")
    return None if address is None else address.rsplit(":", 1)[1]


# a. The embedded pods against the core v1 schemas.


@pytest.mark.parametrize("name", sorted(pod_templates()))
def test_embedded_pod_matches_the_kubernetes_schema(name: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(as_pod(name, pod_templates()[name]), KUBERNETES_VERSION, strict=True)


def test_schema_validation_catches_a_broken_embedded_pod() -> None:
    """The wrapping really checks the embedded spec: a misspelt field or a wrong type in a predictor fails."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    name = "InferenceService/lafam-shapes predictor"
    pod = as_pod(name, pod_templates()[name])
    pod["spec"]["containers"][0]["volumeMount"] = pod["spec"]["containers"][0].pop("volumeMounts")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    pod = as_pod(name, pod_templates()[name])
    pod["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] = 8080
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("name", sorted(set(pod_templates()) - {"Deployment/lafam-serve"}))
def test_new_pods_run_locked_down_with_limits(name: str) -> None:
    spec = pod_templates()[name]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    for container in spec["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        assert {"cpu", "memory"} <= set(container["resources"]["limits"]), container["name"]
        if container["name"] != "autoscaler":  # KubeRay's sidecar, see rayservice.yaml
            assert context["readOnlyRootFilesystem"] is True, container["name"]
            mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
            assert "/tmp" in mounts, container["name"]  # the only writable scratch space


# b. The InferenceService against the KServe SDK's models.


def kserve_model(type_name: str) -> type:
    """A model class of the KServe SDK (serving.kserve.io types) or of the Kubernetes client it builds on."""
    import kserve.models
    import kubernetes.client.models

    model = getattr(kserve.models, type_name, None) or getattr(kubernetes.client.models, type_name, None)
    if model is None:
        raise TypeError(f"no model {type_name} in kserve.models or kubernetes.client.models")
    return model


class SchemaError(ValueError):
    """A manifest field that the SDK's types do not allow."""


def strict_load(data: object, type_name: str, path: str = "$") -> object:
    """Deserialise ``data`` into the SDK type ``type_name`` strictly.

    ``kserve.ApiClient().deserialize`` cannot do this: it resolves class names in ``kserve.models`` only (so it
    fails on the embedded Kubernetes types such as ``V1Container``), ignores unknown keys and coerces primitives
    (``int("4")``, ``str(4)``). Here every key must be one of the model's ``attribute_map`` names (at every
    level, down through containers, probes and volumes), every primitive must have its OpenAPI type, and each
    model is built through its constructor, which rejects missing required fields (the KServe models' setters;
    the Kubernetes client's models are pydantic models).
    """
    # Both generator styles occur: "list[X]"/"dict(str, X)" (KServe) and "List[X]"/"Dict[str, X]" (Kubernetes).
    if match := re.fullmatch(r"[lL]ist\[(.+)\]", type_name):
        if not isinstance(data, list):
            raise SchemaError(f"{path}: expected a list, got {data!r}")
        return [strict_load(item, match[1], f"{path}[{index}]") for index, item in enumerate(data)]
    if match := re.fullmatch(r"dict\(str, (.+)\)|Dict\[str, (.+)\]", type_name):
        if not isinstance(data, dict) or not all(isinstance(key, str) for key in data):
            raise SchemaError(f"{path}: expected a mapping with string keys, got {data!r}")
        return {key: strict_load(value, match[1] or match[2], f"{path}.{key}") for key, value in data.items()}
    primitives: dict[str, tuple[type, ...]] = {
        "str": (str,),
        "bytes": (str,),  # base64 in YAML/JSON
        "int": (int,),
        "float": (int, float),
        "bool": (bool,),
        "ResourceQuantity": (str, int, float),  # "500m", "6Gi", 2
    }
    if type_name in primitives:
        if not isinstance(data, primitives[type_name]) or (type_name != "bool" and isinstance(data, bool)):
            raise SchemaError(f"{path}: expected {type_name}, got {data!r}")
        return data
    if type_name == "object":  # IntOrString, free-form JSON
        return data
    if type_name in {"date", "datetime"}:
        if not isinstance(data, str):
            raise SchemaError(f"{path}: expected an RFC 3339 {type_name} string, got {data!r}")
        return data
    model = kserve_model(type_name)
    if not isinstance(data, dict):
        raise SchemaError(f"{path}: expected a {type_name} mapping, got {data!r}")
    attributes = {json_name: attribute for attribute, json_name in model.attribute_map.items()}
    unknown = set(data) - set(attributes)
    if unknown:
        raise SchemaError(f"{path}: {sorted(unknown)} not fields of {type_name}")
    arguments = {
        attributes[key]: strict_load(value, model.openapi_types[attributes[key]], f"{path}.{key}")
        for key, value in data.items()
    }
    try:
        return model(**arguments)
    except ValueError as error:
        raise SchemaError(f"{path}: {error}") from error


def test_kserve_predictor_only_fields_match_the_sdk() -> None:
    pytest.importorskip("kserve")
    predictor = set(kserve_model("V1beta1PredictorSpec").attribute_map.values())
    pod = set(kserve_model("V1PodSpec").attribute_map.values())
    assert predictor - pod == KSERVE_PREDICTOR_ONLY


def test_inference_service_matches_the_kserve_models() -> None:
    pytest.importorskip("kserve")
    document = inference_service()
    isvc = strict_load(document, "V1beta1InferenceService")
    assert isvc.api_version == "serving.kserve.io/v1beta1"
    assert isvc.kind == "InferenceService"
    predictor = isvc.spec.predictor
    # What the SDK types cannot say: KServe's custom-container conventions and the Standard mode's HPA.
    assert [container.name for container in predictor.containers] == ["kserve-container"]
    # Standard (called RawDeployment before KServe 0.16): Deployment + HPA, no Knative.
    assert document["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    assert predictor.scale_metric in {"cpu", "memory"}  # concurrency and rps need Knative
    assert 1 <= predictor.min_replicas <= predictor.max_replicas
    assert 0 < predictor.scale_target <= 100


def test_inference_service_serves_the_archive_from_its_storage_uri() -> None:
    container = inference_service()["spec"]["predictor"]["containers"][0]
    env = {variable["name"]: variable["value"] for variable in container["env"]}
    assert re.fullmatch(r"pvc://[a-z0-9-]+/.*", env["STORAGE_URI"])
    words = command_line(container)
    assert words[:4] == ["lafam-serve", "serve", "/mnt/models/shapes.mar", "--engine"]  # KServe mounts /mnt/models
    assert option(words, "--engine") == "kserve"
    assert option(words, "--port") == "8080"
    probes = {probe: container[probe]["httpGet"] for probe in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"] == {"path": "/v2/health/ready", "port": 8080}
    assert probes["livenessProbe"] == {"path": "/v2/health/live", "port": 8080}
    assert {port["containerPort"] for port in container["ports"]} == {8080, 8083}


@pytest.mark.parametrize(
    ("where", "key", "value"),
    [
        (("spec", "predictor"), "minReplica", 1),  # misspelt extension field
        (("spec", "predictor"), "maxReplicas", "4"),  # wrong type
        (("spec", "predictor", "containers", 0), "imagePullPolicies", "Always"),  # misspelt core field, nested
        (("spec", "predictor", "volumes", 0, "secret"), "defaultMode", "0440"),  # wrong type, nested
        (("spec",), "predictors", {}),  # misspelt top-level spec field
    ],
)
def test_kserve_check_catches_a_broken_inference_service(where: tuple, key: str, value: object) -> None:
    pytest.importorskip("kserve")
    document = inference_service()
    node = document
    for step in where:
        node = node[step]
    node[key] = value
    with pytest.raises(SchemaError, match=re.escape(key) if key != "maxReplicas" else "expected int"):
        strict_load(document, "V1beta1InferenceService")


def test_kserve_check_catches_a_missing_required_field() -> None:
    pytest.importorskip("kserve")
    document = inference_service()
    del document["spec"]["predictor"]["containers"][0]["name"]
    with pytest.raises(SchemaError, match="name"):
        strict_load(document, "V1beta1InferenceService")


# c. The RayService: serveConfigV2 against Ray Serve's schema, the rest against KubeRay's field names.


def validate_serve_config(config: dict) -> object:
    """ServeDeploySchema with unknown keys rejected at every level (Ray itself ignores them), and each
    deployment's autoscaling_config against AutoscalingConfig (the schema types it as ``dict | AutoscalingConfig``,
    so a plain dict is not looked into)."""
    schema = pytest.importorskip("ray.serve.schema")
    serve_config_module = pytest.importorskip("ray.serve.config")
    validated = schema.ServeDeploySchema.model_validate(config, extra="forbid")
    for application in config["applications"]:
        for deployment in application.get("deployments", []):
            if isinstance(deployment.get("autoscaling_config"), dict):
                serve_config_module.AutoscalingConfig.model_validate(deployment["autoscaling_config"], extra="forbid")
    return validated


def test_serve_config_matches_ray_serves_schema() -> None:
    validated = validate_serve_config(serve_config())
    (application,) = validated.applications
    assert application.import_path == "engines.ray_engine:build"  # a string only: the module is not imported
    assert application.route_prefix == "/"
    assert application.args == {
        "archives": ["/mnt/models/shapes.mar"],
        "token_file": "/var/run/secrets/lafam/token",
    }
    (deployment,) = application.deployments
    assert deployment.name == "LafamDeployment"
    assert deployment.max_ongoing_requests == 8
    assert deployment.autoscaling_config == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 4}
    assert deployment.ray_actor_options.num_cpus == 1
    schema = pytest.importorskip("ray.serve.schema")
    assert schema.HTTPOptionsSchema.model_fields["host"].default == RAY_SERVE_DEFAULT_HOST


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c["applications"][0]["deployments"][0].update(max_ongoing_request=8), "max_ongoing_request"),
        (lambda c: c["applications"][0]["deployments"][0]["autoscaling_config"].update(target=4), "target"),
        (lambda c: c["applications"][0]["deployments"][0]["autoscaling_config"].update(min_replicas=5), "replicas"),
        (lambda c: c["applications"][0]["deployments"][0]["ray_actor_options"].update(num_cpus="one"), "num_cpus"),
        (lambda c: c["applications"][0].pop("import_path"), "import_path"),
    ],
    ids=["deployment-typo", "autoscaling-typo", "min-above-max", "wrong-type", "no-import-path"],
)
def test_serve_schema_catches_a_broken_serve_config(mutate, message: str) -> None:
    pydantic = pytest.importorskip("pydantic")
    config = serve_config()
    mutate(config)
    with pytest.raises(pydantic.ValidationError, match=message):
        validate_serve_config(config)


def check_ray_service(document: dict) -> None:
    """The RayService around serveConfigV2 and the pod templates, by KubeRay's ray.io/v1 field names."""
    assert document["apiVersion"] == "ray.io/v1"
    assert document["kind"] == "RayService"
    assert set(document) <= {"apiVersion", "kind", "metadata", "spec"}
    spec = document["spec"]
    assert set(spec) <= RAY_SERVICE_FIELDS, set(spec) - RAY_SERVICE_FIELDS
    assert isinstance(spec["serveConfigV2"], str)  # a YAML document in a string, not a mapping
    cluster = spec["rayClusterConfig"]
    assert set(cluster) <= RAY_CLUSTER_FIELDS, set(cluster) - RAY_CLUSTER_FIELDS
    assert set(cluster.get("autoscalerOptions", {})) <= RAY_AUTOSCALER_FIELDS
    head = cluster["headGroupSpec"]
    assert set(head) <= RAY_HEAD_FIELDS, set(head) - RAY_HEAD_FIELDS
    assert {"rayStartParams", "template"} <= set(head)
    groups = cluster["workerGroupSpecs"]
    assert groups
    assert len({group["groupName"] for group in groups}) == len(groups)
    for group in [head, *groups]:
        params = group["rayStartParams"]
        assert all(isinstance(value, str) for value in params.values()), params  # map[string]string
        assert set(group["template"]) <= {"metadata", "spec"}
    for group in groups:
        assert set(group) <= RAY_WORKER_FIELDS, set(group) - RAY_WORKER_FIELDS
        assert {"groupName", "rayStartParams", "template", "replicas", "minReplicas", "maxReplicas"} <= set(group)
        counts = [group["minReplicas"], group["replicas"], group["maxReplicas"]]
        assert all(isinstance(count, int) and not isinstance(count, bool) for count in counts), counts
        assert 0 <= counts[0] <= counts[1] <= counts[2]
    if cluster.get("rayVersion") is not None:
        assert isinstance(cluster["rayVersion"], str)


def test_ray_service_has_kubrays_structure() -> None:
    document = ray_service()
    check_ray_service(document)
    cluster = document["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0"  # the ray[serve] pin
    assert cluster["enableInTreeAutoscaling"] is True  # the worker group scales between min and max
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # replicas go to the workers
    (group,) = cluster["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (1, 1, 4)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["spec"]["rayClusterConfig"].update(workerGroupSpec=[]),
        lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(minReplicas=5),
        lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].pop("groupName"),
        lambda d: d["spec"].update(serveConfigV2=yaml.safe_load(d["spec"]["serveConfigV2"])),
    ],
    ids=["typo", "non-string-param", "min-above-replicas", "no-group-name", "config-not-a-string"],
)
def test_ray_service_check_catches_a_broken_ray_service(mutate) -> None:
    document = ray_service()
    mutate(document)
    with pytest.raises((AssertionError, KeyError)):
        check_ray_service(document)


# d. Cross-checks: the token file, the listening addresses, the scrape annotations.


def test_token_file_comes_from_the_lafam_token_secret_everywhere() -> None:
    """--token-file (KServe) and args.token_file (Ray) name a file that the lafam-token Secret provides, in
    every container that serves; the shipped manifests never turn authentication off."""
    pods = pod_templates()
    predictor = pods["InferenceService/lafam-shapes predictor"]
    (container,) = predictor["spec"]["containers"]
    token_file = option(command_line(container), "--token-file")
    assert token_file is not None
    assert "--no-auth" not in command_line(container)
    assert secret_behind(predictor, container, token_file) == TOKEN_SECRET

    (application,) = serve_config()["applications"]
    token_file = application["args"]["token_file"]
    assert token_file == option(command_line(container), "--token-file")  # one path in both manifests
    for name, pod in pods.items():
        if name.startswith("RayService/"):
            ray_container = pod["spec"]["containers"][0]  # the Ray container (KubeRay: the first)
            assert secret_behind(pod, ray_container, token_file) == TOKEN_SECRET, name


def test_secret_check_notices_a_mismatch() -> None:
    predictor = pod_templates()["InferenceService/lafam-shapes predictor"]
    container = predictor["spec"]["containers"][0]
    assert secret_behind(predictor, container, "/var/run/secrets/lafam/other") is None
    predictor["spec"]["volumes"][0]["secret"]["items"][0]["key"] = "password"
    assert secret_behind(predictor, container, "/var/run/secrets/lafam/token") == ("lafam-token", "password")


def test_nothing_listens_beyond_loopback_unguarded() -> None:
    """A lafam-serve command with a non-loopback --host has --allow-remote; Ray Serve's proxy (non-loopback
    unless http_options.host says otherwise) only fronts applications that check a token; a Ray dashboard
    off loopback is admitted by a NetworkPolicy only from named sources."""
    commands = 0
    for name, pod in pod_templates().items():
        for container in pod["spec"]["containers"]:
            words = command_line(container)
            if not words or words[0] != "lafam-serve":
                continue
            commands += 1
            host = option(words, "--host")
            if host is not None and host not in LOOPBACK:
                assert "--allow-remote" in words, name
    assert commands >= 1

    config = serve_config()
    if config.get("http_options", {}).get("host", RAY_SERVE_DEFAULT_HOST) not in LOOPBACK:
        for application in config["applications"]:
            assert application["args"].get("token_file"), application["name"]

    cluster = ray_service()["spec"]["rayClusterConfig"]
    head_params = cluster["headGroupSpec"]["rayStartParams"]
    if head_params.get("dashboard-host", "0.0.0.0") not in LOOPBACK:  # KubeRay's default is 0.0.0.0
        port = int(head_params.get("dashboard-port", "8265"))
        head_labels = cluster["headGroupSpec"]["template"]["metadata"]["labels"]
        policies = [
            document
            for document in yaml.safe_load_all((KUBERNETES / "rayservice.yaml").read_text())
            if document["kind"] == "NetworkPolicy"
            and document["spec"]["podSelector"]["matchLabels"].items() <= head_labels.items()
            and "Ingress" in document["spec"]["policyTypes"]
        ]
        assert policies, "the Ray dashboard listens off loopback and no NetworkPolicy selects the head"
        for policy in policies:
            for rule in policy["spec"]["ingress"]:
                admits_dashboard = "ports" not in rule or any(p["port"] == port for p in rule["ports"])
                if admits_dashboard:
                    assert rule.get("from"), f"{policy['metadata']['name']} admits {port} from anywhere"


@pytest.mark.parametrize("name", sorted(pod_templates()))
def test_scrape_annotations_point_at_the_metrics_address(name: str) -> None:
    """Where a container exports LAFAM metrics, the pod is annotated for Prometheus on that port, the port is a
    named container port, and the multiprocess folder is the pod's own emptyDir; pods annotated for scraping
    export them."""
    pod = pod_templates()[name]
    annotations = pod["metadata"].get("annotations", {})
    exporters = [container for container in pod["spec"]["containers"] if metrics_port(container)]
    if not exporters:
        assert annotations.get("prometheus.io/scrape") != "true", name
        return
    (container,) = exporters
    port = metrics_port(container)
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == port
    assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"
    if "prometheus.kserve.io/port" in annotations or name.startswith("InferenceService/"):
        assert annotations["prometheus.kserve.io/port"] == port
    ports = {p.get("name"): str(p["containerPort"]) for p in container["ports"]}
    assert ports["lafam-metrics"] == port
    env = {variable["name"]: variable.get("value") for variable in container["env"]}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == env["LAFAM_METRICS_DIR"])
    assert {"name": mount["name"], "emptyDir": {}} in pod["spec"]["volumes"]
