"""Names, labels and security settings every builder shares."""

from __future__ import annotations

import copy
import hashlib
import json
import re

from modeldeploy import endpoints
from modeldeploy.api import ModelDeploymentSpec
from modeldeploy.config import OperatorConfig

LABEL_MDEP = "modeldeploy.io/model-deployment"
LABEL_WEIGHTS = "modeldeploy.io/weights"
LABEL_CACHE = "modeldeploy.io/cache"
LABEL_COMPONENT = "app.kubernetes.io/component"
MANAGED_BY = {"app.kubernetes.io/managed-by": "modeldeploy", "app.kubernetes.io/part-of": "modeldeploy"}
ANNOTATION_MODEL = "modeldeploy.io/model"
CACHE_MOUNT = "/cache"
RUNTIME_UID = 65532


def weights_key(spec: ModelDeploymentSpec, config: OperatorConfig) -> str:
    """Content address of a pull: every ModelDeployment that needs the same files in the same cache, fetched the same
    way (endpoints, token, proxy), shares one pull Job (never keyed by a resource's UID, which would download the
    same model once per resource). Two resources that differ in how they pull get Jobs of their own: one Job must
    not carry one resource's token or proxy for another."""
    ref = spec.model.token_secret_ref
    identity = {"cache": spec.cache.claim_name, "source": spec.model.source,
                "endpoints": endpoints.pull_endpoints(spec, config), "model": spec.model.id,
                "revision": spec.model.revision, "files": sorted(spec.model.files or []),
                "pickle": spec.model.allow_pickle, "token": f"{ref.name}/{ref.key}" if ref else "",
                "proxy": proxy_secret(spec, config) or ""}
    if spec.runtime.engine == "llamacpp":     # selects other files (GGUF) than the same spec for other engines
        identity["gguf"] = True
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def dns_name(*parts: str, limit: int = 63) -> str:
    """A DNS-1123 label from parts; the last part (a hash) is always kept whole."""
    *prefix, last = parts
    head = re.sub(r"[^a-z0-9-]+", "-", "-".join(prefix).lower()).strip("-")
    head = head[: limit - len(last) - 1].rstrip("-")
    return f"{head}-{last}" if head else last


def pull_job_name(spec: ModelDeploymentSpec, key: str) -> str:
    return dns_name("pull", spec.model.id.split("/")[-1], key)


def mdep_labels(name: str, component: str) -> dict:
    return {**MANAGED_BY, LABEL_MDEP: name, LABEL_COMPONENT: component, "app.kubernetes.io/instance": name}


def restricted_container_security() -> dict:
    return {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]}}


def restricted_pod_security() -> dict:
    return {"runAsNonRoot": True, "runAsUser": RUNTIME_UID, "runAsGroup": RUNTIME_UID, "fsGroup": RUNTIME_UID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def proxy_secret(spec: ModelDeploymentSpec, config: OperatorConfig) -> str | None:
    return spec.download.proxy.secret_name if spec.download.proxy else config.pull.proxy_secret


def operator_job_pod(config: OperatorConfig, name: str, args: list[str], resources: dict, mounts: list[dict],
                     volumes: list[dict], env: list[dict] | None = None, profile: str | None = None) -> dict:
    """The pod of a Job that runs `modeldeploy <args>` in the operator image: no service-account token, restricted,
    reporting through its log and termination message. A `profile` with an operator image of its own places it on
    that profile's nodes, which that image is built for."""
    placement = config.profiles.get(profile or "")
    placement = placement if placement and placement.operator_image else None
    container = {"name": name, "image": placement.operator_image if placement else config.operator_image,
                 "imagePullPolicy": config.image_pull_policy,
                 "command": ["modeldeploy"], "args": args, "resources": resources,
                 "securityContext": restricted_container_security(), "volumeMounts": mounts}
    if env:
        container["env"] = env
    pod = {"restartPolicy": "Never", "automountServiceAccountToken": False, "enableServiceLinks": False,
           "securityContext": restricted_pod_security(), "nodeSelector": {"kubernetes.io/os": "linux"},
           "containers": [container], "volumes": volumes}
    if placement:
        pod["nodeSelector"].update(placement.node_selector)
        pod["tolerations"] = copy.deepcopy(placement.tolerations)
    return pod
