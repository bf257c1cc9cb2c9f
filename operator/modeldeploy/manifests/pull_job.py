from __future__ import annotations

from modeldeploy import endpoints
from modeldeploy.api import ModelDeploymentSpec
from modeldeploy.config import OperatorConfig
from modeldeploy.manifests.common import (ANNOTATION_MODEL, CACHE_MOUNT, LABEL_WEIGHTS, MANAGED_BY,
                                          operator_job_pod, proxy_secret, pull_job_name)
from modeldeploy.pull.errors import EXITS_FOR_GOOD
from modeldeploy.pull.sources import SOURCES

PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY")


def build_pull_job(spec: ModelDeploymentSpec, config: OperatorConfig, key: str, commit: str | None = None) -> dict:
    """The Job that fills the cache. Shared by every ModelDeployment with the same weights key, so owned by none.
    The pod gets no service-account token and sees only its own source's token Secret; it reports through its log
    (progress lines) and its termination message (the result)."""
    revision = commit or spec.model.revision     # the commit a branch resolved to, once known: pinned
    args = ["pull", "--source", spec.model.source, "--model", spec.model.id, "--revision", revision,
            "--cache-dir", CACHE_MOUNT, "--timeout", str(spec.download.timeout_seconds),
            "--retries", str(spec.download.retries), "--stall-timeout", str(spec.download.stall_seconds),
            "--deadline", str(max(60, spec.download.deadline_seconds - 30)), "--progress-interval", "5"]
    if spec.model.allow_pickle:
        args.append("--allow-pickle")
    if spec.runtime.engine == "llamacpp":
        args.append("--gguf")
    for endpoint in endpoints.pull_endpoints(spec, config):
        args += ["--endpoint", endpoint]
    if spec.model.files:   # after "--": whatever a pattern says, it is never an option
        args += ["--", *spec.model.files]

    env = [{"name": "HOME", "value": "/tmp"}, {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"}]
    if spec.model.token_secret_ref:
        ref = spec.model.token_secret_ref
        env.append({"name": SOURCES[spec.model.source].token_env,
                    "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    if proxy := proxy_secret(spec, config):
        env += [{"name": v, "valueFrom": {"secretKeyRef": {"name": proxy, "key": v, "optional": True}}}
                for v in PROXY_VARIABLES]

    labels = {**MANAGED_BY, "app.kubernetes.io/component": "pull", LABEL_WEIGHTS: key}
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": pull_job_name(spec, key), "labels": labels,
                     "annotations": {ANNOTATION_MODEL: f"{spec.model.source}:{spec.model.id}@{spec.model.revision}"}},
        "spec": {
            "backoffLimit": config.pull.backoff_limit,
            # Kubernetes 1.26+: a permanent failure ends the Job at once, and a pod evicted or preempted does not
            # count against backoffLimit. Older API servers drop the field; the operator still stalls at the first
            # permanent failure (reconcile/pull_state.py) and lets the retries run out.
            "podFailurePolicy": {"rules": [
                {"action": "FailJob", "onExitCodes": {"containerName": "pull", "operator": "In",
                                                      "values": sorted(set(EXITS_FOR_GOOD))}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]},
            "activeDeadlineSeconds": spec.download.deadline_seconds,
            "template": {
                "metadata": {"labels": labels},
                "spec": operator_job_pod(
                    config, "pull", args, config.pull.resources,
                    [{"name": "cache", "mountPath": CACHE_MOUNT}, {"name": "tmp", "mountPath": "/tmp"}],
                    [{"name": "cache", "persistentVolumeClaim": {"claimName": spec.cache.claim_name}},
                     {"name": "tmp", "emptyDir": {}}], env, spec.accelerator.profile),
            },
        },
    }
