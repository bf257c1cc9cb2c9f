from __future__ import annotations

from modeldeploy.api import ModelDeploymentSpec
from modeldeploy.build.common import MANAGED_BY
from modeldeploy.config import OperatorConfig


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
