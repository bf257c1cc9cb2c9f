"""Loading a model from the shared cache: the pinned snapshot only, offline, only once the puller marked it
complete, safetensors unless pickle weights are allowed, remote code only when allowed."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modeldeploy import cache_layout
from modeldeploy.serve.device import StartupError
from modeldeploy.serve.precision import PrecisionChoice

log = logging.getLogger(__name__)

POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                "pooling_mode_max_tokens": "max", "pooling_mode_lasttoken": "lasttoken"}
TASKS = ("feature-extraction", "sentence-similarity", "text-classification", "text-generation")


@dataclass
class LoadOptions:
    model_id: str
    revision: str
    cache_dir: Path
    task: str
    device: str
    quantization: str               # none | fp16 | bf16 | int8-dynamic, or auto (CPU: measured at load)
    trust_remote_code: bool = False
    allow_pickle: bool = False
    require_complete: bool = True
    requested: str | None = None    # --quantization as given, where auto was resolved before loading (CUDA)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    task: str
    device: str
    quantization: str               # what runs (auto decided)
    commit: str
    max_length: int
    pooling: str = "mean"           # feature-extraction: mean | cls | max | lasttoken
    normalize: bool = False
    labels: list[str] = field(default_factory=list)
    load_seconds: float = 0.0
    precision: PrecisionChoice | None = None


def find_snapshot(cache_dir: Path, model_id: str, revision: str, require_complete: bool) -> tuple[Path, str]:
    repo = cache_layout.repo_folder(cache_dir, model_id)
    commit = revision
    ref = repo / "refs" / revision
    if ref.is_file():
        commit = ref.read_text().strip()
    snapshot = repo / "snapshots" / commit
    if not snapshot.is_dir():
        raise StartupError(f"{model_id}@{revision} is not in the cache {cache_dir} (no {snapshot}); "
                           "pull it first with `modeldeploy pull`")
    if require_complete and not cache_layout.complete_markers(cache_dir, model_id, commit):
        raise StartupError(f"{model_id}@{commit} is in the cache but not marked complete: a pull is unfinished "
                           "or failed its checks; refusing to serve it")
    return snapshot, commit


def sentence_transformers_pooling(snapshot: Path) -> tuple[str, bool, int | None]:
    """Pooling mode, normalisation and max sequence length as the model's sentence-transformers config says."""
    pooling, normalize, max_length = "mean", False, None
    modules_file = snapshot / "modules.json"
    if modules_file.is_file():
        for module in json.loads(modules_file.read_text()):
            kind = module.get("type", "")
            if kind.endswith("Pooling"):
                config = json.loads((snapshot / module["path"] / "config.json").read_text())
                pooling = config.get("pooling_mode") if isinstance(config.get("pooling_mode"), str) else next(
                    (mode for key, mode in POOLING_KEYS.items() if config.get(key)), "mean")
            elif kind.endswith("Normalize"):
                normalize = True
    st_config = snapshot / "sentence_bert_config.json"
    if st_config.is_file():
        max_length = json.loads(st_config.read_text()).get("max_seq_length")
    return pooling, normalize, max_length


def load(options: LoadOptions) -> LoadedModel:
    os.environ["HF_HUB_OFFLINE"] = "1"   # never reach a hub from a serving pod
    started = time.monotonic()
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    snapshot, commit = find_snapshot(options.cache_dir, options.model_id, options.revision,
                                     options.require_complete)
    weights = {p.suffix for p in snapshot.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pth")}
    if ".safetensors" not in weights and not options.allow_pickle:
        raise StartupError(f"{options.model_id}@{commit} has no safetensors weights (found {sorted(weights) or 'none'}); "
                           "pickle weights can run arbitrary code when loaded: allow them explicitly to use them")

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(options.quantization, torch.float32)
    model_class = {
        "feature-extraction": transformers.AutoModel,
        "sentence-similarity": transformers.AutoModel,
        "text-classification": transformers.AutoModelForSequenceClassification,
        "text-generation": transformers.AutoModelForCausalLM,
    }[options.task]
    common = {"trust_remote_code": options.trust_remote_code}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(snapshot, **common)
        model = model_class.from_pretrained(snapshot, dtype=dtype, use_safetensors=None if options.allow_pickle
                                            else True, **common)
    except ValueError as error:   # e.g. remote code needed but not allowed, or an unknown architecture
        raise StartupError(f"cannot load {options.model_id}@{commit} for {options.task}: {error}") from None
    model.eval()
    if options.task == "text-generation":
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    if options.quantization == "auto":
        from modeldeploy.serve.precision import choose_cpu_precision   # imports torch: only where it is used

        precision = choose_cpu_precision(model, tokenizer)
    elif options.requested == "auto":
        precision = PrecisionChoice("auto", options.quantization, "cuda-default")
    else:
        precision = PrecisionChoice(options.quantization, options.quantization, "requested")
    if options.quantization == "int8-dynamic":
        from modeldeploy.serve.quantize import quantize_int8_dynamic

        log.info("int8-dynamic: linear layers quantized as %s", quantize_int8_dynamic(model, tokenizer))
    log.info("%s", precision.describe())
    model.to(options.device)

    loaded = LoadedModel(model=model, tokenizer=tokenizer, task=options.task, device=options.device,
                         quantization=precision.selected, commit=commit, max_length=512, precision=precision)
    config_limit = getattr(model.config, "max_position_embeddings", None) or 512
    tokenizer_limit = tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else config_limit
    loaded.max_length = min(config_limit, tokenizer_limit)
    if options.task in ("feature-extraction", "sentence-similarity"):
        loaded.pooling, loaded.normalize, st_max = sentence_transformers_pooling(snapshot)
        loaded.max_length = st_max or loaded.max_length
    if options.task == "text-classification":
        loaded.labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    loaded.load_seconds = time.monotonic() - started
    log.info("loaded %s@%s for %s on %s (%s) in %.1fs", options.model_id, commit[:12], options.task,
             options.device, loaded.quantization, loaded.load_seconds)
    return loaded
