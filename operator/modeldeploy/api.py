"""The ModelDeployment API as typed Python: the same fields and defaults as the CRD's schema (a test keeps the two
in step), so builders read attributes, and `render` applies the defaults the API server would. Checks the schema
cannot express (a profile that exists, a precision the profile supports) live in `problems()`."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from pydantic.alias_generators import to_camel

from modeldeploy import endpoints
from modeldeploy.config import OperatorConfig

GROUP, VERSION, PLURAL, KIND = "modeldeploy.io", "v1alpha1", "modeldeployments", "ModelDeployment"


# The same patterns as the CRD's schema (a unit test keeps them equal), so an operator running under an older CRD
# (Helm never upgrades CRDs) refuses what the current schema refuses. Kubernetes evaluates them with RE2: no
# look-arounds, so what a pattern cannot say sits in the schema's `not` and, here, in the checks below.
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"            # a DNS-1035 label: the Service and label value it becomes
NAME_MAX = 63
REPO_PART = r"[A-Za-z0-9_]+([.-][A-Za-z0-9_]+)*"
REPO_ID_PATTERN = rf"^{REPO_PART}/{REPO_PART}$"              # as the Hub validates ids: no '--', '..', edge - or .
REPO_ID_NOT = r"\.git$"
REVISION_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$"
REVISION_NOT = r"\.\.|\.lock$|\.lock/|\.$"                 # git's rules for ref names
FILE_PATTERN = r"^[^-\\\x00-\x1f\x7f][^\\\x00-\x1f\x7f]*$"    # never an option, no backslash or control character
FILE_NOT = r"(^|/)\.\.(/|$)"
ENDPOINT_PATTERN = r"^https?://[^\s/?#@]+(/[^\s?#@]*)?$"       # no credentials, query or fragment
SECRET_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"


def refuse(pattern: str, why: str):
    def check(value: str) -> str:
        if re.search(pattern, value):
            raise ValueError(why)
        return value
    return AfterValidator(check)


def repo_parts_short(value: str) -> str:
    if any(len(part) > 96 for part in value.split("/")):
        raise ValueError("each part of ORG/NAME has at most 96 characters")
    return value


RepoId = Annotated[str, StringConstraints(pattern=REPO_ID_PATTERN, max_length=193),
                   refuse(REPO_ID_NOT, "a model id does not end in .git"), AfterValidator(repo_parts_short)]
Revision = Annotated[str, StringConstraints(pattern=REVISION_PATTERN, min_length=1, max_length=255),
                     refuse(REVISION_NOT, "not a git ref: '..', a '.lock' component or a trailing '.'")]
FilePattern = Annotated[str, StringConstraints(pattern=FILE_PATTERN, min_length=1, max_length=512),
                        refuse(FILE_NOT, "a '..' path segment leaves the repository")]
SecretName = Annotated[str, StringConstraints(pattern=SECRET_NAME_PATTERN, max_length=253)]


class Spec(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class SecretKeyRef(Spec):
    name: SecretName
    key: Annotated[str, StringConstraints(pattern=SECRET_KEY_PATTERN, max_length=253)] = "token"


class ModelSource(Spec):
    source: Literal["huggingface", "gitee"] = "huggingface"
    id: RepoId
    revision: Revision = "main"
    files: list[FilePattern] | None = Field(None, max_length=64)
    endpoint: Annotated[str, StringConstraints(pattern=ENDPOINT_PATTERN, max_length=2048)] | None = None
    token_secret_ref: SecretKeyRef | None = None
    allow_pickle: bool = False


class Accelerator(Spec):
    profile: str = "cpu"
    count: int = Field(1, ge=1, le=16)


class Cache(Spec):
    claim_name: str = "model-cache"
    storage_class_name: str | None = None
    size: str | None = None
    access_mode: Literal["ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod"] = "ReadWriteMany"


class Proxy(Spec):
    secret_name: SecretName


class Download(Spec):
    timeout_seconds: int = Field(30, ge=1, le=3600)
    retries: int = Field(5, ge=0, le=100)
    deadline_seconds: int = Field(21600, ge=60)
    stall_seconds: int = Field(120, ge=10)
    proxy: Proxy | None = None


class Batching(Spec):
    max_batch_size: int = Field(32, ge=1, le=1024)
    max_delay_ms: int = Field(5, ge=0, le=1000)


class Runtime(Spec):
    engine: Literal["builtin", "vllm", "llamacpp", "custom"] = "builtin"
    image: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    args: list[str] = Field(default_factory=list)
    env: list[dict] = Field(default_factory=list)
    batching: Batching = Field(default_factory=Batching)
    trust_remote_code: bool = False


class Monitoring(Spec):
    enabled: bool = True


class Service(Spec):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    port: int = Field(80, ge=1, le=65535)


class Autoscaling(Spec):
    """Replicas from load: the gateway (which sees every request) measures requests in flight per model and
    decides; the operator applies its decision within these bounds and ignores spec.replicas."""
    min_replicas: int = Field(1, ge=0, le=1000)
    max_replicas: int = Field(ge=1, le=1000)
    target_in_flight: float = Field(4, gt=0, le=10000)
    scale_up_seconds: int = Field(15, ge=0, le=3600)
    scale_down_delay_seconds: int = Field(300, ge=0, le=86400)

    def clamp(self, replicas: int) -> int:
        return min(max(replicas, self.min_replicas), self.max_replicas)


class ModelDeploymentSpec(Spec):
    model: ModelSource
    task: Literal["feature-extraction", "sentence-similarity", "text-classification",
                  "text-generation"] = "feature-extraction"
    accelerator: Accelerator = Field(default_factory=Accelerator)
    quantization: Literal["auto", "none", "fp16", "bf16", "int8-dynamic"] = "auto"
    replicas: int = Field(1, ge=0, le=1000)
    autoscaling: Autoscaling | None = None
    cache: Cache = Field(default_factory=Cache)
    download: Download = Field(default_factory=Download)
    runtime: Runtime = Field(default_factory=Runtime)
    resources: dict = Field(default_factory=dict)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict] = Field(default_factory=list)
    affinity: dict = Field(default_factory=dict)
    monitoring: Monitoring = Field(default_factory=Monitoring)
    service: Service = Field(default_factory=Service)

    def quantization_for(self, config: OperatorConfig) -> str:
        profile = config.profiles[self.accelerator.profile]
        return profile.default_quantization if self.quantization == "auto" else self.quantization

    def problems(self, config: OperatorConfig) -> list[str]:
        """What is wrong with this spec under this operator's configuration (empty: nothing)."""
        profile = config.profiles.get(self.accelerator.profile)
        if profile is None:
            return [f"accelerator profile {self.accelerator.profile!r} is not configured; the operator has "
                    f"{', '.join(sorted(config.profiles))}"]
        found = []
        quantization = self.quantization_for(config)
        if self.runtime.engine == "builtin" and quantization not in profile.allowed_quantizations:
            found.append(f"quantization {quantization} is not supported on the {self.accelerator.profile} "
                         f"profile (supported: {', '.join(profile.allowed_quantizations)})")
        if self.runtime.engine not in profile.engines:
            found.append(f"engine {self.runtime.engine} is not offered on the {self.accelerator.profile} profile "
                         f"(offered: {', '.join(profile.engines)})")
        if self.runtime.engine == "custom" and not (self.runtime.image and self.runtime.port):
            found.append("the custom engine needs runtime.image and runtime.port")
        elif not self.runtime.image and self.runtime.engine not in profile.images:
            found.append(f"the {self.accelerator.profile} profile has no image for engine {self.runtime.engine}; "
                         "set runtime.image")
        if self.runtime.engine == "builtin":
            for flag, field in (("--trust-remote-code", "runtime.trustRemoteCode"),
                                ("--allow-pickle", "model.allowPickle")):
                if any(arg.split("=")[0] == flag for arg in self.runtime.args):
                    found.append(f"spec.runtime.args: {flag} is set through spec.{field}, which the operator "
                                 "checks and announces")
        if self.autoscaling and self.autoscaling.max_replicas < self.autoscaling.min_replicas:
            found.append(f"spec.autoscaling.maxReplicas ({self.autoscaling.max_replicas}) is below "
                         f"spec.autoscaling.minReplicas ({self.autoscaling.min_replicas})")
        return found + endpoints.problems(self, config)

    def wanted_replicas(self, status: dict | None) -> int:
        """The serving pods to run: spec.replicas (which `kubectl scale`, an HPA or KEDA may write through the scale
        subresource), or with spec.autoscaling the gateway's decision (status.autoscaler.desiredReplicas, its only
        writer) within the bounds, starting at minReplicas: a GitOps tool that owns spec.replicas never fights it."""
        if self.autoscaling is None:
            return self.replicas
        desired = ((status or {}).get("autoscaler") or {}).get("desiredReplicas")
        return self.autoscaling.clamp(desired if isinstance(desired, int) and not isinstance(desired, bool)
                                      else self.autoscaling.min_replicas)


def name_problems(name: str) -> list[str]:
    """A ModelDeployment's name becomes its Deployment's, its Service's and a label value: what they refuse."""
    if len(name) > NAME_MAX or not re.match(NAME_PATTERN, name):
        return [f"metadata.name {name!r} cannot name the Service and labels it becomes: at most {NAME_MAX} "
                "characters, lower-case letters, digits and '-', starting with a letter and not ending with '-'"]
    return []


class SpecError(ValueError):
    """A spec the types refuse, with every field named."""


def parse_spec(body: dict) -> ModelDeploymentSpec:
    try:
        return ModelDeploymentSpec.model_validate(body.get("spec") or {})
    except ValidationError as error:
        raise SpecError("; ".join(f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                                  for e in error.errors())) from None
