"""The Helm chart, rendered by the real helm binary: lint-clean, every object valid against the Kubernetes schemas
(strict: unknown fields fail), RBAC equal to what the operator checks for at start-up, the CRD the same file as
crds/, values checked by values.schema.json. Bad values tried: a namespace name with capitals and underscores, an
unknown pull policy, a misspelt profile field, an unknown top-level key, the operator's metrics on its health port."""

from __future__ import annotations

import subprocess

import kubernetes_validate
import pytest
import yaml

from modeldeploy.config import OperatorConfig
from modeldeploy.reconcile.permissions import GATEWAY_RULES, OPTIONAL_RULES, RULES
from tests.helpers import REPO, helm_binary

CHART = REPO / "charts" / "modeldeploy"
K8S_SCHEMA_VERSION = "1.30.0"     # the oldest schema set kubernetes-validate carries is 1.25


@pytest.fixture(scope="module")
def helm() -> str:
    return helm_binary()


def template(helm: str, *args: str) -> list[dict]:
    done = subprocess.run([helm, "template", "md", str(CHART), "-n", "mdsys", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def template_error(helm: str, *args: str) -> str:
    done = subprocess.run([helm, "template", "md", str(CHART), *args], capture_output=True, text=True)
    assert done.returncode != 0, "helm accepted bad values"
    return done.stderr


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def test_lint_is_clean(helm):
    done = subprocess.run([helm, "lint", "--strict", str(CHART)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


@pytest.mark.parametrize("values", [
    [],
    ["--set", "watchNamespaces={team-a,team-b}"],
    ["--set", "monitoring.prometheusRule.enabled=true", "--set", "monitoring.dashboard.enabled=true",
     "--set", "monitoring.serviceMonitor.enabled=true"],
], ids=["defaults", "namespaced", "monitoring"])
def test_every_rendered_object_is_valid_kubernetes(helm, values):
    docs = template(helm, "--include-crds", *values)
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue   # the Prometheus Operator's kinds: checked in test_observability.py
        kubernetes_validate.validate(doc, K8S_SCHEMA_VERSION, strict=True)


def test_the_chart_crd_is_the_crds_file(helm):
    chart_crd = (CHART / "crds" / "modeldeploy.io_modeldeployments.yaml").read_bytes()
    assert chart_crd == (REPO / "crds" / "modeldeploy.io_modeldeployments.yaml").read_bytes()
    crds = by_kind(template(helm, "--include-crds"), "CustomResourceDefinition")
    assert [c["metadata"]["name"] for c in crds] == ["modeldeployments.modeldeploy.io"]


def rules_of(role: dict) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def expected(rules) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for group, resource, verbs in rules for verb in verbs}


def test_rbac_grants_exactly_what_the_operator_checks_for(helm):
    docs = template(helm)
    gateway, role = sorted(by_kind(docs, "ClusterRole"), key=lambda r: not r["metadata"]["name"].endswith("-gateway"))
    assert rules_of(role) == expected(RULES + OPTIONAL_RULES)
    assert gateway["metadata"]["name"].endswith("-gateway") and rules_of(gateway) == expected(GATEWAY_RULES)
    assert not by_kind(docs, "Role")
    never = template(helm, "--set", "monitoring.podMonitors=never")
    assert rules_of(by_kind(never, "ClusterRole")[-1]) == expected(RULES)
    assert len(by_kind(template(helm, "--set", "gateway.enabled=false"), "ClusterRole")) == 1
    # No wildcard, and no access to Secrets at all: the operator reads no Secret values (pods get them by
    # secretKeyRef, from the kubelet).
    assert not any("*" in item for item in rules_of(role))
    assert not {verb for group, resource, verb in rules_of(role) if resource == "secrets"}


def test_namespaced_watch_has_nothing_cluster_wide(helm):
    docs = template(helm, "--set", "watchNamespaces={team-a,team-b}")
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    roles = by_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-a", "team-b", "team-b"]
    gateway = [r for r in roles if r["metadata"]["name"].endswith("-gateway")]
    assert len(gateway) == 2 and all(rules_of(r) == expected(GATEWAY_RULES) for r in gateway)
    [args] = [d["spec"]["template"]["spec"]["containers"][0]["args"] for d in by_kind(docs, "Deployment")
              if d["metadata"]["name"].endswith("-gateway")]
    assert args[0] == "gateway" and "--namespace=team-a" in args and "--namespace=team-b" in args
    bindings = by_kind(docs, "RoleBinding")
    assert all(b["subjects"][0]["namespace"] == "mdsys" for b in bindings)
    config = yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["config.yaml"])
    assert OperatorConfig.model_validate(config).namespaces == ["team-a", "team-b"]


def test_values_reach_the_operator_configuration(helm):
    docs = template(helm, "--set", "image.repository=registry.example/md", "--set", "image.tag=dev",
                    "--set", "config.profiles.cpu.images.builtin=registry.example/rt:dev",
                    "--set", "config.cache.storageClassName=fast", "--set", "config.imagePullPolicy=Never",
                    "--set", "config.pull.collectIntervalSeconds=30")
    [configmap] = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-config")]
    config = OperatorConfig.model_validate(yaml.safe_load(configmap["data"]["config.yaml"]))
    assert config.operator_image == "registry.example/md:dev"
    assert config.profiles["cpu"].images["builtin"] == "registry.example/rt:dev"
    assert config.profiles["nvidia"].images["builtin"].startswith("ghcr.io/modeldeploy/")
    assert config.cache.storage_class_name == "fast" and config.image_pull_policy == "Never"
    assert config.pull.collect_interval_seconds == 30
    gateway, deployment = sorted(by_kind(docs, "Deployment"), key=lambda d: d["metadata"]["name"] != "md-modeldeploy-gateway")
    assert gateway["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/md:dev"
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "registry.example/md:dev"
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert "checksum/config" in deployment["spec"]["template"]["metadata"]["annotations"]


@pytest.mark.parametrize("values, message", [
    (["--set", "watchNamespaces={Team_A}"], "watchNamespaces"),
    (["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
    (["--set", "config.profiles.cpu.shmSise=1Gi"], "shmSise"),
    (["--set", "replicaCount=3"], "replicaCount"),
    (["--set", "monitoring.operatorMetrics.port=8081"], "port"),
    (["--set", "config.pull.collectIntervalSeconds=0"], "collectIntervalSeconds"),
])
def test_bad_values_are_refused_by_the_schema(helm, values, message):
    assert message in template_error(helm, *values)


def test_notes_tell_the_user_what_to_do_next(helm):
    done = subprocess.run([helm, "install", "md", str(CHART), "--dry-run=client", "-n", "mdsys"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "kind: ModelDeployment" in done.stdout and "kubectl wait mdep/minilm --for=condition=Ready" in done.stdout


def test_the_kustomize_base_is_the_chart_rendered_and_builds(helm):
    base = REPO / "examples" / "kustomize" / "base"
    rendered = subprocess.run([helm, "template", "modeldeploy", str(CHART), "--namespace", "modeldeploy-system",
                               "--include-crds"], capture_output=True, text=True, check=True).stdout
    committed = (base / "modeldeploy.yaml").read_text()
    assert committed.split("\n", 1)[1] == rendered, "stale: run hack/render-kustomize.sh"
    built = subprocess.run(["kubectl", "kustomize", str(base)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    assert {d["kind"] for d in docs} >= {"Namespace", "CustomResourceDefinition", "Deployment", "ClusterRole"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_SCHEMA_VERSION, strict=True)
        if doc["kind"] not in ("Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == "modeldeploy-system"
