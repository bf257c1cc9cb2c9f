"""The puller's pure pieces: file selection, path safety, names (ids, revisions, patterns), completion markers,
confinement of refs and snapshot paths, integrity checks, error classification."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest

from modeldeploy import cache_layout
from modeldeploy.pull import names
from modeldeploy.pull.errors import EXIT_NO_SPACE, EXIT_PERMANENT, EXIT_TRANSIENT, PullError, Reason, exit_code
from modeldeploy.pull.integrity import Expected, IntegrityFailure, lfs_pointer_sha1, verify
from modeldeploy.pull.selection import check_safe, gguf_quantization, select, served_gguf

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


GGUF_REPO = ["README.md", "config.json", "model.safetensors", "tiny-F16.gguf", "tiny-Q8_0.gguf", "tiny-q4_k_m.gguf",
             "mmproj-tiny-f16.gguf", "split/tiny-Q6_K-00002-of-00002.gguf", "split/tiny-Q6_K-00001-of-00002.gguf"]


@pytest.mark.parametrize("name,kind", [
    ("tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf", "Q4_K_M"), ("model-q8_0.gguf", "Q8_0"), ("Llama-3-IQ4_XS.gguf", "IQ4_XS"),
    ("x-BF16-00001-of-00002.gguf", "BF16"), ("qwen2.5-0.5b-instruct-q4_0.gguf", "Q4_0"), ("model.gguf", ""),
    ("gpt-oss-20b-MXFP4.gguf", "MXFP4"), ("Q4_K_M/m-Q4_K_M-00001-of-00002.gguf", "Q4_K_M")])
def test_gguf_quantization_from_the_file_name(name, kind):
    assert gguf_quantization(name) == kind


def test_gguf_selection_takes_one_quantisation_by_the_default_order_and_only_gguf():
    assert select(GGUF_REPO, None, [], allow_pickle=False, gguf=True) == ["mmproj-tiny-f16.gguf", "tiny-q4_k_m.gguf"]
    without_q4 = [p for p in GGUF_REPO if "q4" not in p]
    assert select(without_q4, None, [], allow_pickle=False, gguf=True) == [
        "mmproj-tiny-f16.gguf", "split/tiny-Q6_K-00001-of-00002.gguf", "split/tiny-Q6_K-00002-of-00002.gguf"]
    assert served_gguf(select(without_q4, None, [], False, gguf=True)) == "split/tiny-Q6_K-00001-of-00002.gguf"
    assert select(["a.gguf", "b.gguf", "c.json"], None, [], False, gguf=True) == ["a.gguf", "b.gguf"]


def test_gguf_quantisation_chosen_by_pattern_and_excludes():
    assert select(GGUF_REPO, ["*Q8_0*"], [], allow_pickle=False, gguf=True) == ["tiny-Q8_0.gguf"]
    assert select(GGUF_REPO, ["*.gguf"], ["mmproj-*", "*q4_k_m*"], False, gguf=True) == [
        "split/tiny-Q6_K-00001-of-00002.gguf", "split/tiny-Q6_K-00002-of-00002.gguf"]
    assert select(GGUF_REPO, ["*F16*"], [], False, gguf=True) == ["tiny-F16.gguf"]    # patterns match case


def test_no_gguf_for_llamacpp_is_a_permanent_error():
    for patterns in (None, ["*.safetensors"]):
        with pytest.raises(PullError) as error:
            select(["config.json", "model.safetensors"], patterns, [], allow_pickle=False, gguf=True)
        assert error.value.reason is Reason.NO_FILES and "no .gguf file" in error.value.message
    assert served_gguf(["config.json", "mmproj-x-f16.gguf"]) is None


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


# -- names: ids, revisions and patterns as the hub and git take them ---------------------------------------------------
IDS = ["sentence-transformers/all-MiniLM-L6-v2", "org/x..y", "a--b/c", "org/m.git", "org/m-", "-org/m", ".org/m",
       "org/m.", "org/_m_", "Org/M.v2", "no-slash", "a/b/c", "a/../b", "org/" + "m" * 96, "org/" + "m" * 97, "org/",
       "/m", "org/m git", "org/m\n"]


@pytest.mark.parametrize("value", IDS)
def test_model_ids_are_valid_exactly_when_the_hub_client_says_so(value):
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
        hub_ok = value.count("/") == 1          # modeldeploy always names ORG/NAME
    except HFValidationError:
        hub_ok = False
    try:
        names.repo_id(value)
        ours = True
    except ValueError:
        ours = False
    assert ours == hub_ok


@pytest.mark.parametrize("value", ["main", "v1.0", "refs/pr/12", "release/2024-01_b", "a" * 40, "_x"])
def test_branches_tags_pull_requests_and_commits_are_revisions(value):
    assert names.revision(value) == value


@pytest.mark.parametrize("value", ["main/../../../x", "..", "-x", "a..b", ".x", "a/.x", "x.lock", "a.lock/b", "a//b",
                                   "/a", "a/", "x.", "a\\b", "a\x00b", "a\x7fb", "a b", "a:b", "a~1", "a^", "a@{1}",
                                   "", "r" * 256])
def test_what_git_refuses_as_a_ref_is_not_a_revision(value):
    with pytest.raises(ValueError):
        names.revision(value)


@pytest.mark.parametrize("value", ["-h", "--token-env=X", "../x", "a/../b", "..", "a\\b", "a\nb", ""])
def test_patterns_that_could_be_options_or_escape_are_refused(value):
    with pytest.raises(ValueError):
        names.pattern(value)


def test_ordinary_patterns_pass():
    for value in ("*.json", "1_Pooling/*", "model-*.safetensors", "a..b/*", "[ab]*.txt"):
        assert names.pattern(value) == value


# -- completion markers: recognised only by exact name, place and shape ------------------------------------------------
COMMIT = "a" * 40
RECORD = {"repo": "org/m", "commit": COMMIT, "files": {"config.json": {"size": 2, "check": "git-sha1"},
                                                       "x.bin": {"size": None, "check": "size"}}, "bytes": 2}


def test_a_marker_written_by_the_puller_is_found(tmp_path):
    cache_layout.write_marker(cache_layout.marker_path(tmp_path, "org/m", COMMIT, ["a"]), RECORD)
    assert cache_layout.complete_markers(tmp_path, "org/m", COMMIT) == [RECORD]


@pytest.mark.parametrize("change", [
    {"repo": "org/other"}, {"commit": "b" * 40}, {"bytes": True}, {"bytes": "2"}, {"files": []},
    {"files": {"a": {"size": "2", "check": "size"}}}, {"files": {"a": {"size": 2}}}, {"files": {"a": {"check": "x"}}},
    {"files": {"a": {"size": 2.0, "check": "size"}}}, {"files": {"a": []}},
], ids=lambda change: json.dumps(change))
def test_a_marker_of_another_shape_is_ignored(tmp_path, change):
    cache_layout.write_marker(cache_layout.marker_path(tmp_path, "org/m", COMMIT, ["a"]), {**RECORD, **change})
    assert cache_layout.complete_markers(tmp_path, "org/m", COMMIT) == []


def test_only_the_exact_marker_name_and_a_regular_file_count(tmp_path):
    folder = cache_layout.marker_folder(tmp_path, "org/m", COMMIT)
    folder.mkdir(parents=True)
    for name in ("x.json", "0123456789abcdef.json.tmp", "0123456789ABCDEF.json", ".tmp-1.json", "0123456789abcde.json"):
        (folder / name).write_text(json.dumps(RECORD))
    (folder / "0123456789abcdef.json").write_text("not json")
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps(RECORD))
    (folder / "fedcba9876543210.json").symlink_to(elsewhere)
    assert cache_layout.complete_markers(tmp_path, "org/m", COMMIT) == []


@pytest.mark.parametrize("commit", ["../" + "a" * 37, "A" * 40, "a" * 39, "main", ""])
def test_markers_exist_only_for_40_hex_commits(tmp_path, commit):
    with pytest.raises(cache_layout.UnsafeCachePath):
        cache_layout.marker_path(tmp_path, "org/m", commit, ["a"])
    assert cache_layout.complete_markers(tmp_path, "org/m", commit) == []


def test_a_marker_folder_linked_out_of_the_cache_is_refused(tmp_path):
    outside = tmp_path / "outside"
    cache_layout.write_marker(cache_layout.marker_path(outside, "org/m", COMMIT, ["a"]), RECORD)
    root = tmp_path / "cache" / cache_layout.MARKER_DIR
    root.mkdir(parents=True)
    (root / "models--org--m").symlink_to(outside / cache_layout.MARKER_DIR / "models--org--m")
    assert cache_layout.complete_markers(tmp_path / "cache", "org/m", COMMIT) == []
    with pytest.raises(cache_layout.UnsafeCachePath):
        cache_layout.marker_path(tmp_path / "cache", "org/m", COMMIT, ["a"])


# -- refs and snapshot paths stay in their folders -----------------------------------------------------------------------
def puller_for(cache, revision: str):
    from modeldeploy.pull.puller import Puller, PullOptions
    from modeldeploy.pull.sources import SOURCES

    return Puller(PullOptions(source=SOURCES["huggingface"], repo_id="org/m", revision=revision, cache_dir=cache),
                  emit=lambda event: None)


def test_write_ref_writes_under_refs(tmp_path):
    puller_for(tmp_path, "refs/pr/3").write_ref(COMMIT)
    assert (cache_layout.repo_folder(tmp_path, "org/m") / "refs" / "refs" / "pr" / "3").read_text() == COMMIT


@pytest.mark.parametrize("revision", ["../../../x", "main/../../../../x", "/tmp/x"])
def test_write_ref_refuses_a_revision_that_escapes_even_past_the_argument_checks(tmp_path, revision):
    with pytest.raises(PullError) as error:
        puller_for(tmp_path / "cache", revision).write_ref(COMMIT)
    assert error.value.reason is Reason.UNSAFE_PATH
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_write_ref_refuses_a_refs_folder_linked_elsewhere(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    repo = cache_layout.repo_folder(tmp_path / "cache", "org/m")
    repo.mkdir(parents=True)
    (repo / "refs").symlink_to(outside)
    with pytest.raises(PullError) as error:
        puller_for(tmp_path / "cache", "main").write_ref(COMMIT)
    assert error.value.reason is Reason.UNSAFE_PATH and list(outside.iterdir()) == []


def test_a_snapshot_entry_linked_out_of_the_repository_is_not_present(tmp_path):
    from modeldeploy.pull.integrity import Expected

    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "config.json").write_text("{}")
    (outside / "config.json").write_text("{}")
    snapshot = cache_layout.snapshot_dir(tmp_path / "cache", "org/m", COMMIT)
    snapshot.mkdir(parents=True)
    (snapshot / "sub").symlink_to(outside / "sub")
    (snapshot / "config.json").symlink_to(outside / "config.json")
    puller = puller_for(tmp_path / "cache", COMMIT)
    assert not puller.present(COMMIT, Expected("sub/config.json", 2))
    assert not puller.present(COMMIT, Expected("config.json", 2))


def test_exit_codes_of_the_new_reasons():
    assert exit_code(Reason.INVALID_ARGUMENTS) == exit_code(Reason.INVALID_COMMIT) == EXIT_PERMANENT
    assert not PullError(Reason.INVALID_ARGUMENTS, "").retryable and not PullError(Reason.INVALID_COMMIT, "").retryable


def test_a_trailing_newline_does_not_pass_for_a_commit_or_a_name(tmp_path):
    with pytest.raises(cache_layout.UnsafeCachePath):
        cache_layout.marker_path(tmp_path, "org/m", COMMIT + "\n", ["a"])
    with pytest.raises(ValueError):
        names.revision("main\n")


def test_a_token_in_a_long_failure_is_redacted_before_the_termination_message_is_cut(tmp_path, capsys):
    """Past Kubernetes' 4 KiB the final line is shortened (message cut at 1000 characters): a token that straddled
    the cut was left half unredacted."""
    from modeldeploy.pull.puller import emit_json

    token = "hf_" + "T" * 37
    message = "x" * 990 + token + " and more"          # the token crosses character 1000
    termination = tmp_path / "termination-log"
    emit_json(token, termination)({"event": "failed", "reason": "Unauthorized", "message": message,
                                   "file_endpoints": {f"file-{i}": "e" * 100 for i in range(40)}})
    kept = json.loads(termination.read_text())
    assert "TTTT" not in termination.read_text() and kept["message"].startswith("x" * 990 + "***")
    assert "TTTT" not in capsys.readouterr().out
