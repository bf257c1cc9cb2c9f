"""Which files of a repository a pull takes, and the check that no hub-supplied name escapes the cache."""

from __future__ import annotations

import fnmatch
import posixpath

from modeldeploy.pull.errors import PullError, Reason

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")
# Other copies of the same weights that a torch/transformers runtime never reads. Skipped unless asked for by name.
DUPLICATE_PATTERNS = ("original/*", "onnx/*", "openvino/*", "coreml/*", "*.onnx", "*.h5", "*.msgpack", "*.ot",
                      "*.tflite", "*.mlmodel", "*.gguf")


def matches(path: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def check_safe(path: str) -> None:
    """A file name from the hub must stay inside the snapshot folder."""
    normal = posixpath.normpath(path)
    if (not path or "\\" in path or "\0" in path or path.startswith("/") or normal.startswith("..")
            or any(part in ("..", ".", "") for part in path.split("/"))):
        raise PullError(Reason.UNSAFE_PATH, f"the hub listed an unsafe file name {path!r}; refusing to pull")


def select(paths: list[str], patterns: list[str] | None, excludes: list[str], allow_pickle: bool) -> list[str]:
    """`patterns`: fnmatch allow patterns (None: every file but known duplicates). Pickle weights are skipped when
    safetensors weights are selected, unless `allow_pickle`."""
    chosen = [p for p in paths if (matches(p, patterns) if patterns else not matches(p, DUPLICATE_PATTERNS))]
    chosen = [p for p in chosen if not matches(p, excludes)]
    if not allow_pickle and any(p.endswith(".safetensors") for p in chosen):
        chosen = [p for p in chosen if not matches(p, PICKLE_PATTERNS)]
    for path in chosen:
        check_safe(path)
    if not chosen:
        raise PullError(Reason.NO_FILES, f"no file of the repository matches {patterns or 'the default selection'}"
                        + (f" minus {excludes}" if excludes else "") + f"; it has: {', '.join(sorted(paths)[:20])}")
    return sorted(chosen)
