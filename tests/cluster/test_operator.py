"""The operator against the real local cluster: the CRD's schema, the shared cache PVC, the content-addressed pull
Job shared by two ModelDeployments, status conditions and Events, bad inputs, deletion policy.

(The serving half - pods going Ready - needs the project's images, which arrive with the images issue; here the pull
pod's image is absent on purpose and the status must say so.)

Bad inputs tried: an enum value the schema refuses (quantization), a malformed model id, a negative replica
count, an unknown accelerator profile, fp16 on the loongson profile, a token Secret that does not exist (its Job is
made all the same: the operator never reads Secrets)."""

from __future__ import annotations

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.helpers import REPO, operator_process, wait_for

GROUP, VERSION, PLURAL = "modeldeploy.io", "v1alpha1", "modeldeployments"


@pytest.fixture(scope="module")
def crd(api_client):
    body = yaml.safe_load((REPO / "crds" / "modeldeploy.io_modeldeployments.yaml").read_text())
    extensions = client.ApiextensionsV1Api(api_client)
    try:
        extensions.create_custom_resource_definition(body)
    except ApiException as error:
        if error.status != 409:
            raise
        current = extensions.read_custom_resource_definition(body["metadata"]["name"])
        body["metadata"]["resourceVersion"] = current.metadata.resource_version
        extensions.replace_custom_resource_definition(body["metadata"]["name"], body)

    def established():
        crd = extensions.read_custom_resource_definition(body["metadata"]["name"])
        return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])

    wait_for(established, 60, "the CRD to be established")
    return body


@pytest.fixture
def operator(kubeconfig, crd, namespace, tmp_path):
    with operator_process(kubeconfig, namespace, tmp_path, "registry: localhost\nimage_pull_policy: Never\n") as p:
        yield p


def mdep(name: str, **spec) -> dict:
    spec.setdefault("model", {"id": "sentence-transformers/all-MiniLM-L6-v2"})
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelDeployment", "metadata": {"name": name}, "spec": spec}


def condition(custom, namespace, name, kind) -> dict:
    status = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name).get("status") or {}
    return next((c for c in status.get("conditions", []) if c["type"] == kind), {})


def stall_of(custom, namespace, name) -> dict | None:
    """The Stalled condition while it is True (one read: it is the same condition that was checked)."""
    stalled = condition(custom, namespace, name, "Stalled")
    return stalled if stalled.get("status") == "True" else None


def events_for(core, namespace, name) -> list:
    return core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items


def test_the_schema_refuses_bad_specs_at_apply_time(api_client, crd, namespace):
    custom = client.CustomObjectsApi(api_client)
    for bad, field in ((mdep("a", quantization="int4"), "spec.quantization"),
                       (mdep("b", model={"id": "no-slash"}), "spec.model.id"),
                       (mdep("c", replicas=-1), "spec.replicas")):
        with pytest.raises(ApiException) as error:
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, bad)
        assert error.value.status == 422 and field in error.value.body
    created = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, mdep("defaults"))
    assert created["spec"]["accelerator"] == {"profile": "cpu", "count": 1}   # defaulted by the schema
    assert created["spec"]["cache"]["claimName"] == "model-cache"


def test_two_deployments_of_one_model_share_one_cache_and_one_pull_job(api_client, namespace, operator):
    custom, core, batch = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client), client.BatchV1Api(
        api_client)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, mdep("first"))
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, mdep("second", replicas=3,
                                                                                    task="sentence-similarity"))
    wait_for(lambda: condition(custom, namespace, "second", "CacheReady").get("status") == "True", 90,
             "the cache to be ready for both")
    jobs = wait_for(lambda: batch.list_namespaced_job(namespace).items, 60, "the pull job")
    assert len(jobs) == 1 and jobs[0].metadata.name.startswith("pull-all-minilm-l6-v2-")
    assert not jobs[0].metadata.owner_references                      # shared, owned by neither
    assert len(core.list_namespaced_persistent_volume_claim(namespace).items) == 1
    pod_spec = jobs[0].spec.template.spec
    assert pod_spec.automount_service_account_token is False and pod_spec.security_context.run_as_non_root

    # The pull pod's image is not there (on purpose): the status says so instead of spinning silently.
    waiting = wait_for(lambda: "ErrImageNeverPull" in condition(custom, namespace, "first", "WeightsReady").get(
        "message", "") and condition(custom, namespace, "first", "WeightsReady"), 90, "the image problem in status")
    assert waiting["status"] == "False" and waiting["reason"] == "ErrImageNeverPull"
    first = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "first")
    status = first["status"]
    assert status["observedGeneration"] == 1 and status["phase"] == "Pulling"
    assert not first["metadata"].get("finalizers")          # deletion never waits for the operator
    assert condition(custom, namespace, "first", "Ready")["status"] == "False"
    assert condition(custom, namespace, "first", "Reconciling")["status"] == "True"
    # Events are for what a person acts on (the pull's creation is in the status and the log, not an Event each).
    assert any(e.reason == "ErrImageNeverPull" and e.type == "Warning" for e in events_for(core, namespace, "first"))

    # Deleting one keeps the Job (the other still needs it); deleting the last removes it; the cache stays.
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "first")
    wait_for(lambda: not [m for m in custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
                          if m["metadata"]["name"] == "first"], 60, "first to be deleted (no finalizer hang)")
    assert len(batch.list_namespaced_job(namespace).items) == 1
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "second")
    wait_for(lambda: not batch.list_namespaced_job(namespace).items, 60, "the shared pull job to go")
    assert len(core.list_namespaced_persistent_volume_claim(namespace).items) == 1


def test_bad_inputs_end_in_specific_conditions_and_events(api_client, namespace, operator):
    custom, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                           mdep("tpu", accelerator={"profile": "tpu"}))
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                           mdep("loong-fp16", accelerator={"profile": "loongson"},
                                                quantization="fp16"))
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                           mdep("secretless", model={"id": "org/gated",
                                                                     "tokenSecretRef": {"name": "missing"}}))
    stalled = wait_for(lambda: stall_of(custom, namespace, "tpu"), 60, "tpu to stall")
    assert stalled["reason"] == "InvalidSpec" and "profile 'tpu' is not configured" in stalled["message"]
    assert condition(custom, namespace, "tpu", "Ready")["status"] == "False"
    assert custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "tpu")["status"]["phase"] == "Failed"
    wait_for(lambda: any(e.type == "Warning" and "tpu" in e.message for e in events_for(core, namespace, "tpu")),
             30, "a Warning event for tpu")

    fp16 = wait_for(lambda: stall_of(custom, namespace, "loong-fp16"), 60, "loong-fp16 to stall")
    assert "fp16 is not supported on the loongson profile" in fp16["message"]

    # The operator reads no Secret: the Job is made at once and the pod gets the token by secretKeyRef (the
    # kubelet's refusal of a missing Secret reaches the status: tests/cluster/test_tenant_safety.py).
    job = wait_for(lambda: client.BatchV1Api(api_client).list_namespaced_job(namespace).items, 90,
                   "the pull job, Secret or not")[0]
    env = job.spec.template.spec.containers[0].env
    token = next(e for e in env if e.name == "HF_TOKEN")
    assert token.value is None and token.value_from.secret_key_ref.name == "missing"
    # Nothing was created for the invalid ones.
    assert not client.AppsV1Api(api_client).list_namespaced_deployment(namespace).items
    assert len(client.BatchV1Api(api_client).list_namespaced_job(namespace).items) == 1
