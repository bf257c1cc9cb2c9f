"""The operator's configuration: one typed object, loaded from a YAML file (the chart's values render it) and
passed down. Accelerator profiles belong here, to the cluster admin, not to each ModelDeployment."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

VERSION_TAG = "0.1.0"
Source = Literal["huggingface", "gitee"]
ANY_ENDPOINT = "*"    # in pull.allowedEndpoints: any endpoint (single-tenant clusters only)


class Settings(BaseModel):
    """Keys are camelCase as in the chart's values (snake_case is accepted too); unknown keys are errors."""
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)


class Profile(Settings):

    device: Literal["cuda", "cpu"] = "cpu"
    default_quantization: str = "none"
    allowed_quantizations: list[str] = ["none", "bf16", "int8-dynamic"]
    accelerator_resource: str | None = None        # e.g. nvidia.com/gpu: limits = accelerator.count
    resources: dict = Field(default_factory=dict)   # the server container's, before the resource's own
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict] = Field(default_factory=list)
    runtime_class_name: str | None = None
    shm_size: str | None = None                     # a memory-backed /dev/shm
    images: dict[str, str] = Field(default_factory=dict)   # engine -> image
    engines: list[str] = ["builtin", "custom"]
    # The image of `modeldeploy pull` and `monitor` on this profile's nodes where the operator image's name is not
    # one multi-arch name (a registry without manifest lists, arch tags): pull Jobs then run on these nodes too.
    operator_image: str | None = None


# vLLM's release of 2026-10 (CUDA 13, NVIDIA driver 580 or newer); for CUDA 12 drivers its `-cu129` tag.
VLLM_IMAGE = "vllm/vllm-openai:v0.31.0"


def builtin_profiles(registry: str, tag: str) -> dict[str, Profile]:
    return {
        "nvidia": Profile(
            device="cuda", default_quantization="fp16", allowed_quantizations=["none", "fp16", "bf16"],
            accelerator_resource="nvidia.com/gpu",
            tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            shm_size="1Gi", engines=["builtin", "vllm", "custom"],
            images={"builtin": f"{registry}/modeldeploy-runtime-cuda:{tag}", "vllm": VLLM_IMAGE}),
        "loongson": Profile(
            # auto: the server measures int8 against fp32 at start-up (loong64 torch has no fast int8 kernel yet)
            device="cpu", default_quantization="auto", allowed_quantizations=["auto", "none", "bf16", "int8-dynamic"],
            node_selector={"kubernetes.io/arch": "loong64"},
            engines=["builtin", "llamacpp", "custom"],
            images={"builtin": f"{registry}/modeldeploy-runtime-loong64:{tag}",
                    "llamacpp": f"{registry}/llama.cpp-server-loong64:latest"}),
        "cpu": Profile(
            device="cpu", default_quantization="none", engines=["builtin", "llamacpp", "custom"],
            images={"builtin": f"{registry}/modeldeploy-runtime-cpu:{tag}",
                    "llamacpp": "ghcr.io/ggml-org/llama.cpp:server"}),
    }


class CacheDefaults(Settings):

    storage_class_name: str | None = None
    size: str = "50Gi"
    prune: bool = True      # weights no ModelDeployment uses any more leave the cache (false: they stay)


class PullDefaults(Settings):

    backoff_limit: int = 3                      # Job retries of transient failures (exit code 4)
    # How often unused pull Jobs are also looked for on a timer (besides deletions, spec changes and start-up)
    collect_interval_seconds: float = Field(600.0, gt=0)
    # source -> the endpoints pulls use when a resource names none, in order (default: the source's own hub)
    endpoints: dict[Source, list[str]] = Field(default_factory=dict)
    # source -> further endpoints a resource may name in spec.model.endpoint; ["*"]: any (single-tenant clusters)
    allowed_endpoints: dict[Source, list[str]] = Field(default_factory=dict)
    token_over_http: list[str] = Field(default_factory=list)   # http:// endpoints a token may be sent to
    proxy_secret: str | None = None             # cluster-wide default proxy Secret name
    resources: dict = Field(default_factory=lambda: {"requests": {"cpu": "100m", "memory": "256Mi"},
                                                      "limits": {"memory": "1Gi"}})

    @field_validator("endpoints", mode="before")
    @classmethod
    def one_or_several(cls, value):
        """A single URL per source is accepted (the chart's older form)."""
        if isinstance(value, dict):
            return {source: [urls] if isinstance(urls, str) else urls for source, urls in value.items()}
        return value

    @model_validator(mode="after")
    def usable_urls(self):
        from modeldeploy.endpoints import normalize

        for urls in [*self.endpoints.values(), *self.allowed_endpoints.values(), self.token_over_http]:
            for url in urls:
                if url != ANY_ENDPOINT:
                    try:
                        normalize(url)
                    except ValueError as error:
                        raise ValueError(f"pull endpoint {url!r}: {error}") from None
        return self


class MonitoringDefaults(Settings):
    pod_monitors: Literal["auto", "never"] = "auto"   # auto: a PodMonitor per ModelDeployment when the CRD exists
    discovery_interval_seconds: float = 60.0          # how often to look again whether that CRD exists


class OperatorConfig(Settings):

    namespaces: list[str] = Field(default_factory=list)   # empty: the whole cluster
    registry: str = "ghcr.io/modeldeploy"
    operator_image: str = ""                   # runs `modeldeploy pull` and `modeldeploy monitor`
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    profiles: dict[str, Profile] = Field(default_factory=dict)
    cache: CacheDefaults = Field(default_factory=CacheDefaults)
    pull: PullDefaults = Field(default_factory=PullDefaults)
    monitoring: MonitoringDefaults = Field(default_factory=MonitoringDefaults)

    @model_validator(mode="before")
    @classmethod
    def over_builtin_profiles(cls, data):
        """A configured profile is laid over the built-in one of the same name, field by field (a chart value can
        change one image without restating the profile); a new name is a whole new profile."""
        if not isinstance(data, dict):
            return data
        registry = data.get("registry") or cls.model_fields["registry"].default
        profiles = {name: profile.model_dump(by_alias=True)
                    for name, profile in builtin_profiles(registry, VERSION_TAG).items()}
        for name, given in (data.get("profiles") or {}).items():
            if isinstance(given, Profile):
                given = given.model_dump(by_alias=True, exclude_unset=True)
            if name in profiles and isinstance(given, dict):
                given = {to_camel(key): value for key, value in given.items()}
                merged = {**profiles[name], **given}
                if isinstance(given.get("images"), dict):
                    merged["images"] = {**profiles[name]["images"], **given["images"]}
                profiles[name] = merged
            else:
                profiles[name] = given
        return {**data, "profiles": profiles}

    def model_post_init(self, _context) -> None:
        if not self.operator_image:
            self.operator_image = f"{self.registry}/modeldeploy:{VERSION_TAG}"

    def operator_image_for(self, profile: str) -> str:
        return self.profiles[profile].operator_image or self.operator_image


def load_config(path: Path | None) -> OperatorConfig:
    if path is None:
        return OperatorConfig()
    return OperatorConfig.model_validate(yaml.safe_load(Path(path).read_text()) or {})
