"""The puller's pure pieces: file selection, path safety, integrity checks, error classification."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest

from modeldeploy.pull.errors import EXIT_NO_SPACE, EXIT_PERMANENT, EXIT_TRANSIENT, PullError, Reason, exit_code
from modeldeploy.pull.integrity import Expected, IntegrityFailure, lfs_pointer_sha1, verify
from modeldeploy.pull.selection import check_safe, select

REPO = ["config.json", "model.safetensors", "pytorch_model.bin", "original/consolidated.pth", "onnx/model.onnx",
        "tokenizer.json", "model-q4.gguf", "README.md"]


def test_default_selection_skips_duplicates_and_pickles_when_safetensors_exist():
    assert select(REPO, None, [], allow_pickle=False) == ["README.md", "config.json", "model.safetensors",
                                                         "tokenizer.json"]


def test_pickles_are_taken_when_allowed_or_when_there_is_nothing_else():
    assert "pytorch_model.bin" in select(REPO, None, [], allow_pickle=True)
    assert select(["config.json", "pytorch_model.bin"], None, [], allow_pickle=False) == ["config.json",
                                                                                        "pytorch_model.bin"]


def test_patterns_and_excludes():
    assert select(REPO, ["*.gguf", "*.json"], ["tokenizer*"], allow_pickle=False) == ["config.json", "model-q4.gguf"]


def test_nothing_selected_is_a_permanent_error_listing_what_exists():
    with pytest.raises(PullError) as error:
        select(REPO, ["*.xyz"], [], allow_pickle=False)
    assert error.value.reason is Reason.NO_FILES and "config.json" in error.value.message


@pytest.mark.parametrize("path", ["../x", "a/../../x", "/etc/passwd", "a\\b", "a//b", "./a", ""])
def test_unsafe_names_are_refused(path):
    with pytest.raises(PullError) as error:
        check_safe(path)
    assert error.value.reason is Reason.UNSAFE_PATH


def test_safe_names_pass():
    check_safe("1_Pooling/config.json")
    check_safe("a..b/c.json")


def write_safetensors(path, tensor_bytes=16):
    header = json.dumps({"w": {"dtype": "F32", "shape": [tensor_bytes // 4], "data_offsets": [0, tensor_bytes]}})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * tensor_bytes)
    return path.read_bytes()


def test_verify_uses_the_strongest_check_available(tmp_path):
    data = write_safetensors(tmp_path / "m.safetensors")
    sha256 = hashlib.sha256(data).hexdigest()
    git_sha1 = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    f = tmp_path / "m.safetensors"
    assert verify(f, Expected("m.safetensors", len(data), sha256=sha256), "x") == "sha256"
    assert verify(f, Expected("m.safetensors", len(data)), sha256) == "sha256"       # from the ETag
    assert verify(f, Expected("m.safetensors", len(data), git_sha1=git_sha1), "x") == "git-sha1"
    pointer = lfs_pointer_sha1(sha256, len(data))
    assert verify(f, Expected("m.safetensors", len(data), git_sha1=pointer), "x") == "sha256-via-lfs-pointer"
    assert verify(f, Expected("m.safetensors", len(data), checksum=sha256), "x") == "checksum"
    assert verify(f, Expected("m.safetensors", len(data)), "opaque-etag") == "size+safetensors-header"


def test_verify_catches_corruption_and_truncation(tmp_path):
    data = write_safetensors(tmp_path / "m.safetensors")
    f = tmp_path / "m.safetensors"
    with pytest.raises(IntegrityFailure, match="size"):
        verify(f, Expected("m.safetensors", len(data) + 1), "x")
    with pytest.raises(IntegrityFailure, match="sha256"):
        verify(f, Expected("m.safetensors", len(data), sha256="0" * 64), "x")
    with pytest.raises(IntegrityFailure, match="git blob id"):
        verify(f, Expected("m.safetensors", len(data), git_sha1="0" * 40), "x")
    f.write_bytes(data[:-4])                      # truncated, and no hash to compare with
    with pytest.raises(IntegrityFailure, match="header"):
        verify(f, Expected("m.safetensors", len(data) - 4), "opaque-etag")


def test_exit_codes_separate_permanent_from_transient():
    assert exit_code(Reason.NOT_FOUND) == exit_code(Reason.UNAUTHORIZED) == EXIT_PERMANENT
    assert exit_code(Reason.NETWORK) == exit_code(Reason.STALLED) == exit_code(Reason.RATE_LIMITED) == EXIT_TRANSIENT
    assert exit_code(Reason.NO_SPACE) == EXIT_NO_SPACE
    assert PullError(Reason.STALLED, "").retryable and not PullError(Reason.NOT_FOUND, "").retryable
