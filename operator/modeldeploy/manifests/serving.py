"""The serving Deployment and Service: the engine's container pinned to the resolved commit, reading the cache
read-only and offline, placed by the accelerator profile, with the monitoring sidecar beside it."""

from __future__ import annotations

import copy

from modeldeploy.api import ModelDeploymentSpec
from modeldeploy.cache_layout import snapshot_dir
from modeldeploy.manifests.common import (ANNOTATION_MODEL, CACHE_MOUNT, LABEL_COMPONENT, LABEL_MDEP, mdep_labels,
                                          restricted_container_security, restricted_pod_security)
from modeldeploy.config import OperatorConfig, Profile

METRICS_PORT = 9090
OFFLINE_ENV = [{"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "TRANSFORMERS_OFFLINE", "value": "1"},
               {"name": "HOME", "value": "/tmp"}, {"name": "HF_HOME", "value": "/tmp/hf"}]


def server_selector(name: str) -> dict:
    return {LABEL_MDEP: name, LABEL_COMPONENT: "server"}


def merge_resources(*layers: dict) -> dict:
    merged: dict = {}
    for layer in layers:
        for section in ("requests", "limits"):
            if layer.get(section):
                merged.setdefault(section, {}).update(layer[section])
    return merged


def engine_container(spec: ModelDeploymentSpec, profile: Profile, config: OperatorConfig, commit: str,
                     gguf: str | None = None) -> dict:
    """The server container of each engine: image, command, port and health paths. `gguf`: the pulled file
    llama.cpp loads (pull.selection.served_gguf)."""
    snapshot = str(snapshot_dir(CACHE_MOUNT, spec.model.id, commit))
    engine = spec.runtime.engine
    image = spec.runtime.image or profile.images.get(engine)
    if engine == "builtin":
        quantization = spec.quantization_for(config)
        command = ["modeldeploy"]
        args = ["serve", "--model", spec.model.id, "--revision", commit, "--cache-dir", CACHE_MOUNT,
                "--task", spec.task, "--device", profile.device, "--quantization", quantization, "--port", "8080",
                "--max-batch-size", str(spec.runtime.batching.max_batch_size),
                "--max-delay-ms", str(spec.runtime.batching.max_delay_ms)]
        if spec.runtime.trust_remote_code:
            args.append("--trust-remote-code")
        if spec.model.allow_pickle:
            args.append("--allow-pickle")
        port, ready, live = 8080, "/v2/health/ready", "/v2/health/live"
    elif engine == "vllm":
        dtype = {"fp16": "float16", "bf16": "bfloat16", "none": "float32"}.get(spec.quantization_for(config), "auto")
        command, port, ready, live = None, 8000, "/health", "/health"
        args = ["--model", snapshot, "--served-model-name", spec.model.id, "--port", "8000", "--dtype", dtype]
        if spec.accelerator.count > 1:      # the GPUs the container is given: one shard of the model on each
            args += ["--tensor-parallel-size", str(spec.accelerator.count)]
        if spec.runtime.trust_remote_code:
            args.append("--trust-remote-code")
    elif engine == "llamacpp":
        if not gguf:
            raise ValueError("the llamacpp engine needs the pulled .gguf file to serve")
        command, port, ready, live = None, 8080, "/health", "/health"
        args = ["-m", f"{snapshot}/{gguf}", "--host", "0.0.0.0", "--port", "8080", "--alias", spec.model.id,
                "--metrics"]
    else:   # custom
        command, port, ready, live = None, spec.runtime.port, None, None
        args = []
    container = {
        "name": "server", "image": image, "imagePullPolicy": config.image_pull_policy,
        "args": args + spec.runtime.args,
        "env": OFFLINE_ENV + spec.runtime.env,
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "resources": merge_resources(
            profile.resources,
            {"limits": {profile.accelerator_resource: spec.accelerator.count}} if profile.accelerator_resource
            else {},
            spec.resources),
        "securityContext": restricted_container_security(),
        "volumeMounts": [{"name": "cache", "mountPath": CACHE_MOUNT, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }
    if command:
        container["command"] = command
    probe = (lambda path: {"httpGet": {"path": path, "port": "http"}}) if ready else (
        lambda _: {"tcpSocket": {"port": "http"}})
    # Loading a large model can take minutes: the startup probe allows up to 30 minutes before liveness applies.
    container["startupProbe"] = {**probe(live), "periodSeconds": 10, "failureThreshold": 180}
    container["livenessProbe"] = {**probe(live), "periodSeconds": 15, "failureThreshold": 4}
    container["readinessProbe"] = {**probe(ready), "periodSeconds": 5, "failureThreshold": 2}
    return container


def monitor_container(config: OperatorConfig, spec: ModelDeploymentSpec, server_port: int, probe_path: str | None,
                      commit: str) -> dict:
    """`probe_path`: the server's readiness path; None: a TCP connection is the probe (the custom engine)."""
    args = ["monitor", "--target", f"http://127.0.0.1:{server_port}", "--port", str(METRICS_PORT),
            "--cache-dir", CACHE_MOUNT, "--model", spec.model.id, "--revision", commit]
    args += ["--probe-path", probe_path] if probe_path else ["--probe-tcp"]
    return {
        "name": "monitor", "image": config.operator_image_for(spec.accelerator.profile),
        "imagePullPolicy": config.image_pull_policy,
        "command": ["modeldeploy"],
        "args": args,
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "10m", "memory": "48Mi"}, "limits": {"memory": "96Mi"}},
        "securityContext": restricted_container_security(),
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 20},
        "volumeMounts": [{"name": "cache", "mountPath": CACHE_MOUNT, "readOnly": True}],
    }


def build_deployment(name: str, spec: ModelDeploymentSpec, config: OperatorConfig, commit: str,
                     replicas: int | None = None, gguf: str | None = None) -> dict:
    """`replicas`: the count to run (ModelDeploymentSpec.wanted_replicas), else spec.replicas. `gguf`: for
    llama.cpp, the pulled file it loads."""
    profile = config.profiles[spec.accelerator.profile]
    server = engine_container(spec, profile, config, commit, gguf)
    containers = [server]
    annotations = {ANNOTATION_MODEL: f"{spec.model.source}:{spec.model.id}@{commit}"}
    if spec.monitoring.enabled:
        probe = server["readinessProbe"].get("httpGet", {}).get("path")
        containers.append(monitor_container(config, spec, server["ports"][0]["containerPort"], probe, commit))
        annotations.update({"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT),
                            "prometheus.io/path": "/metrics"})
    volumes = [{"name": "cache", "persistentVolumeClaim": {"claimName": spec.cache.claim_name, "readOnly": True}},
               {"name": "tmp", "emptyDir": {}}]
    if profile.shm_size:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": profile.shm_size}})
        server["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"})
    pod_spec = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": restricted_pod_security(),
        "containers": containers,
        "volumes": volumes,
        "nodeSelector": {**profile.node_selector, **spec.node_selector},
        "tolerations": copy.deepcopy(profile.tolerations) + spec.tolerations,
    }
    if spec.affinity:
        pod_spec["affinity"] = spec.affinity
    if profile.runtime_class_name:
        pod_spec["runtimeClassName"] = profile.runtime_class_name
    labels = mdep_labels(name, "server")
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": spec.replicas if replicas is None else replicas,
            "selector": {"matchLabels": server_selector(name)},
            "template": {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod_spec},
        },
    }


def build_service(name: str, spec: ModelDeploymentSpec) -> dict:
    ports = [{"name": "http", "port": spec.service.port, "targetPort": "http", "protocol": "TCP"}]
    if spec.monitoring.enabled:
        ports.append({"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"})
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "labels": mdep_labels(name, "server")},
        "spec": {"type": spec.service.type, "selector": server_selector(name), "ports": ports},
    }
