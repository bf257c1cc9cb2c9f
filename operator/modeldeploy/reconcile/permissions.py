"""What the operator may do, stated once: the chart's RBAC grants exactly these rules (a unit test compares them),
and the operator asks the API server at start-up whether it holds them, so a missing permission is one clear error
at start instead of a 403 in the middle of a reconcile."""

from __future__ import annotations

from dataclasses import dataclass

from kubernetes import client

# (API group, resource, verbs) for every call the handlers and kopf make.
RULES: list[tuple[str, str, tuple[str, ...]]] = [
    ("modeldeploy.io", "modeldeployments", ("get", "list", "watch")),
    ("modeldeploy.io", "modeldeployments/status", ("get", "patch")),
    ("batch", "jobs", ("get", "list", "watch", "create", "patch", "delete")),   # patch: the pull's result kept on it
    ("apps", "deployments", ("list", "watch", "create", "patch", "update")),   # apply; update: see children.apply
    ("", "services", ("create", "patch")),
    ("", "persistentvolumeclaims", ("get", "list", "watch", "create", "patch")),   # patch: expanding the cache
    ("", "pods", ("list", "watch")),         # the pull Job's pods (termination message) and the servers' (why not ready)
    ("", "pods/log", ("get",)),              # pull progress: the pull pods hold no API token, they print it
    ("", "events", ("create", "list")),      # the operator and kopf post Events; a PVC's latest one says why it waits
]
# Only used when the Prometheus Operator's CRDs are installed (see monitoring); not checked at start-up.
OPTIONAL_RULES: list[tuple[str, str, tuple[str, ...]]] = [
    ("monitoring.coreos.com", "podmonitors", ("create", "patch")),
]


# `modeldeploy gateway`: it reads the models and their ready pod addresses, and writes only status.autoscaler.
GATEWAY_RULES: list[tuple[str, str, tuple[str, ...]]] = [
    ("modeldeploy.io", "modeldeployments", ("list", "watch")),
    ("modeldeploy.io", "modeldeployments/status", ("patch",)),
    ("", "endpoints", ("list", "watch")),
]


@dataclass(frozen=True)
class Missing:
    namespace: str | None
    group: str
    resource: str
    verb: str

    def __str__(self) -> str:
        where = f"in namespace {self.namespace}" if self.namespace else "cluster-wide"
        return f"{self.verb} {self.resource}{'.' + self.group if self.group else ''} {where}"


def missing_permissions(api: client.AuthorizationV1Api, namespaces: list[str],
                        rules: list[tuple[str, str, tuple[str, ...]]] = RULES) -> list[Missing]:
    """Asks with SelfSubjectAccessReviews (which any authenticated identity may create) for every rule."""
    missing = []
    for namespace in namespaces or [None]:
        for group, resource, verbs in rules:
            name, _, subresource = resource.partition("/")
            for verb in verbs:
                review = client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
                    resource_attributes=client.V1ResourceAttributes(
                        group=group, resource=name, subresource=subresource or None, verb=verb,
                        namespace=namespace or "")))
                if not api.create_self_subject_access_review(review).status.allowed:
                    missing.append(Missing(namespace, group, resource, verb))
    return missing
