"""The operator's configuration: one typed object, loaded from a YAML file (the chart's values render it) and
passed down. Accelerator profiles belong here, to the cluster admin, not to each ModelDeployment."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

VERSION_TAG = "0.1.0"


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")

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


def builtin_profiles(registry: str, tag: str) -> dict[str, Profile]:
    return {
        "nvidia": Profile(
            device="cuda", default_quantization="fp16", allowed_quantizations=["none", "fp16", "bf16"],
            accelerator_resource="nvidia.com/gpu",
            tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            shm_size="1Gi", engines=["builtin", "vllm", "custom"],
            images={"builtin": f"{registry}/modeldeploy-runtime-cuda:{tag}", "vllm": "vllm/vllm-openai:v0.6.6"}),
        "loongson": Profile(
            device="cpu", default_quantization="int8-dynamic", node_selector={"kubernetes.io/arch": "loong64"},
            engines=["builtin", "llamacpp", "custom"],
            images={"builtin": f"{registry}/modeldeploy-runtime-loong64:{tag}",
                    "llamacpp": f"{registry}/llama.cpp-server-loong64:latest"}),
        "cpu": Profile(
            device="cpu", default_quantization="none", engines=["builtin", "llamacpp", "custom"],
            images={"builtin": f"{registry}/modeldeploy-runtime-cpu:{tag}",
                    "llamacpp": "ghcr.io/ggml-org/llama.cpp:server"}),
    }


class CacheDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    storage_class_name: str | None = None
    size: str = "50Gi"


class PullDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backoff_limit: int = 3                      # Job retries of transient failures (exit code 4)
    endpoints: dict[str, str] = Field(default_factory=dict)   # source -> default mirror, e.g. gitee or hf-mirror
    proxy_secret: str | None = None             # cluster-wide default proxy Secret name
    resources: dict = Field(default_factory=lambda: {"requests": {"cpu": "100m", "memory": "256Mi"},
                                                      "limits": {"memory": "1Gi"}})


class OperatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    namespaces: list[str] = Field(default_factory=list)   # empty: the whole cluster
    registry: str = "ghcr.io/modeldeploy"
    operator_image: str = ""                   # runs `modeldeploy pull` and `modeldeploy monitor`
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    profiles: dict[str, Profile] = Field(default_factory=dict)
    cache: CacheDefaults = Field(default_factory=CacheDefaults)
    pull: PullDefaults = Field(default_factory=PullDefaults)

    def model_post_init(self, _context) -> None:
        if not self.operator_image:
            self.operator_image = f"{self.registry}/modeldeploy:{VERSION_TAG}"
        merged = builtin_profiles(self.registry, VERSION_TAG)
        merged.update(self.profiles)
        self.profiles = merged


def load_config(path: Path | None) -> OperatorConfig:
    if path is None:
        return OperatorConfig()
    return OperatorConfig.model_validate(yaml.safe_load(Path(path).read_text()) or {})
