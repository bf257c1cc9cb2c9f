"""`modeldeploy prune` run as the Job runs it (a process, real exit codes) on a cache made by `modeldeploy pull` with
the real huggingface_hub client against the local Hub-compatible server: two commits of one repository that share
two files. Pruning one commit frees exactly the bytes only it used, leaves the other loadable offline, and the last
prune removes the repository; `--keep`, bad arguments, links planted out of the cache, held blob locks (a pull of
another commit linking the blob meanwhile) and partial downloads are each tried."""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from filelock import FileLock

from modeldeploy import cache_layout
from tests.hubserver import HubServer, Repo, RepoFile

MODEL = "org/tiny"
SHARED = {"config.json": b'{"hidden_size": 8}\n', "tokenizer.json": b'{"vocab": [' + b'"tok", ' * 4000 + b'"end"]}'}


def repo(files: dict[str, bytes], **branches: str) -> Repo:
    made = Repo.from_files(MODEL, {p: RepoFile(p, data) for p, data in {**SHARED, **files}.items()})
    made.branches.update({name: made.commit for name in branches})
    return made


A = repo({"model.safetensors": os.urandom(300_000), "README.md": b"# commit A\n"}, v1="")
B = repo({"model.safetensors": os.urandom(200_000), "notes.txt": b"commit B only\n"})
A_ONLY = {"model.safetensors", "README.md"}


def blob_name(f: RepoFile) -> str:
    return f.sha256 if f.is_lfs else f.git_sha1     # huggingface_hub names blobs after the ETag


def pull(hub_url: str, cache: Path, revision: str) -> None:
    done = subprocess.run([sys.executable, "-m", "modeldeploy", "pull", "--model", MODEL, "--revision", revision,
                           "--cache-dir", str(cache), "--endpoint", hub_url, "--retry-wait", "0.2",
                           "--termination-log", str(cache.parent / "pull-log")], capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A cache holding A (pulled as branch v1) and B (pulled as main, after the hub moved on to B), both marked
    complete by the puller. Each test works on its own copy."""
    cache = tmp_path_factory.mktemp("template") / "cache"
    server = HubServer()
    server.start()
    try:
        server.add_repo(A)
        pull(server.url, cache, "v1")
        server.add_repo(B)
        pull(server.url, cache, "main")
    finally:
        server.stop()
    return cache


@pytest.fixture
def cache(template, tmp_path) -> Path:
    copy = tmp_path / "cache"
    shutil.copytree(template, copy, symlinks=True)   # the snapshot links are relative: they stay inside the copy
    return copy


def prune(cache: Path, *args: str, commit: str | None = None, model: str = MODEL) -> tuple[int, list[dict]]:
    command = [sys.executable, "-m", "modeldeploy", "prune", "--cache-dir", str(cache), "--model", model,
               "--commit", commit, "--termination-log", str(cache.parent / "termination-log"), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert events and json.loads((cache.parent / "termination-log").read_text()) == events[-1], done.stderr[-3000:]
    return done.returncode, events


def tree(root: Path) -> dict[str, object]:
    """Every entry below `root`: a link's target, a file's bytes."""
    return {str(p.relative_to(root)): os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def repo_dir(cache: Path) -> Path:
    return cache_layout.repo_folder(cache, MODEL)


def blob(cache: Path, f: RepoFile) -> Path:
    return repo_dir(cache) / "blobs" / blob_name(f)


def loads_offline(cache: Path, commit: Repo) -> bool:
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(MODEL, revision=commit.commit, cache_dir=cache, local_files_only=True))
    return ({str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
            == {path: f.data for path, f in commit.files.items()}
            and bool(cache_layout.complete_markers(cache, MODEL, commit.commit)))


def test_pruning_a_commit_frees_only_its_own_blobs_then_the_last_prune_removes_the_repository(cache):
    refs = repo_dir(cache) / "refs"
    assert (refs / "v1").read_text() == A.commit and (refs / "main").read_text() == B.commit
    assert loads_offline(cache, A) and loads_offline(cache, B)
    locks = cache / ".locks" / repo_dir(cache).name
    for f in [*A.files.values(), *B.files.values()]:   # blobs and the pull's locks, named as prune names them
        assert blob(cache, f).is_file() and (locks / f"{blob_name(f)}.lock").is_file()

    code, events = prune(cache, commit=A.commit)
    assert code == 0, events
    result = events[-1]
    assert result["event"] == "pruned" and (result["repo"], result["commit"]) == (MODEL, A.commit)
    assert result["freed_bytes"] == sum(A.files[p].size for p in A_ONLY)
    assert (result["removed_blobs"], result["kept_blobs"], result["removed_repo"]) == (2, 2, False)
    assert not (repo_dir(cache) / "snapshots" / A.commit).exists()
    assert not cache_layout.complete_markers(cache, MODEL, A.commit)
    assert not cache_layout.marker_folder(cache, MODEL, A.commit).exists()
    assert not (refs / "v1").exists() and (refs / "main").read_text() == B.commit
    assert all(not blob(cache, A.files[p]).exists() for p in A_ONLY)
    assert loads_offline(cache, B)

    # Idempotent: the second run finds nothing to do.
    before = tree(cache)
    code, events = prune(cache, commit=A.commit)
    assert code == 0 and events[-1]["freed_bytes"] == 0 and events[-1]["removed_blobs"] == 0
    assert tree(cache) == before

    code, events = prune(cache, commit=B.commit)
    assert code == 0, events
    assert events[-1]["removed_repo"] is True and events[-1]["removed_blobs"] == len(B.files)
    assert events[-1]["freed_bytes"] == sum(f.size for f in B.files.values())
    assert not repo_dir(cache).exists()
    assert not (cache / ".locks" / repo_dir(cache).name).exists()
    assert not (cache / cache_layout.MARKER_DIR / repo_dir(cache).name).exists()


def test_keep_protects_the_snapshot(cache):
    before = tree(cache)
    code, events = prune(cache, "--keep", f"{MODEL}@{B.commit}", "--keep", f"{MODEL}@{A.commit}", commit=A.commit)
    assert code == 0 and events[-1]["protected"] is True and events[-1]["freed_bytes"] == 0
    assert tree(cache) == before
    assert loads_offline(cache, A)


@pytest.mark.parametrize("args", [
    ["--model", "../x"],
    ["--model", "org/../../x"],
    ["--commit", "g" * 40],
    ["--commit", "a" * 39],
    ["--commit", "A" * 40],
    ["--commit", "../" + "a" * 37],
    ["--keep", "org/tiny@main"],
    ["--unknown"],
], ids=["dotdot-model", "dotdot-in-name", "non-hex", "39-chars", "upper-hex", "dotdot-commit", "bad-keep", "unknown"])
def test_bad_arguments_fail_with_exit_2_and_remove_nothing(cache, args):
    before = tree(cache)
    options = {"--model": MODEL, "--commit": A.commit}
    for name, value in zip(args[::2], args[1::2]):
        options[name] = value
    argv = [a for name, value in options.items() for a in (name, value)]
    argv += [a for a in args if a == "--unknown"]
    done = subprocess.run([sys.executable, "-m", "modeldeploy", "prune", "--cache-dir", str(cache), *argv,
                           "--termination-log", str(cache.parent / "termination-log")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, (done.stdout, done.stderr)
    failed = json.loads(done.stdout.splitlines()[-1])
    assert failed["event"] == "failed" and failed["reason"] == "InvalidArguments", failed
    assert json.loads((cache.parent / "termination-log").read_text()) == failed
    assert tree(cache) == before


def test_a_link_planted_in_a_snapshot_is_unlinked_and_its_target_untouched(cache, tmp_path):
    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    (outside / "secret").write_bytes(b"not the cache's")
    (outside / "folder" / "inner").write_bytes(b"nor this")
    snapshot = repo_dir(cache) / "snapshots" / A.commit
    (snapshot / "evil").symlink_to(outside / "secret")
    (snapshot / "evil-folder").symlink_to(outside / "folder")
    (snapshot / "evil-relative").symlink_to(os.path.relpath(outside / "secret", snapshot))
    (snapshot / "evil-dotdot").symlink_to("../../blobs/..")      # "the blob named '..'": the repository folder
    before = tree(outside)

    code, events = prune(cache, commit=A.commit)
    assert code == 0, events
    assert events[-1]["freed_bytes"] == sum(A.files[p].size for p in A_ONLY)
    assert not snapshot.exists()
    assert tree(outside) == before
    assert loads_offline(cache, B)


def test_a_cache_folder_that_is_a_link_is_refused(cache, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.move(repo_dir(cache) / "blobs", elsewhere)
    (repo_dir(cache) / "blobs").symlink_to(elsewhere)
    before, outside = tree(cache), tree(elsewhere)
    code, events = prune(cache, commit=A.commit)
    assert code == 3 and events[-1]["reason"] == "UnsafePath", events
    assert tree(cache) == before and tree(elsewhere) == outside


class HeldLock:
    """A blob's lock held by another thread (as a pull in another pod holds it), until `release()`."""

    def __init__(self, cache: Path, name: str):
        self.path = cache / ".locks" / repo_dir(cache).name / f"{name}.lock"
        self.held, self.done = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self.hold, daemon=True)
        self.thread.start()
        assert self.held.wait(10)

    def hold(self) -> None:
        with FileLock(str(self.path), mode=0o664):
            self.held.set()
            self.done.wait(60)

    def release(self) -> None:
        self.done.set()
        self.thread.join(10)


def start_prune(cache: Path, commit: str) -> tuple[subprocess.Popen, queue.Queue]:
    process = subprocess.Popen([sys.executable, "-m", "modeldeploy", "prune", "--cache-dir", str(cache), "--model",
                                MODEL, "--commit", commit, "--termination-log", str(cache.parent / "log")],
                               stdout=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(json.loads(line)) for line in process.stdout], daemon=True).start()
    return process, lines


def test_a_held_blob_lock_delays_the_blobs_removal(cache):
    weights = blob(cache, A.files["model.safetensors"])
    lock = HeldLock(cache, weights.name)
    try:
        process, lines = start_prune(cache, A.commit)
        waiting = lines.get(timeout=60)
        assert waiting["event"] == "waiting" and waiting["blob"] == weights.name
        assert weights.exists() and process.poll() is None
    finally:
        lock.release()
    assert process.wait(60) == 0
    result = lines.get(timeout=10)
    assert result["removed_blobs"] == 2 and not weights.exists()


def test_a_blob_still_locked_after_lock_timeout_stays_for_the_next_run(cache):
    weights = blob(cache, A.files["model.safetensors"])
    lock = HeldLock(cache, weights.name)
    try:
        code, events = prune(cache, "--lock-timeout", "0.5", commit=A.commit)
        assert code == 0 and events[-1]["busy_blobs"] == 1 and weights.exists()
        assert not cache_layout.complete_markers(cache, MODEL, A.commit)
        assert (repo_dir(cache) / "snapshots" / A.commit).is_dir()
    finally:
        lock.release()
    code, events = prune(cache, commit=A.commit)
    assert code == 0 and events[-1]["removed_blobs"] == 1 and events[-1]["busy_blobs"] == 0
    assert not weights.exists() and not (repo_dir(cache) / "snapshots" / A.commit).exists()


def test_a_blob_linked_by_a_concurrent_pull_while_prune_waits_stays(cache):
    """A pull of another commit takes the blob's lock, links the blob into its snapshot and lets go: prune, which
    decided nothing before it held the lock, reads the snapshots again and keeps the blob."""
    weights = blob(cache, A.files["model.safetensors"])
    lock = HeldLock(cache, weights.name)
    try:
        process, lines = start_prune(cache, A.commit)
        assert lines.get(timeout=60)["event"] == "waiting"
        other = repo_dir(cache) / "snapshots" / ("c" * 40)
        other.mkdir()
        (other / "model.safetensors").symlink_to(f"../../blobs/{weights.name}")
    finally:
        lock.release()
    assert process.wait(60) == 0
    result = lines.get(timeout=10)
    assert (result["removed_blobs"], result["kept_blobs"]) == (1, 3)
    assert weights.read_bytes() == A.files["model.safetensors"].data


def test_partial_downloads_go_with_the_repository_unless_their_lock_is_held(cache):
    blobs = repo_dir(cache) / "blobs"
    free = {f"{'1' * 64}.part": b"x" * 5000, f"{'1' * 64}.part.json": b"{}", f".{'1' * 64}.part.json.7.tmp": b"{",
            f"{'2' * 40}.0a1b2c3d.incomplete": b"y", f"{'4' * 40}.partial": b"w"}
    held = f"{'3' * 64}.part"
    for name, data in {**free, held: b"z" * 100}.items():
        (blobs / name).write_bytes(data)
    assert prune(cache, commit=A.commit)[0] == 0
    assert all((blobs / name).exists() for name in free)     # the repository is still in use: nothing reclaimed

    lock = HeldLock(cache, "3" * 64)
    try:
        code, events = prune(cache, commit=B.commit)
        assert code == 0 and events[-1]["removed_repo"] is False
        assert not any((blobs / name).exists() for name in free) and (blobs / held).exists()
        assert not (repo_dir(cache) / "snapshots").exists()
    finally:
        lock.release()
    code, events = prune(cache, commit=B.commit)
    assert code == 0 and events[-1]["removed_repo"] is True and not repo_dir(cache).exists()
