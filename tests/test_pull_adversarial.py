"""Adversarial inputs to `modeldeploy pull`, run as the Job runs it (a process, real exit codes), against the local
Hub-compatible server. Each case asserts the exact exit code and reason of the `failed` line (on stdout and in the
termination log), that the hub saw no request where the input is refused up front, and that nothing was written
outside the cache folder (nor, for refused arguments, inside it).

Bad inputs tried:
- file patterns that try to be options, after `--`: `--token-env=HTTPS_PROXY`, `-h`, `--help`, `--endpoint=http://x`;
  patterns with a `..` segment (`../x`, `a/../../x`, `..`), a backslash, a control character, an empty pattern;
  a pattern given before `--`; an `--exclude` with a `..` segment;
- revisions: `main/../../../x`, `../x`, `..`, `-x`, `a..b`, `.hidden`, `main/.x`, `x.lock`, `x/y.lock/z`, `a//b`,
  `/abs`, `main/`, `x.`, `a\\b`, a control character, a space, `@{-1}`, 256 characters;
- model ids the Hub refuses: `org/x..y`, `a--b/c`, `org/m.git`, `org/m-`, `-org/m`, `.org/m`, `org/m.`, `no-slash`,
  `a/b/c`, `a/../b`, a 97-character name, a non-ASCII name, an empty name;
- other refused arguments: an unknown option, a missing `--model`, a malformed `--checksum`, `--timeout 0`;
- a mirror whose repo info answers a `sha` that is not a 40-hex commit: a path (`../../models--x/abc`), upper
  case, 39 hex digits, an empty string, a number.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hubserver import HubServer, Repo, RepoFile

MODEL = "org/tiny"
FILES = {"config.json": RepoFile("config.json", b'{"a": 1}'), "tokenizer.json": RepoFile("tokenizer.json", b"{}")}


@pytest.fixture(scope="module")
def hub():
    server = HubServer()
    server.add_repo(Repo.from_files(MODEL, dict(FILES)))
    server.start()
    yield server
    server.stop()


def pull(tmp_path: Path, hub_url: str, *args: str, model: str | None = MODEL, patterns: list[str] | None = None,
         env: dict | None = None) -> tuple[int, list[dict], str]:
    """Runs the puller with its working directory, cache and termination log under tmp_path."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "modeldeploy", "pull", "--cache-dir", str(tmp_path / "cache"),
               "--endpoint", hub_url, "--retry-wait", "0.2", "--termination-log", str(tmp_path / "termination-log"),
               *([f"--model={model}"] if model is not None else []), *args]
    if patterns is not None:
        command += ["--", *patterns]
    environment = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "GITEE_TOKEN")}
    environment.update(env or {})
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment, cwd=work)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return done.returncode, events, done.stderr


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


def assert_refused(tmp_path: Path, hub: HubServer, code: int, events: list[dict], reason: str) -> dict:
    assert code == 3, events
    failed = events[-1]
    assert failed["event"] == "failed" and failed["reason"] == reason and failed["retryable"] is False, failed
    assert json.loads((tmp_path / "termination-log").read_text()) == failed
    outside = files_under(tmp_path) - files_under(tmp_path / "cache") - {tmp_path / "termination-log"}
    assert outside == set(), outside
    return failed


@pytest.mark.parametrize("patterns", [
    ["*.json", "--token-env=HTTPS_PROXY"], ["*.json", "-h"], ["--help"], ["*.json", "--endpoint=http://127.0.0.2"],
    ["../x"], ["a/../../x"], [".."], ["a\\b"], ["a\x01b"], [""],
])
def test_a_pattern_is_never_an_option_nor_a_path_escape(tmp_path, hub, patterns):
    hub.reset_counters()
    code, events, _ = pull(tmp_path, hub.url, patterns=patterns,
                           env={"HTTPS_PROXY": "http://user:proxy-secret@127.0.0.1:9"})
    failed = assert_refused(tmp_path, hub, code, events, "InvalidArguments")
    assert "is not a file pattern" in failed["message"] or "file pattern is" in failed["message"]
    assert sum(hub.requests.values()) == 0 and not (tmp_path / "cache").exists()
    assert "proxy-secret" not in json.dumps(events)


def test_patterns_before_the_separator_and_bad_excludes_are_refused(tmp_path, hub):
    code, events, _ = pull(tmp_path, hub.url, "*.json")
    failed = assert_refused(tmp_path, hub, code, events, "InvalidArguments")
    assert "after '--'" in failed["message"]
    code, events, _ = pull(tmp_path, hub.url, "--exclude", "../x", patterns=["*.json"])
    assert_refused(tmp_path, hub, code, events, "InvalidArguments")


@pytest.mark.parametrize("revision", [
    "main/../../../x", "../x", "..", "-x", "a..b", ".hidden", "main/.x", "x.lock", "x/y.lock/z", "a//b", "/abs",
    "main/", "x.", "a\\b", "a\x01b", "a b", "@{-1}", "r" * 256,
])
def test_revisions_that_are_not_git_refs_are_refused(tmp_path, hub, revision):
    hub.reset_counters()
    code, events, _ = pull(tmp_path, hub.url, f"--revision={revision}")
    assert_refused(tmp_path, hub, code, events, "InvalidArguments")
    assert sum(hub.requests.values()) == 0 and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("model", [
    "org/x..y", "a--b/c", "org/m.git", "org/m-", "-org/m", ".org/m", "org/m.", "no-slash", "a/b/c", "a/../b",
    "org/" + "m" * 97, "org/modèle", "org/",
])
def test_ids_the_hub_refuses_are_refused_up_front(tmp_path, hub, model):
    hub.reset_counters()
    code, events, _ = pull(tmp_path, hub.url, model=model)
    failed = assert_refused(tmp_path, hub, code, events, "InvalidArguments")
    assert "model id" in failed["message"] and failed["repo"] == model
    assert sum(hub.requests.values()) == 0 and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("args,model", [
    (["--bogus"], MODEL), ([], None), (["--checksum", "config.json=abc"], MODEL), (["--timeout", "0"], MODEL),
], ids=["unknown-option", "missing-model", "bad-checksum", "zero-timeout"])
def test_other_refused_arguments_still_end_with_a_failed_line(tmp_path, hub, args, model):
    code, events, stderr = pull(tmp_path, hub.url, *args, model=model)
    assert_refused(tmp_path, hub, code, events, "InvalidArguments")
    assert "error:" in stderr            # argparse's own message and usage, for a person reading the log


@pytest.mark.parametrize("sha", ["../../models--x/abc", "A" * 40, "a" * 39, "", 12345],
                         ids=["path", "upper-case", "39-hex", "empty", "number"])
def test_a_mirror_answering_a_commit_that_is_not_40_hex_is_refused(tmp_path, sha):
    server = HubServer()
    server.add_repo(Repo.from_files(MODEL, dict(FILES), info_sha=sha))
    server.start()
    try:
        code, events, _ = pull(tmp_path, server.url)
    finally:
        server.stop()
    failed = assert_refused(tmp_path, server, code, events, "InvalidCommit")
    assert "not a 40-hex commit" in failed["message"]
    assert server.requests[("GET", "tree")] == 0 and server.total_bytes_sent == 0
    assert files_under(tmp_path / "cache") == set()


def test_a_valid_pull_of_the_same_repository_still_works(tmp_path, hub):
    code, events, _ = pull(tmp_path, hub.url, patterns=["*.json"])
    assert code == 0, events
    assert events[-1]["event"] == "complete" and events[-1]["files"] == 2
    outside = files_under(tmp_path) - files_under(tmp_path / "cache") - {tmp_path / "termination-log"}
    assert outside == set()
