"""The operator runs with the chart's RBAC, and a permission missing from it is caught at start-up, by name, before
any reconcile: the chart's own Role (rendered by helm) is bound to a ServiceAccount, and `modeldeploy operator
--check-permissions` runs with that ServiceAccount's token - once with the Role as the chart makes it, once with a
rule taken out."""

from __future__ import annotations

import base64
import subprocess
import sys

import yaml
from kubernetes import client

from tests.cluster.test_operator import crd  # noqa: F401  (fixture)
from tests.helpers import REPO, helm_binary, wait_for


def chart_role(namespace: str) -> dict:
    rendered = subprocess.run([helm_binary(), "template", "md", str(REPO / "charts" / "modeldeploy"), "-n", namespace,
                               "--set", f"watchNamespaces={{{namespace}}}"], capture_output=True, text=True, check=True)
    # The operator's Role, not the gateway's (the chart renders both).
    return next(d for d in yaml.safe_load_all(rendered.stdout)
                if d and d["kind"] == "Role" and d["metadata"]["name"] == "md-modeldeploy")


def service_account_kubeconfig(api_client, kubeconfig: str, namespace: str, name: str, path) -> str:
    core = client.CoreV1Api(api_client)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": name}})
    secret_name = wait_for(lambda: (core.read_namespaced_service_account(name, namespace).secrets or [None])[0],
                           60, "the ServiceAccount's token").name
    token = base64.b64decode(core.read_namespaced_secret(secret_name, namespace).data["token"]).decode()
    admin = yaml.safe_load(open(kubeconfig))
    config = {"apiVersion": "v1", "kind": "Config", "clusters": admin["clusters"],
              "users": [{"name": name, "user": {"token": token}}],
              "contexts": [{"name": name, "context": {"cluster": admin["clusters"][0]["name"], "user": name}}],
              "current-context": name}
    path.write_text(yaml.safe_dump(config))
    return str(path)


def rbac_allows(api_client, namespace: str, service_account: str, verb: str, resource: str,
                subresource: str = "") -> bool:
    review = client.AuthorizationV1Api(api_client).create_subject_access_review({
        "spec": {"user": f"system:serviceaccount:{namespace}:{service_account}",
                 "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
                 "resourceAttributes": {"namespace": namespace, "verb": verb, "resource": resource,
                                        "subresource": subresource}}})
    return review.status.allowed


def check_permissions(config: str, namespace: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modeldeploy", "operator", "--check-permissions",
                           "--namespace", namespace], capture_output=True, text=True, timeout=120,
                          env={"KUBECONFIG": config, "PATH": "/usr/bin:/bin"})


def test_the_charts_role_suffices_and_a_missing_rule_is_named(api_client, kubeconfig, crd, namespace,  # noqa: F811
                                                              tmp_path):
    rbac = client.RbacAuthorizationV1Api(api_client)
    role = chart_role(namespace)
    role["metadata"] = {"name": "operator", "namespace": namespace}
    rbac.create_namespaced_role(namespace, role)
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "operator"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "operator"},
        "subjects": [{"kind": "ServiceAccount", "name": "operator", "namespace": namespace}]})
    config = service_account_kubeconfig(api_client, kubeconfig, namespace, "operator", tmp_path / "sa.kubeconfig")
    # The API server authorises from an informer cache of Roles and bindings: wait until it has both, as seen by a
    # review the admin asks, so the check below tests the Role and not that cache's lag.
    wait_for(lambda: rbac_allows(api_client, namespace, "operator", "get", "pods", "log"), 30,
             "the API server's authoriser to see the new Role and binding")

    held = check_permissions(config, namespace)
    assert held.returncode == 0, held.stderr
    assert f"all permissions held (namespaces {namespace})" in held.stdout
    cluster_wide = subprocess.run([sys.executable, "-m", "modeldeploy", "operator", "--check-permissions"],
                                  capture_output=True, text=True, timeout=120, env={"KUBECONFIG": config})
    assert cluster_wide.returncode == 2 and "list modeldeployments.modeldeploy.io cluster-wide" in cluster_wide.stderr

    # Take the pod-log rule out (the one the pull progress needs): the check names exactly that permission.
    role["rules"] = [r for r in role["rules"] if r["resources"] != ["pods/log"]]
    rbac.replace_namespaced_role("operator", namespace, role)
    missing = wait_for(lambda: (result := check_permissions(config, namespace)).returncode == 2 and result, 30,
                       "the check to see the narrower Role")
    assert f"get pods/log in namespace {namespace}" in missing.stderr
    assert missing.stderr.count(" in namespace ") == 1                     # only that one
