"""`modeldeploy pull` over hard networks, as the Job runs it, against the local Hub-compatible server: a puller
killed (SIGKILL) mid-file resumes from the bytes on disk; partials nobody will resume are reclaimed; a listing or a
revision lookup that never answers fails with a named reason within its deadline; large files come as parallel
ranged pieces; ordered endpoints fall back on connection failures and 5xx, never on 404, and refuse to mix
commits; requests go through a real forward proxy (tinyproxy) unless NO_PROXY says otherwise."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modeldeploy import cache_layout
from modeldeploy.pull import transfer
from tests.hubserver import Fault, HubServer, Repo, RepoFile

MODEL = "org/big"
BIG = "model.safetensors"


def safetensors(megabytes: int, seed: int = 0) -> bytes:
    n = megabytes * 1024 * 1024
    header = json.dumps({"w": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    return struct.pack("<Q", len(header)) + header + (bytes(range(256)) * (n // 256 + 1))[seed:seed + n]


def repo(megabytes: int = 32, seed: int = 0, repo_id: str = MODEL) -> Repo:
    files = {"config.json": RepoFile("config.json", b'{"seed": %d}' % seed),
             BIG: RepoFile(BIG, safetensors(megabytes, seed))}
    return Repo.from_files(repo_id, files)


def command(endpoints: list[str], cache: Path, *args: str, model: str = MODEL) -> list[str]:
    return [sys.executable, "-m", "modeldeploy", "pull", "--model", model, "--cache-dir", str(cache),
            *[a for e in endpoints for a in ("--endpoint", e)], "--retry-wait", "0.2", "--progress-interval", "0.5",
            "--termination-log", os.devnull, *args]


def pull(endpoints: list[str], cache: Path, *args: str, env: dict | None = None, model: str = MODEL):
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("HF_TOKEN", "GITEE_TOKEN", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy",
                                "https_proxy", "no_proxy", "ALL_PROXY", "all_proxy")}
    environment.update(env or {})
    done = subprocess.run(command(endpoints, cache, *args, model=model), capture_output=True, text=True,
                          timeout=180, env=environment)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return done.returncode, events, done.stderr


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server():
    servers = []

    def start(*repos: Repo, **kwargs) -> HubServer:
        hub = HubServer(**kwargs)
        for r in repos:
            hub.add_repo(r)
        hub.start()
        servers.append(hub)
        return hub

    yield start
    for hub in servers:
        hub.stop()


def test_a_killed_pull_resumes_from_the_bytes_on_disk(server, tmp_path):
    hub = server(repo(32), bandwidth=8e6)
    size = hub.repos[MODEL].files[BIG].size
    cache = tmp_path / "cache"
    f = hub.repos[MODEL].files[BIG]
    partial = transfer.blob_paths(cache, MODEL, f.sha256)[1]
    first = subprocess.Popen(command([hub.url], cache, "--split-size", str(8 << 20)), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: transfer.partial_bytes(partial, size) >= size // 2, 60, "half the file on disk")
    finally:
        os.killpg(first.pid, signal.SIGKILL)    # the supervisor and its download process, as a lost pod
        first.wait(30)
    sent_before = hub.total_bytes_sent
    assert sent_before < size
    code, events, _ = pull([hub.url], cache, "--split-size", str(8 << 20))
    assert code == 0, events
    assert events[-1]["checks"]["sha256"] == 1
    assert 0 < events[-1]["downloaded_bytes"] < size * 0.7       # only what was missing came again
    assert hub.total_bytes_sent <= size * 1.15 + 1024             # was ~1.5x with truncate-on-open partials
    assert max(hub.range_starts[BIG]) > 0 and not partial.exists()


def test_partials_nobody_will_resume_are_reclaimed(server, tmp_path):
    from filelock import FileLock

    hub = server(repo(1))
    cache = tmp_path / "cache"
    blobs = cache_layout.repo_folder(cache, MODEL) / "blobs"
    blobs.mkdir(parents=True)
    old = time.time() - 3600
    dead_hf = blobs / ("e" * 40 + ".1a2b3c4d.incomplete")          # huggingface_hub's naming, never resumable
    dead_ours = blobs / ("f" * 64 + transfer.PARTIAL)              # a blob this pull does not take
    held = blobs / ("d" * 64 + transfer.PARTIAL)                   # another pull is writing it right now
    fresh = blobs / ("c" * 40 + ".9f8e7d6c.incomplete")            # too recent to call dead
    for path in (dead_hf, dead_ours, held, fresh):
        path.write_bytes(b"x" * 4096)
    for path in (dead_hf, dead_ours, held):
        os.utime(path, (old, old))
    lock = FileLock(str(transfer.blob_paths(cache, MODEL, "d" * 64)[3]))
    lock.acquire()
    try:
        code, events, _ = pull([hub.url], cache, "--stall-timeout", "30")
    finally:
        lock.release()
    assert code == 0, events
    assert not dead_hf.exists() and not dead_ours.exists() and held.exists() and fresh.exists()
    assert [e["files"] for e in events if e["event"] == "reclaimed"] == [2]


@pytest.mark.parametrize("where", ["/api/tree", "/api/info"])
def test_a_hub_that_never_answers_fails_with_a_named_reason_within_the_deadline(server, tmp_path, where):
    hub = server(repo(1))
    hub.inject(Fault("hang", path=where, times=100))
    started = time.monotonic()
    code, events, _ = pull([hub.url], tmp_path / "cache", "--stall-timeout", "2", "--retries", "1",
                           "--deadline", "30")
    assert code == 4 and events[-1]["reason"] == "Stalled", events
    assert ("listing" if where == "/api/tree" else "resolving") in events[-1]["message"]
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("split_mib,pieces", [(4, 4), (2, 8)])
def test_a_large_file_comes_as_parallel_ranged_pieces_in_file_order(server, tmp_path, split_mib, pieces):
    hub = server(repo(16), per_connection=20e6)
    code, events, _ = pull([hub.url], tmp_path / "cache", "--streams-per-file", "4",
                           "--split-size", str(split_mib << 20))
    assert code == 0, events
    size = hub.repos[MODEL].files[BIG].size
    bounds = [size * i // pieces for i in range(pieces)]
    starts = hub.range_starts[BIG]
    assert sorted(starts) == bounds
    assert sorted(starts[:4]) == bounds[:4]            # four at once, the first ones first
    assert hub.total_bytes_sent == sum(f.size for f in hub.repos[MODEL].files.values())
    assert events[-1]["checks"]["sha256"] == 1


def test_the_sha256_is_computed_from_the_disk_as_pieces_complete_in_any_order(tmp_path):
    data = os.urandom(5 << 20)
    path = tmp_path / "partial"
    path.write_bytes(data)
    bounds = [0, 1 << 20, 3 << 20, 4 << 20, 5 << 20]
    segments = [[a, b, 0] for a, b in zip(bounds, bounds[1:])]
    segments[1][2] = segments[1][1] - segments[1][0]          # complete before the attempt (a resume)
    fd = os.open(path, os.O_RDONLY)
    try:
        digest = transfer.PieceDigest(fd, segments)
        for index in (3, 0, 2):
            digest.complete(index)
        assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
        digest.stop()

        waiting = transfer.PieceDigest(fd, segments)           # piece 0 never completes: stopped, no digest
        waiting.complete(2)
        waiting.stop()
        assert waiting.hexdigest() is None
    finally:
        os.close(fd)
    path.write_bytes(data[:2 << 20])                           # shorter than its pieces: no digest, not a wrong one
    fd = os.open(path, os.O_RDONLY)
    try:
        short = transfer.PieceDigest(fd, segments)
        for index in range(4):
            short.complete(index)
        assert short.hexdigest() is None
    finally:
        os.close(fd)


def test_the_next_endpoint_serves_when_the_first_is_down_or_failing(server, tmp_path):
    hub = server(repo(1))
    down = f"http://127.0.0.1:{free_port()}"
    code, events, _ = pull([down, hub.url], tmp_path / "a", "--retries", "1")
    assert code == 0, events
    assert events[-1]["endpoints"] == {hub.url: 2}
    assert set(events[-1]["file_endpoints"].values()) == {hub.url}
    assert [(e["from"], e["to"]) for e in events if e["event"] == "fallback"] == [(down, hub.url)]

    # A mirror that answers the listing, then 503s every file beyond its retries.
    failing = server(repo(1))
    for name in ("config.json", BIG):          # the revision and the listing still answer
        failing.inject(Fault("status", path=name, status=503, times=1000))
    code, events, _ = pull([failing.url, hub.url], tmp_path / "b", "--retries", "1")
    assert code == 0, events
    assert events[-1]["endpoints"] == {hub.url: 2} and failing.total_bytes_sent == 0
    assert failing.requests[("GET", "tree")] == 1


def test_no_fallback_on_not_found_and_no_mixing_of_commits(server, tmp_path):
    elsewhere = server(repo(1))
    empty = server()
    code, events, _ = pull([empty.url, elsewhere.url], tmp_path / "a", "--retries", "1")
    assert code == 3 and events[-1]["reason"] == "NotFound", events
    assert sum(elsewhere.requests.values()) == 0

    ahead, behind = server(repo(1, seed=1)), server(repo(1, seed=2))
    for name in ("config.json", BIG):          # resolves and lists, then fails every file
        ahead.inject(Fault("status", path=name, status=503, times=1000))
    code, events, _ = pull([ahead.url, behind.url], tmp_path / "b", "--retries", "1")
    assert code == 4 and events[-1]["reason"] == "CommitMismatch", events
    assert ahead.repos[MODEL].commit in events[-1]["message"] and behind.repos[MODEL].commit in events[-1]["message"]
    assert behind.total_bytes_sent == 0 and cache_layout.complete_markers(tmp_path / "b", MODEL,
                                                                          ahead.repos[MODEL].commit) == []


# -- a real forward proxy --------------------------------------------------------------------------------------------
TINYPROXY = shutil.which("tinyproxy") or next((p for p in ("/usr/bin/tinyproxy", "/usr/sbin/tinyproxy")
                                               if os.path.exists(p)), None)


@pytest.fixture
def proxy(tmp_path):
    if TINYPROXY is None:
        pytest.skip("tinyproxy is not installed (Debian: apt-get install -y tinyproxy); the real-proxy tests need it")
    started = []

    def start(allow: str = "127.0.0.1") -> tuple[str, Path]:
        port = free_port()
        folder = tmp_path / f"proxy-{port}"
        folder.mkdir()
        log = folder / "tinyproxy.log"
        config = folder / "tinyproxy.conf"
        config.write_text(f"Port {port}\nListen 127.0.0.1\nTimeout 60\nLogFile \"{log}\"\nLogLevel Info\n"
                          f"MaxClients 20\nAllow {allow}\nViaProxyName \"test-proxy\"\n")
        process = subprocess.Popen([TINYPROXY, "-d", "-c", str(config)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        started.append(process)

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, 20, "tinyproxy to listen")
        return f"http://127.0.0.1:{port}", log

    yield start
    for process in started:
        process.terminate()
        process.wait(10)


def test_pulls_go_through_a_real_proxy_unless_no_proxy_says_otherwise(server, proxy, tmp_path):
    hub = server(repo(1))
    url, log = proxy()
    code, events, _ = pull([hub.url], tmp_path / "a", env={"HTTP_PROXY": url})
    assert code == 0, events
    proxied = log.read_text()
    assert f"/api/models/{MODEL}/revision/main" in proxied and f"/{MODEL}/resolve/" in proxied

    before = log.read_text()
    hub.reset_counters()
    code, events, _ = pull([hub.url], tmp_path / "b", env={"HTTP_PROXY": url, "NO_PROXY": "127.0.0.1"})
    assert code == 0, events
    assert log.read_text().count("/resolve/") == before.count("/resolve/") and hub.total_bytes_sent > 0


def test_a_refusing_proxy_gives_a_clear_reason(server, proxy, tmp_path):
    hub = server(repo(1))
    url, _ = proxy(allow="10.255.255.1")         # refuses 127.0.0.1
    code, events, _ = pull([hub.url], tmp_path / "cache", "--retries", "1", env={"HTTP_PROXY": url})
    assert code in (3, 4) and events[-1]["event"] == "failed", events
    assert "proxy" in events[-1]["message"].lower() and sum(hub.requests.values()) == 0
