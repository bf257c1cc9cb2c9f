"""What a namespace user can put in a ModelDeployment, checked without a cluster: the spec types refuse what the CRD's
schema refuses (for operators running under an older CRD: Helm never upgrades CRDs), the endpoint policy is the
admin's, and the pull's command line cannot be steered by a file pattern.

Bad inputs tried: the ids, revisions, file patterns, endpoints and names of tests/cluster/test_tenant_safety.py,
plus an endpoint with a bad port, http:// with a token, an endpoint allowed for another source, and an admin's
misconfigured endpoint."""

from __future__ import annotations

import re

import pytest
import yaml
from pydantic import ValidationError

from modeldeploy import api, endpoints
from modeldeploy.api import ModelDeploymentSpec, name_problems
from modeldeploy.manifests.pull_job import build_pull_job
from modeldeploy.config import OperatorConfig
from tests.cluster.test_tenant_safety import NAME_REFUSALS, SCHEMA_REFUSALS
from tests.unit.test_builders import CRD


def schema() -> dict:
    return yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_the_spec_types_use_the_crds_patterns():
    model = schema()["properties"]["spec"]["properties"]["model"]["properties"]
    assert model["id"]["pattern"] == api.REPO_ID_PATTERN and model["id"]["not"]["pattern"] == api.REPO_ID_NOT
    assert model["revision"]["pattern"] == api.REVISION_PATTERN
    assert model["revision"]["not"]["pattern"] == api.REVISION_NOT
    assert model["files"]["items"]["pattern"] == api.FILE_PATTERN
    assert model["files"]["items"]["not"]["pattern"] == api.FILE_NOT
    assert model["endpoint"]["pattern"] == api.ENDPOINT_PATTERN
    assert model["tokenSecretRef"]["properties"]["name"]["pattern"] == api.SECRET_NAME_PATTERN
    assert model["tokenSecretRef"]["properties"]["key"]["pattern"] == api.SECRET_KEY_PATTERN
    name = schema()["properties"]["metadata"]["properties"]["name"]
    assert name["pattern"] == api.NAME_PATTERN and name["maxLength"] == api.NAME_MAX


@pytest.mark.parametrize("case", sorted(SCHEMA_REFUSALS))
def test_the_spec_types_refuse_what_the_schema_refuses(case):
    spec, field = SCHEMA_REFUSALS[case]
    with pytest.raises(ValidationError) as refused:
        ModelDeploymentSpec.model_validate(spec)
    where = {".".join(str(p) for p in e["loc"]) for e in refused.value.errors(include_url=False)}
    camel = field.removeprefix("spec.")
    assert any(w.startswith(camel) or w.startswith(re.sub(r"([A-Z])", lambda m: "_" + m[1].lower(), camel))
               for w in where), (where, field)


@pytest.mark.parametrize("name", sorted(NAME_REFUSALS.values()))
def test_names_that_cannot_be_served(name):
    assert "at most 63 characters" in name_problems(name)[0]


def test_names_that_can():
    assert name_problems("minilm") == name_problems("a" * 63) == name_problems("qwen2-7b-chat") == []


def test_good_values_pass():
    ModelDeploymentSpec.model_validate({"model": {
        "id": "sentence-transformers/all-MiniLM-L6-v2", "revision": "refs/pr/1", "files": ["*.json", "onnx/*.onnx"],
        "endpoint": "https://hf-mirror.com/", "tokenSecretRef": {"name": "hf.token", "key": "HF_TOKEN"}}})
    ModelDeploymentSpec.model_validate({"model": {"id": "Qwen/Qwen2.5-0.5B_Instruct", "revision": "v1.0"}})


CONFIG = OperatorConfig(pull={"allowedEndpoints": {"huggingface": ["https://hf-mirror.com", "http://mirror:8080"]},
                              "tokenOverHttp": ["http://mirror.internal"]})


def spec(**model) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate({"model": {"id": "org/m", **model}})


@pytest.mark.parametrize("url,normal", [
    ("https://HF-Mirror.com/", "https://hf-mirror.com"),
    ("https://hf-mirror.com:443", "https://hf-mirror.com"),
    ("http://mirror:80/hub/", "http://mirror/hub"),
    ("http://[::1]:8080", "http://[::1]:8080"),
])
def test_endpoints_are_compared_in_one_form(url, normal):
    assert endpoints.normalize(url) == normal


@pytest.mark.parametrize("url,why", [
    ("https://user:pw@hf-mirror.com", "credentials"),
    ("https://hf-mirror.com?x=1", "query"),
    ("ftp://hf-mirror.com", "https://"),
    ("https://hf-mirror.com:99999", "out of range"),
    ("https://", "no host"),
    ("https://hf mirror.com", "whitespace"),
])
def test_urls_that_are_no_endpoint(url, why):
    with pytest.raises(ValueError, match=why):
        endpoints.normalize(url)


def test_only_the_admins_endpoints_may_be_named():
    assert endpoints.problems(spec(), CONFIG) == []
    assert endpoints.problems(spec(endpoint="https://HF-MIRROR.com/"), CONFIG) == []
    assert endpoints.problems(spec(endpoint="https://huggingface.co"), CONFIG) == []   # the source's own
    [refused] = endpoints.problems(spec(endpoint="http://169.254.169.254"), CONFIG)
    assert "is not allowed for source huggingface" in refused and "https://hf-mirror.com" in refused
    [gitee] = endpoints.problems(spec(source="gitee", endpoint="https://hf-mirror.com"), CONFIG)
    assert "not allowed for source gitee; the operator allows https://hf-api.gitee.com" in gitee
    anything = OperatorConfig(pull={"allowedEndpoints": {"huggingface": ["*"]}})
    assert endpoints.problems(spec(endpoint="https://my.host"), anything) == []       # single-tenant, explicit


def test_a_token_travels_over_http_only_where_the_admin_says():
    [clear] = endpoints.problems(spec(endpoint="http://mirror:8080", tokenSecretRef={"name": "hf"}), CONFIG)
    assert "unencrypted" in clear
    assert endpoints.problems(spec(endpoint="http://mirror:8080"), CONFIG) == []        # no token: fine
    marked = OperatorConfig(pull={"endpoints": {"huggingface": "http://mirror.internal"},
                                  "tokenOverHttp": ["http://mirror.internal/"]})
    assert endpoints.problems(spec(tokenSecretRef={"name": "hf"}), marked) == []
    assert endpoints.pull_endpoints(spec(), marked) == ["http://mirror.internal"]


def test_an_admins_bad_endpoint_is_refused_at_start():
    with pytest.raises(ValidationError, match="credentials"):
        OperatorConfig(pull={"endpoints": {"huggingface": "https://u:p@mirror"}})
    with pytest.raises(ValidationError):
        OperatorConfig(pull={"allowedEndpoints": {"modelscope": ["https://x"]}})


def test_file_patterns_reach_the_puller_after_a_double_dash():
    job = build_pull_job(spec(files=["*.json", "model.safetensors"]), CONFIG, "0" * 12)
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[-3:] == ["--", "*.json", "model.safetensors"]
    assert args[args.index("--endpoint") + 1] == "https://huggingface.co"
