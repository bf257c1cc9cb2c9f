"""Which files of a repository a pull takes, and the check that no hub-supplied name escapes the cache."""

from __future__ import annotations

import fnmatch
import posixpath
import re

from modeldeploy.pull.errors import PullError, Reason

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")
# Other copies of the same weights that a torch/transformers runtime never reads. Skipped unless asked for by name.
DUPLICATE_PATTERNS = ("original/*", "onnx/*", "openvino/*", "coreml/*", "*.onnx", "*.h5", "*.msgpack", "*.ot",
                      "*.tflite", "*.mlmodel", "*.gguf")


# llama.cpp serves one GGUF quantisation: without a choice by pattern (spec.model.files), the first of these that the
# repository has, a 4-5 bit K-quant first (the usual size/quality balance), full precision last.
GGUF_ORDER = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q4_0", "IQ4_XS", "IQ4_NL", "Q6_K", "Q8_0", "Q3_K_M",
              "Q3_K_L", "Q3_K_S", "Q2_K", "BF16", "F16", "F32")
GGUF_TYPE = re.compile(r"(?:^|[-._])((?:I?Q\d(?:_[A-Z0-9]+)*)|T?Q\d_\d|BF16|F16|F32|MXFP4)(?=[-._])", re.IGNORECASE)
GGUF_PROJECTOR = "mmproj"    # a multimodal projector beside the model, never the model itself


def gguf_quantization(path: str) -> str:
    """The quantisation a GGUF file's name tells (e.g. Q4_K_M), upper-case; "" when it tells none."""
    found = GGUF_TYPE.findall(posixpath.basename(path))
    return found[-1].upper() if found else ""


def one_gguf_quantization(paths: list[str]) -> list[str]:
    """The GGUF files of one quantisation (every shard of a split file) and their projectors: the first in
    GGUF_ORDER among the model files' quantisations, else the alphabetically first."""
    models = [p for p in paths if not posixpath.basename(p).startswith(GGUF_PROJECTOR)]
    kinds = {gguf_quantization(p) for p in models}
    if not kinds:
        return []
    kind = next((k for k in GGUF_ORDER if k in kinds), min(kinds))
    return [p for p in paths if p not in models or gguf_quantization(p) == kind]


def served_gguf(paths) -> str | None:
    """The file llama.cpp loads among the pulled ones: the (first shard of the) model, not a projector."""
    return min((p for p in paths if p.endswith(".gguf") and not posixpath.basename(p).startswith(GGUF_PROJECTOR)),
               default=None)


def matches(path: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def check_safe(path: str) -> None:
    """A file name from the hub must stay inside the snapshot folder."""
    normal = posixpath.normpath(path)
    if (not path or "\\" in path or "\0" in path or path.startswith("/") or normal.startswith("..")
            or any(part in ("..", ".", "") for part in path.split("/"))):
        raise PullError(Reason.UNSAFE_PATH, f"the hub listed an unsafe file name {path!r}; refusing to pull")


def select(paths: list[str], patterns: list[str] | None, excludes: list[str], allow_pickle: bool,
           gguf: bool = False) -> list[str]:
    """`patterns`: fnmatch allow patterns (None: every file but known duplicates). Pickle weights are skipped when
    safetensors weights are selected, unless `allow_pickle`. `gguf` (for llama.cpp): the .gguf files of one
    quantisation among those, nothing else."""
    if gguf:
        chosen = [p for p in paths if p.endswith(".gguf") and (matches(p, patterns) if patterns else True)]
        chosen = one_gguf_quantization([p for p in chosen if not matches(p, excludes)])
    else:
        chosen = [p for p in paths if (matches(p, patterns) if patterns else not matches(p, DUPLICATE_PATTERNS))]
        chosen = [p for p in chosen if not matches(p, excludes)]
    if not allow_pickle and any(p.endswith(".safetensors") for p in chosen):
        chosen = [p for p in chosen if not matches(p, PICKLE_PATTERNS)]
    for path in chosen:
        check_safe(path)
    if not chosen:
        raise PullError(Reason.NO_FILES, f"no {'.gguf ' if gguf else ''}file of the repository matches "
                        f"{patterns or 'the default selection'}"
                        + (f" minus {excludes}" if excludes else "") + f"; it has: {', '.join(sorted(paths)[:20])}")
    return sorted(chosen)
