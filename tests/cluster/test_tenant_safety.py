"""A shared cluster with mutually untrusting namespaces: what a user who may create ModelDeployments can and cannot
make the operator do, tried on the real cluster.

Refused by the API server at apply, the field named (the CRD's schema): model ids the Hub refuses (`org/x..y`,
`a--b/c`, `org/m.git`, a trailing or leading '-', three parts, a space), revisions that leave `refs/` or are not git
ref names (`main/../../../x`, `-h`, `.hidden`, `v1.lock`, `a//b`, a trailing '.'), file patterns that would be options
or leave the repository (`--token-env=HTTPS_PROXY`, `-h`, `../../etc/passwd`, `a/../../b`, a backslash, a newline),
endpoints with credentials, a query, a fragment or another scheme, Secret names and keys that are not Kubernetes
names, and resource names whose Deployment, Service or labels would be refused (64 characters, `my.model`,
`7b-chat`).

Stalled with reason InvalidSpec, an Event, and nothing created (no PVC, Job, Deployment or Service): an endpoint the
admin did not allow (cloud metadata, an in-cluster service address, an attacker's host), one whose port is not a
port, a token sent over plain http:// to an endpoint not marked for it, `--trust-remote-code` smuggled through
runtime.args.

With the project's images: a token Secret that does not exist shows as the pull pod's CreateContainerConfigError in
the status (the operator reads no Secret); ten ModelDeployments whose endpoint accepts connections and never answers
do not delay an unrelated ModelDeployment's Ready."""

from __future__ import annotations

import time
import uuid

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.cluster.test_operator import GROUP, PLURAL, VERSION, condition, crd, events_for, mdep, stall_of  # noqa: F401
from tests.cluster.test_operator_pull import NODE_ADDRESS
from tests.helpers import BlackHole, operator_process, wait_for
from tests.hubserver import HubServer, Repo
from tests.models import minilm_dir

ALLOWED_HTTP = "http://mirror.internal:8080"


@pytest.fixture(scope="module")
def shared_namespace(api_client, crd):  # noqa: F811
    """One namespace for the schema's refusals (nothing is created in it)."""
    core = client.CoreV1Api(api_client)
    name = f"t-schema-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)


SCHEMA_REFUSALS = {
    # model ids the Hub itself refuses
    "id-double-dot": ({"model": {"id": "org/x..y"}}, "spec.model.id"),
    "id-double-dash": ({"model": {"id": "a--b/c"}}, "spec.model.id"),
    "id-dot-git": ({"model": {"id": "org/m.git"}}, "spec.model.id"),
    "id-trailing-dash": ({"model": {"id": "org/m-"}}, "spec.model.id"),
    "id-leading-dash": ({"model": {"id": "-org/m"}}, "spec.model.id"),
    "id-three-parts": ({"model": {"id": "org/m/x"}}, "spec.model.id"),
    "id-space": ({"model": {"id": "org/m x"}}, "spec.model.id"),
    # revisions that leave refs/ or are not ref names
    "revision-traversal": ({"model": {"id": "org/m", "revision": "main/../../../x"}}, "spec.model.revision"),
    "revision-option": ({"model": {"id": "org/m", "revision": "-h"}}, "spec.model.revision"),
    "revision-hidden": ({"model": {"id": "org/m", "revision": ".hidden"}}, "spec.model.revision"),
    "revision-lock": ({"model": {"id": "org/m", "revision": "v1.lock"}}, "spec.model.revision"),
    "revision-empty-segment": ({"model": {"id": "org/m", "revision": "a//b"}}, "spec.model.revision"),
    "revision-trailing-dot": ({"model": {"id": "org/m", "revision": "v1."}}, "spec.model.revision"),
    # file patterns that would be options for the puller or leave the repository
    "files-option": ({"model": {"id": "org/m", "files": ["*.json", "--token-env=HTTPS_PROXY"]}}, "spec.model.files"),
    "files-help": ({"model": {"id": "org/m", "files": ["*.json", "-h"]}}, "spec.model.files"),
    "files-traversal": ({"model": {"id": "org/m", "files": ["../../etc/passwd"]}}, "spec.model.files"),
    "files-inner-traversal": ({"model": {"id": "org/m", "files": ["a/../../b"]}}, "spec.model.files"),
    "files-backslash": ({"model": {"id": "org/m", "files": ["..\\x"]}}, "spec.model.files"),
    "files-newline": ({"model": {"id": "org/m", "files": ["a\nb"]}}, "spec.model.files"),
    # endpoints that are no hub URL
    "endpoint-credentials": ({"model": {"id": "org/m", "endpoint": "https://user:pw@hub.example"}},
                             "spec.model.endpoint"),
    "endpoint-query": ({"model": {"id": "org/m", "endpoint": "http://169.254.169.254/latest?x=1"}},
                       "spec.model.endpoint"),
    "endpoint-fragment": ({"model": {"id": "org/m", "endpoint": "https://hub.example/#x"}}, "spec.model.endpoint"),
    "endpoint-scheme": ({"model": {"id": "org/m", "endpoint": "file:///etc/passwd"}}, "spec.model.endpoint"),
    # Secret references that are not Kubernetes names
    "secret-name": ({"model": {"id": "org/m", "tokenSecretRef": {"name": "../x"}}}, "spec.model.tokenSecretRef.name"),
    "secret-key": ({"model": {"id": "org/m", "tokenSecretRef": {"name": "s", "key": "a/b"}}},
                   "spec.model.tokenSecretRef.key"),
    "proxy-secret": ({"model": {"id": "org/m"}, "download": {"proxy": {"secretName": "UPPER"}}},
                     "spec.download.proxy.secretName"),
    # the old ones still hold
    "replicas-negative": ({"model": {"id": "org/m"}, "replicas": -1}, "spec.replicas"),
    "quantization-unknown": ({"model": {"id": "org/m"}, "quantization": "int4"}, "spec.quantization"),
}
NAME_REFUSALS = {"name-64": "a" * 64, "name-dot": "my.model", "name-digit-first": "7b-chat"}


@pytest.mark.parametrize("case", sorted(SCHEMA_REFUSALS))
def test_the_api_server_refuses_what_the_hub_or_the_puller_would(api_client, shared_namespace, case):
    spec, field = SCHEMA_REFUSALS[case]
    body = mdep(f"bad-{case}", **spec)
    with pytest.raises(ApiException) as refused:
        client.CustomObjectsApi(api_client).create_namespaced_custom_object(GROUP, VERSION, shared_namespace,
                                                                            PLURAL, body)
    assert refused.value.status == 422 and field in refused.value.body, refused.value.body


@pytest.mark.parametrize("case", sorted(NAME_REFUSALS))
def test_names_whose_children_would_be_refused_are_refused_up_front(api_client, shared_namespace, case):
    with pytest.raises(ApiException) as refused:
        client.CustomObjectsApi(api_client).create_namespaced_custom_object(
            GROUP, VERSION, shared_namespace, PLURAL, mdep(NAME_REFUSALS[case]))
    assert refused.value.status == 422 and "metadata.name" in refused.value.body, refused.value.body
    assert "63" in refused.value.body or "should match" in refused.value.body


STALLED = {
    # name: (spec, words the Stalled message must hold)
    "metadata-service": ({"model": {"id": "org/m", "endpoint": "http://169.254.169.254/latest"}},
                         ["spec.model.endpoint http://169.254.169.254/latest is not allowed", "https://huggingface.co",
                          ALLOWED_HTTP]),
    "in-cluster": ({"model": {"id": "org/m", "endpoint": "http://10.0.0.1:8080"}},
                   ["spec.model.endpoint http://10.0.0.1:8080 is not allowed"]),
    "attacker": ({"model": {"id": "org/m", "source": "gitee", "endpoint": "https://hf-mirror.com"}},
                 ["not allowed for source gitee", "https://hf-api.gitee.com"]),
    "bad-port": ({"model": {"id": "org/m", "endpoint": "https://hub.example:99999"}},
                 ["not a usable hub URL"]),
    "token-over-http": ({"model": {"id": "org/m", "endpoint": ALLOWED_HTTP, "tokenSecretRef": {"name": "hf"}}},
                        ["tokenSecretRef", "unencrypted", ALLOWED_HTTP]),
    "smuggled-remote-code": ({"model": {"id": "org/m"}, "runtime": {"args": ["--trust-remote-code"]}},
                             ["--trust-remote-code is set through spec.runtime.trustRemoteCode"]),
}


def test_what_the_admin_did_not_allow_stalls_and_creates_nothing(api_client, kubeconfig, namespace, tmp_path):
    config = (f"registry: localhost\nimagePullPolicy: Never\n"
              f"pull: {{allowedEndpoints: {{huggingface: ['{ALLOWED_HTTP}']}}}}\n")
    custom, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
    with operator_process(kubeconfig, namespace, tmp_path, config):
        for name, (spec, _) in STALLED.items():
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, mdep(name, **spec))
        for name, (_, words) in STALLED.items():
            stalled = wait_for(lambda: stall_of(custom, namespace, name), 60, f"{name} to stall")
            assert stalled["reason"] == "InvalidSpec", (name, stalled)
            for word in words:
                assert word in stalled["message"], (name, word, stalled["message"])
            wait_for(lambda: any(e.type == "Warning" and e.reason == "InvalidSpec"
                                 for e in events_for(core, namespace, name)), 30, f"a Warning Event for {name}")
        # nothing half-made
        assert not core.list_namespaced_persistent_volume_claim(namespace).items
        assert not client.BatchV1Api(api_client).list_namespaced_job(namespace).items
        assert not client.AppsV1Api(api_client).list_namespaced_deployment(namespace).items
        assert not core.list_namespaced_service(namespace).items
        assert not core.list_namespaced_pod(namespace).items


@pytest.fixture(scope="module")
def hub(kubeconfig):
    server = HubServer()
    for copy in ("alone", "unrelated", "missing-token"):
        server.add_repo(Repo.from_folder(f"org/minilm-{copy}", minilm_dir()))
    server.start(host=NODE_ADDRESS)
    yield server
    server.stop()


def operator_config(images: dict, *allowed: str) -> str:
    endpoints = ", ".join(f"'{url}'" for url in allowed)
    return (f"registry: localhost\noperatorImage: {images['operator']}\nimagePullPolicy: Never\n"
            f"profiles: {{cpu: {{images: {{builtin: {images['runtime-cpu']}}}}}}}\n"
            f"pull: {{allowedEndpoints: {{huggingface: [{endpoints}]}}, tokenOverHttp: [{endpoints}]}}\n")


def served(name: str, model: str, hub_url: str, claim: str) -> dict:
    return mdep(name, model={"id": model, "endpoint": hub_url}, cache={"claimName": claim, "size": "1Gi"},
                resources={"requests": {"cpu": "100m", "memory": "256Mi"}})


def seconds_to_ready(custom, namespace: str, body: dict) -> float:
    started = time.monotonic()
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    name = body["metadata"]["name"]
    wait_for(lambda: condition(custom, namespace, name, "Ready").get("status") == "True", 300, f"{name} Ready",
             detail=lambda: custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name).get("status"))
    return time.monotonic() - started


def test_a_missing_token_secret_is_named_without_the_operator_reading_secrets(
        api_client, kubeconfig, namespace, images, hub, tmp_path):
    custom, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
    with operator_process(kubeconfig, namespace, tmp_path, operator_config(images, hub.url)):
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, mdep(
            "secretless", model={"id": "org/minilm-missing-token", "endpoint": hub.url,
                                 "tokenSecretRef": {"name": "hf-token"}}))
        waiting = wait_for(lambda: (c := condition(custom, namespace, "secretless", "WeightsReady")).get("reason") ==
                           "CreateContainerConfigError" and c, 120, "the pull pod's missing Secret in the status")
        assert 'secret "hf-token" not found' in waiting["message"]
        # The Secret appearing lets the pull go on, with nothing done to the resource.
        core.create_namespaced_secret(namespace, client.V1Secret(metadata=client.V1ObjectMeta(name="hf-token"),
                                                                 string_data={"token": "hf_x"}))
        wait_for(lambda: condition(custom, namespace, "secretless", "WeightsReady").get("status") == "True", 180,
                 "the pull to finish once the Secret exists")


def test_endpoints_that_never_answer_do_not_delay_an_unrelated_model(api_client, kubeconfig, namespace, images, hub,
                                                                    tmp_path):
    custom, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
    hole = BlackHole(NODE_ADDRESS)
    # The ten live in a namespace where no pod may run: their pull Jobs exist, their pods do not, so the only thing
    # they can hold up is the operator itself.
    quiet = f"{namespace}-q"[:63]
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=quiet)))
    core.create_namespaced_resource_quota(quiet, client.V1ResourceQuota(
        metadata=client.V1ObjectMeta(name="no-pods"), spec=client.V1ResourceQuotaSpec(hard={"pods": "0"})))
    try:
        with operator_process(kubeconfig, [namespace, quiet], tmp_path, operator_config(images, hub.url, hole.url)):
            alone = seconds_to_ready(custom, namespace, served("alone", "org/minilm-alone", hub.url, "cache-a"))
            for i in range(10):
                custom.create_namespaced_custom_object(GROUP, VERSION, quiet, PLURAL, mdep(
                    f"hang-{i}", model={"id": f"org/hang-{i}", "endpoint": hole.url}))
            wait_for(lambda: hole.held, 60, "the operator to ask the endpoint that never answers")
            beside = seconds_to_ready(custom, namespace, served("unrelated", "org/minilm-unrelated", hub.url,
                                                                "cache-b"))
            print(f"Ready alone: {alone:.1f} s; beside ten ModelDeployments of an endpoint that never answers: "
                  f"{beside:.1f} s ({len(hole.held)} connections held open)")
            # Before, the hub listings ran on kopf's workers with no timeout: the second never became Ready.
            assert beside <= 1.5 * alone + 20, (alone, beside)
            # and the ten are not forgotten: they go on to their pull Jobs with the default cache size
            wait_for(lambda: len(client.BatchV1Api(api_client).list_namespaced_job(quiet).items) == 10, 120,
                     "the ten pull Jobs")
    finally:
        hole.stop()
        core.delete_namespace(quiet)
