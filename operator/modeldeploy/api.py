"""The ModelDeployment API as typed Python: the same fields and defaults as the CRD's schema (a test keeps the two
in step), so builders read attributes, and `render` applies the defaults the API server would. Checks the schema
cannot express (a profile that exists, a precision the profile supports) live in `problems()`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from modeldeploy.config import OperatorConfig

GROUP, VERSION, PLURAL, KIND = "modeldeploy.io", "v1alpha1", "modeldeployments", "ModelDeployment"


class Spec(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class SecretKeyRef(Spec):
    name: str
    key: str = "token"


class ModelSource(Spec):
    source: Literal["huggingface", "gitee"] = "huggingface"
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
    revision: str = "main"
    files: list[str] | None = None
    endpoint: str | None = None
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
    secret_name: str


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


class ModelDeploymentSpec(Spec):
    model: ModelSource
    task: Literal["feature-extraction", "sentence-similarity", "text-classification",
                  "text-generation"] = "feature-extraction"
    accelerator: Accelerator = Field(default_factory=Accelerator)
    quantization: Literal["auto", "none", "fp16", "bf16", "int8-dynamic"] = "auto"
    replicas: int = Field(1, ge=0, le=1000)
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
        if self.runtime.engine == "llamacpp" and not gguf_file(self.model.files):
            found.append("the llamacpp engine needs model.files to name one .gguf file")
        return found


def gguf_file(patterns: list[str] | None) -> str | None:
    """The GGUF file a llama.cpp server loads: the first literal (no wildcard) *.gguf name in the patterns."""
    return next((p for p in patterns or [] if p.endswith(".gguf") and not any(c in p for c in "*?[")), None)
