from __future__ import annotations

from modeldeploy.api import ModelDeploymentSpec
from modeldeploy.config import OperatorConfig
from modeldeploy.manifests.common import (ANNOTATION_MODEL, CACHE_MOUNT, LABEL_CACHE, MANAGED_BY, dns_name,
                                          operator_job_pod)


def build_cache_pvc(spec: ModelDeploymentSpec, config: OperatorConfig, size: str | None = None) -> dict:
    """The shared cache. Deliberately not owned by any ModelDeployment: deleting one must not delete weights that
    others use (the PVC stays until an admin deletes it). Its size: the user's, else `size` (the operator's
    estimate from the hub's file sizes), else the configured default."""
    storage_class = spec.cache.storage_class_name or config.cache.storage_class_name
    pvc = {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": spec.cache.claim_name, "labels": {**MANAGED_BY, "app.kubernetes.io/component": "cache"}},
        "spec": {"accessModes": [spec.cache.access_mode],
                 "resources": {"requests": {"storage": spec.cache.size or size or config.cache.size}}},
    }
    if storage_class:
        pvc["spec"]["storageClassName"] = storage_class
    return pvc


def build_prune_job(claim: str, model: str, commit: str, keep: list[str], config: OperatorConfig) -> dict:
    """The Job that takes one model's snapshot out of a cache once no ModelDeployment uses it: `modeldeploy prune`,
    with the cache mounted read-write, keeping every snapshot in `keep` (ORG/NAME@COMMIT) and every blob another
    snapshot still links. It reports through its termination message, like the pull."""
    labels = {**MANAGED_BY, "app.kubernetes.io/component": "prune", LABEL_CACHE: claim}
    args = ["prune", "--cache-dir", CACHE_MOUNT, "--model", model, "--commit", commit]
    for snapshot in sorted(keep):
        args += ["--keep", snapshot]
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": dns_name("prune", model.split("/")[-1], commit[:12]), "labels": labels,
                     "annotations": {ANNOTATION_MODEL: f"{model}@{commit}"}},
        "spec": {
            "backoffLimit": 2,
            "template": {
                "metadata": {"labels": labels},
                "spec": operator_job_pod(
                    config, "prune", args,
                    {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
                    [{"name": "cache", "mountPath": CACHE_MOUNT}],
                    [{"name": "cache", "persistentVolumeClaim": {"claimName": claim}}]),
            },
        },
    }
