"""Pure builders, without a cluster: the manifests a ModelDeployment becomes on each profile, the content-addressed
pull Job, security defaults, and that the Python spec model and the CRD schema agree on every default.

Bad inputs tried: an unknown profile, fp16 on loongson, int8 on nvidia, an engine a profile does not offer,
a custom engine without image/port, a malformed model id, an unknown field."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from modeldeploy.api import ModelDeploymentSpec
from modeldeploy.manifests.common import CACHE_MOUNT, pull_job_name, weights_key
from modeldeploy.manifests.serving import build_deployment
from modeldeploy.config import OperatorConfig
from modeldeploy.reconcile.events import build_event
from modeldeploy.reconcile.pull_state import failure_of
from modeldeploy.render import RenderError, render

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "modeldeploy.io_modeldeployments.yaml"
CONFIG = OperatorConfig(registry="registry.example/md", operator_image="registry.example/md/modeldeploy:1",
                        pull={"allowedEndpoints": {"huggingface": ["https://hf-mirror.com"]}})


def body(name="minilm", **spec) -> dict:
    spec.setdefault("model", {"id": "sentence-transformers/all-MiniLM-L6-v2"})
    return {"apiVersion": "modeldeploy.io/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": "ml"}, "spec": spec}


def objects(md: dict, commit="a" * 40) -> dict:
    return {o["kind"]: o for o in render(md, CONFIG, commit)}


def pod(md: dict) -> dict:
    return objects(md)["Deployment"]["spec"]["template"]["spec"]


def test_cpu_profile():
    out = objects(body(replicas=2, resources={"limits": {"cpu": "2"}}))
    deployment, server = out["Deployment"], out["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert deployment["spec"]["replicas"] == 2
    assert server["image"] == "registry.example/md/modeldeploy-runtime-cpu:0.1.0"
    args = server["args"]
    assert args[args.index("--revision") + 1] == "a" * 40           # pinned to the resolved commit
    assert args[args.index("--quantization") + 1] == "none"          # cpu: auto -> none
    assert args[args.index("--device") + 1] == "cpu"
    assert server["resources"] == {"limits": {"cpu": "2"}}
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in server["env"]
    assert {"name": "cache", "mountPath": "/cache", "readOnly": True} in server["volumeMounts"]
    assert out["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert out["Service"]["spec"]["ports"][0] == {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}


def test_nvidia_profile():
    spec = pod(body(accelerator={"profile": "nvidia", "count": 2}, task="text-generation"))
    server = spec["containers"][0]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert server["args"][server["args"].index("--quantization") + 1] == "fp16"
    assert server["args"][server["args"].index("--device") + 1] == "cuda"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in server["volumeMounts"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}} in spec["volumes"]
    assert "runtime-cuda" in server["image"]


def test_loongson_profile():
    spec = pod(body(accelerator={"profile": "loongson"}, task="text-classification", nodeSelector={"zone": "a"}))
    server = spec["containers"][0]
    assert spec["nodeSelector"] == {"kubernetes.io/arch": "loong64", "zone": "a"}
    assert server["args"][server["args"].index("--quantization") + 1] == "auto"    # measured by the server
    assert "runtime-loong64" in server["image"]
    assert "nvidia.com/gpu" not in str(server["resources"])


def test_pods_are_restricted_and_carry_the_monitoring_sidecar():
    spec = pod(body())
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["seccompProfile"] == {
        "type": "RuntimeDefault"}
    for container in spec["containers"]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] and not context["allowPrivilegeEscalation"]
        assert context["capabilities"] == {"drop": ["ALL"]}
    assert [c["name"] for c in spec["containers"]] == ["server", "monitor"]
    assert spec["containers"][1]["ports"][0]["name"] == "metrics"
    assert [c["name"] for c in pod(body(monitoring={"enabled": False}))["containers"]] == ["server"]


def test_pull_job_is_content_addressed_and_sees_only_its_own_token():
    a = objects(body("one", model={"id": "org/model", "tokenSecretRef": {"name": "hf"}}))["Job"]
    b = objects(body("two", model={"id": "org/model", "tokenSecretRef": {"name": "hf"}}, replicas=5))["Job"]
    assert a["metadata"]["name"] == b["metadata"]["name"]           # same weights, one Job, whatever the name
    other = objects(body("one", model={"id": "org/model", "revision": "v2"}))["Job"]
    assert other["metadata"]["name"] != a["metadata"]["name"]
    container = a["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in container["env"]
    assert all("valueFrom" in e for e in container["env"] if "TOKEN" in e["name"])   # never a literal value
    assert a["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert "ownerReferences" not in a["metadata"]                   # shared: owned by no single resource

    gitee = objects(body(model={"id": "org/model", "source": "gitee", "tokenSecretRef": {"name": "g"}}))["Job"]
    env = gitee["spec"]["template"]["spec"]["containers"][0]["env"]
    assert [e["name"] for e in env if "valueFrom" in e] == ["GITEE_TOKEN"]


def test_the_pull_job_stops_where_the_operator_stalls():
    """podFailurePolicy (Kubernetes 1.26+) fails the Job on exactly the exit codes the operator reads as permanent,
    and an evicted pod does not use up a retry."""
    job = objects(body(model={"id": "org/model"}))["Job"]
    fail_job, ignore = job["spec"]["podFailurePolicy"]["rules"]
    assert fail_job["action"] == "FailJob" and ignore["action"] == "Ignore"
    assert fail_job["onExitCodes"]["containerName"] == job["spec"]["template"]["spec"]["containers"][0]["name"]
    for code in range(256):
        line = json.dumps({"event": "failed", "reason": "NotFound" if code == 3 else "NetworkError"})
        failed_pod = {"status": {"containerStatuses": [{"state": {"terminated": {"exitCode": code, "message": line}}}]}}
        permanent = code != 0 and failure_of(failed_pod).permanent
        assert (code in fail_job["onExitCodes"]["values"]) == permanent, code
    assert ignore["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]


def test_weights_key_ignores_serving_settings():
    base = ModelDeploymentSpec.model_validate({"model": {"id": "org/m"}})
    scaled = ModelDeploymentSpec.model_validate({"model": {"id": "org/m"}, "replicas": 9, "task": "text-generation"})
    assert weights_key(base, CONFIG) == weights_key(scaled, CONFIG)
    mirrored = OperatorConfig(pull={"endpoints": {"huggingface": "https://hf-mirror.com"}})
    assert weights_key(base, CONFIG) != weights_key(base, mirrored)
    for how_it_pulls in ({"model": {"id": "org/m", "tokenSecretRef": {"name": "other"}}},
                         {"model": {"id": "org/m"}, "download": {"proxy": {"secretName": "egress"}}}):
        # one Job must never carry one resource's token or proxy for another
        assert weights_key(ModelDeploymentSpec.model_validate(how_it_pulls), CONFIG) != weights_key(base, CONFIG)
    name = pull_job_name(ModelDeploymentSpec.model_validate({"model": {"id": "org/" + "x" * 90}}), "0" * 12)
    assert len(name) <= 63 and name.endswith("0" * 12)


def test_proxy_from_a_secret_and_mirror_endpoint():
    job = objects(body(model={"id": "org/m", "endpoint": "https://hf-mirror.com"},
                       download={"proxy": {"secretName": "egress"}}))["Job"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][container["args"].index("--endpoint") + 1] == "https://hf-mirror.com"
    proxies = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "PROXY" in e["name"]}
    assert proxies["HTTPS_PROXY"] == {"name": "egress", "key": "HTTPS_PROXY", "optional": True}


def test_engines():
    vllm = pod(body(accelerator={"profile": "nvidia"}, task="text-generation", runtime={"engine": "vllm"}))
    assert vllm["containers"][0]["image"].startswith("vllm/") and "--served-model-name" in vllm["containers"][0]["args"]
    llama = pod(body(model={"id": "org/m-gguf", "files": ["m-q4_k_m.gguf"]}, task="text-generation",
                     accelerator={"profile": "loongson"}, runtime={"engine": "llamacpp"}))
    assert llama["containers"][0]["args"][1].endswith("/snapshots/" + "a" * 40 + "/m-q4_k_m.gguf")
    custom = pod(body(runtime={"engine": "custom", "image": "me/server:1", "port": 9000, "args": ["--x"]}))
    assert custom["containers"][0]["ports"][0]["containerPort"] == 9000
    assert custom["containers"][0]["readinessProbe"]["tcpSocket"] == {"port": "http"}


def test_llamacpp_serves_the_pulled_gguf_with_metrics_and_its_pull_takes_gguf():
    spec = ModelDeploymentSpec.model_validate({"model": {"id": "org/m-GGUF"}, "task": "text-generation",
                                               "accelerator": {"profile": "loongson"},
                                               "runtime": {"engine": "llamacpp"}})
    deployment = build_deployment("m", spec, CONFIG, "c" * 40, gguf="sub/m-Q4_K_M-00001-of-00002.gguf")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("-m") + 1] == f"{CACHE_MOUNT}/models--org--m-GGUF/snapshots/{'c' * 40}/" \
        "sub/m-Q4_K_M-00001-of-00002.gguf"
    assert "--metrics" in args and args[args.index("--alias") + 1] == "org/m-GGUF"
    with pytest.raises(ValueError, match="pulled .gguf"):
        build_deployment("m", spec, CONFIG, "c" * 40)
    def pull_args(md: dict) -> list[str]:
        return objects(md)["Job"]["spec"]["template"]["spec"]["containers"][0]["args"]

    llama_pull = pull_args(body(**spec.model_dump(by_alias=True)))
    assert "--gguf" in llama_pull and "--" not in llama_pull      # no files given: the pull chooses the quantisation
    builtin = spec.model_copy(update={"runtime": spec.runtime.model_copy(update={"engine": "builtin"})})
    assert weights_key(spec, CONFIG) != weights_key(builtin, CONFIG)   # other files from the same repository
    assert "--gguf" not in pull_args(body(model={"id": "org/m-GGUF"}))


@pytest.mark.parametrize("runtime,probe", [
    ({}, ["--probe-path", "/v2/health/ready"]),
    ({"engine": "llamacpp"}, ["--probe-path", "/health"]),
    ({"engine": "custom", "image": "me/server:1", "port": 9000}, ["--probe-tcp"]),
])
def test_the_sidecar_probes_what_the_engine_serves(runtime, probe):
    spec = ModelDeploymentSpec.model_validate({"model": {"id": "org/m"}, "runtime": runtime})
    monitor = build_deployment("m", spec, CONFIG, "c" * 40, gguf="m.gguf")["spec"]["template"]["spec"]["containers"][1]
    assert monitor["name"] == "monitor" and monitor["args"][-len(probe):] == probe
    assert ("--probe-path" in monitor["args"]) != ("--probe-tcp" in monitor["args"])


def test_a_profile_with_its_own_operator_image_runs_pulls_and_sidecars_on_its_nodes():
    loong = OperatorConfig(operator_image="registry.example/md/modeldeploy:1",
                           profiles={"loongson": {"operatorImage": "registry.example/md/modeldeploy:1-loong64"}})
    md = body(model={"id": "org/m-gguf"}, task="text-generation", accelerator={"profile": "loongson"},
              runtime={"engine": "llamacpp"})
    made = {o["kind"]: o for o in render(md, loong)}
    job_pod = made["Job"]["spec"]["template"]["spec"]
    assert job_pod["containers"][0]["image"] == "registry.example/md/modeldeploy:1-loong64"
    assert job_pod["nodeSelector"] == {"kubernetes.io/os": "linux", "kubernetes.io/arch": "loong64"}
    serving = made["Deployment"]["spec"]["template"]["spec"]
    assert serving["containers"][1]["image"] == "registry.example/md/modeldeploy:1-loong64"
    assert serving["containers"][0]["args"][1].endswith("/<pulled>.gguf")      # known once pulled
    cpu = {o["kind"]: o for o in render(body(), loong)}     # a profile without one: the operator image, anywhere
    assert cpu["Job"]["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/md/modeldeploy:1"
    assert cpu["Job"]["spec"]["template"]["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux"}


@pytest.mark.parametrize("count,tensor_parallel", [(1, None), (2, "2"), (8, "8")])
def test_vllm_shards_the_model_over_the_gpus_it_is_given(count, tensor_parallel):
    spec = pod(body(accelerator={"profile": "nvidia", "count": count}, task="text-generation",
                    runtime={"engine": "vllm", "args": ["--max-model-len", "4096"]}))
    server = spec["containers"][0]
    args = server["args"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == count
    assert (args[args.index("--tensor-parallel-size") + 1] if "--tensor-parallel-size" in args else None) \
        == tensor_parallel
    assert args[-2:] == ["--max-model-len", "4096"]              # the user's own arguments come last
    assert args[args.index("--dtype") + 1] == "float16"           # the nvidia profile's default, fp16
    assert server["image"] == "vllm/vllm-openai:v0.31.0"          # the release of 2026-10, not v0.6.6 (2024)
    assert {"name": "dshm", "mountPath": "/dev/shm"} in server["volumeMounts"]   # NCCL between the shards


@pytest.mark.parametrize("spec,message", [
    ({"accelerator": {"profile": "tpu"}}, "not configured"),
    ({"accelerator": {"profile": "loongson"}, "quantization": "fp16"}, "fp16 is not supported on the loongson"),
    ({"accelerator": {"profile": "nvidia"}, "quantization": "int8-dynamic"}, "not supported on the nvidia"),
    ({"runtime": {"engine": "vllm"}}, "not offered on the cpu"),
    ({"runtime": {"engine": "custom"}}, "needs runtime.image and runtime.port"),
    ({"model": {"id": "not-a-repo"}}, "spec.model.id"),
    ({"replicas": 1, "replica": 2}, "spec.replica"),
])
def test_bad_specs_are_named(spec, message):
    with pytest.raises(RenderError, match=message):
        render(body(**spec), CONFIG)


def schema_defaults(schema: dict, path=()) -> dict:
    found = {}
    for key, prop in schema.get("properties", {}).items():
        if "default" in prop and prop["default"] != {}:
            found[path + (key,)] = prop["default"]
        found.update(schema_defaults(prop, path + (key,)))
    return found


def test_the_crd_and_the_spec_model_agree_on_defaults():
    crd = yaml.safe_load(CRD.read_text())
    spec_schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    model = ModelDeploymentSpec.model_validate({
        "model": {"id": "a/b", "tokenSecretRef": {"name": "s"}}, "autoscaling": {"maxReplicas": 2}}
    ).model_dump(by_alias=True)
    checked = 0
    for path, default in schema_defaults(spec_schema).items():
        value = model
        for part in path:
            value = value[part]
        assert value == default, f"spec.{'.'.join(path)}: CRD default {default!r}, Python default {value!r}"
        checked += 1
    assert checked >= 20


def test_render_command_prints_yaml_and_fails_clearly(tmp_path):
    manifest = tmp_path / "md.yaml"
    manifest.write_text(yaml.safe_dump(body()))
    done = subprocess.run([sys.executable, "-m", "modeldeploy", "render", "-f", str(manifest)],
                          capture_output=True, text=True)
    assert done.returncode == 0
    assert [d["kind"] for d in yaml.safe_load_all(done.stdout)] == ["PersistentVolumeClaim", "Job", "Deployment",
                                                                     "Service"]
    assert "&id" not in done.stdout
    manifest.write_text(yaml.safe_dump(body(accelerator={"profile": "tpu"})))
    done = subprocess.run([sys.executable, "-m", "modeldeploy", "render", "-f", str(manifest)],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "profile 'tpu' is not configured" in done.stderr


def test_examples_render_to_valid_kubernetes_objects():
    import kubernetes_validate

    for example in sorted((REPO / "examples").glob("*.yaml")):
        for document in yaml.safe_load_all(example.read_text()):
            objects = render(document, CONFIG)
            assert {o["kind"] for o in objects} >= {"PersistentVolumeClaim", "Job", "Deployment", "Service"}, example
            for obj in objects:
                kubernetes_validate.validate(obj, "1.30.0", strict=True)   # unknown fields fail too


def test_configured_profiles_lay_over_the_builtin_ones():
    config = OperatorConfig.model_validate({
        "registry": "localhost", "imagePullPolicy": "Never", "cache": {"storageClassName": "fast"},
        "profiles": {"cpu": {"images": {"builtin": "localhost/runtime:dev"}, "shm_size": "2Gi"},
                     "arm": {"nodeSelector": {"kubernetes.io/arch": "arm64"}, "images": {"builtin": "r:arm"}}}})
    assert config.image_pull_policy == "Never" and config.cache.storage_class_name == "fast"   # the chart's keys
    cpu = config.profiles["cpu"]
    assert cpu.images["builtin"] == "localhost/runtime:dev"
    assert cpu.images["llamacpp"] == "ghcr.io/ggml-org/llama.cpp:server"       # the rest of the profile stays
    assert cpu.shm_size == "2Gi" and cpu.default_quantization == "none"
    assert config.profiles["nvidia"].images["builtin"] == "localhost/modeldeploy-runtime-cuda:0.1.0"
    assert config.profiles["arm"].node_selector == {"kubernetes.io/arch": "arm64"}
    with pytest.raises(ValueError, match="shm_sise|shmSise"):
        OperatorConfig.model_validate({"profiles": {"cpu": {"shm_sise": "1Gi"}}})


def test_events_name_their_model_deployment_and_stay_within_the_limit():
    owner = {"apiVersion": "modeldeploy.io/v1alpha1", "kind": "ModelDeployment",
             "metadata": {"name": "minilm", "namespace": "ml", "uid": "u-1"}}
    when = datetime.datetime(2026, 11, 25, 12, 0, tzinfo=datetime.timezone.utc)
    event = build_event(owner, "Warning", "NoSpace", "x" * 5000, when)
    assert event["metadata"] == {"generateName": "minilm.", "namespace": "ml"}
    assert event["involvedObject"] == {"apiVersion": "modeldeploy.io/v1alpha1", "kind": "ModelDeployment",
                                       "name": "minilm", "namespace": "ml", "uid": "u-1"}
    assert (event["type"], event["reason"], len(event["message"])) == ("Warning", "NoSpace", 1024)
    assert event["firstTimestamp"] == event["lastTimestamp"] == "2026-11-25T12:00:00Z"
    assert build_event(owner, "Normal", "Ready", "", when)["message"] == "Ready"   # never empty


def test_cache_claims_are_sized_with_headroom():
    from modeldeploy.pull.sizing import claim_size

    assert claim_size(90 * 2**20) == "1Gi"                       # at least 1Gi
    assert claim_size(10 * 2**30) == "13Gi"                      # 25% headroom, rounded up
