"""A local server that speaks the Hugging Face Hub's HTTP protocol (the calls `huggingface_hub` makes to download),
so the real client can be tested with no internet. It serves model repositories from local folders, and injects
faults on demand: 5xx bursts, 429 with Retry-After, connections dropped mid-file, corrupted or truncated bodies,
trickling streams, gated repos, unsafe file names. It counts requests and body bytes sent, per file.

Conventions it can imitate (`HubFlavor`): Hugging Face (LFS sha256 in listings, X-Linked-Etag), and a hub that
leaves LFS metadata out (as Gitee AI's HF-compatible API may) and serves under a path prefix (as a mirror may).

Run standalone (the demo does):  python -m tests.hubserver --repo ORG/NAME=DIR [--host H] [--port P]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import fnmatch
import functools
import hashlib
import json
import threading
import time
from collections import Counter
from pathlib import Path

from aiohttp import web

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".h5", ".msgpack", ".ckpt", ".model")
LFS_MIN_SIZE = 10 * 1024 * 1024
PACING_SLACK = 0.01     # seconds a rate-limited connection or link may fall behind its schedule and catch up


@dataclasses.dataclass
class RepoFile:
    path: str
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    @functools.cached_property
    def git_sha1(self) -> str:
        return hashlib.sha1(b"blob %d\0" % self.size + self.data).hexdigest()

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def is_lfs(self) -> bool:
        return self.path.endswith(LFS_SUFFIXES) or self.size >= LFS_MIN_SIZE

    @property
    def pointer(self) -> bytes:
        return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n").encode()

    @functools.cached_property
    def blob_id(self) -> str:
        """What git stores: the content's sha1, or the LFS pointer's sha1 for LFS files."""
        if not self.is_lfs:
            return self.git_sha1
        return hashlib.sha1(b"blob %d\0" % len(self.pointer) + self.pointer).hexdigest()


@dataclasses.dataclass
class Repo:
    repo_id: str
    files: dict[str, RepoFile]
    commit: str
    branches: dict[str, str]
    token: str | None = None      # when set, requests need `Authorization: Bearer <token>`
    gated: bool = False            # 401 GatedRepo (instead of RepoNotFound) for requests without the token
    info_sha: str | None = None    # what repo info answers as "sha" (a misbehaving mirror); None: the commit

    @classmethod
    def from_folder(cls, repo_id: str, folder: Path, **kwargs) -> "Repo":
        files = {str(p.relative_to(folder)): RepoFile(str(p.relative_to(folder)), p.read_bytes())
                 for p in sorted(folder.rglob("*")) if p.is_file() and ".git" not in p.parts}
        return cls.from_files(repo_id, files, **kwargs)

    @classmethod
    def from_files(cls, repo_id: str, files: dict[str, RepoFile], **kwargs) -> "Repo":
        digest = hashlib.sha1(repo_id.encode())
        for name in sorted(files):
            digest.update(name.encode() + files[name].git_sha1.encode())
        commit = digest.hexdigest()
        return cls(repo_id=repo_id, files=files, commit=commit, branches={"main": commit}, **kwargs)


@dataclasses.dataclass
class HubFlavor:
    lfs_metadata: bool = True      # LFS sha256/size in tree listings and X-Linked-* headers
    blob_ids: bool = True          # git blob ids in listings and ETags (else empty ids and opaque md5 ETags)
    prefix: str = ""               # serve under a path prefix, e.g. "/hf-mirror"


@dataclasses.dataclass
class Fault:
    """One injected fault: applies to requests whose file path matches `path` (fnmatch), `times` times."""
    kind: str            # status | drop | corrupt | truncate | trickle | slow | hang
    path: str = "*"
    times: int = 1
    status: int = 500
    retry_after: int | None = None
    error_code: str | None = None   # status: X-Error-Code, e.g. EntryNotFound
    after_bytes: int = 0        # drop: bytes sent before the connection is cut; trickle: bytes sent at full speed
    short_by: int = 100         # truncate: the file is served (consistently) this many bytes short
    delay: float = 1.0          # trickle: seconds between tiny chunks; slow: seconds before each chunk
    methods: tuple[str, ...] = ("GET",)


class HubServer:
    """`bandwidth`: bytes/s shared by all connections, like one network link; `per_connection`: bytes/s each
    response body may use at most, like a link whose round-trip time or shaping caps one TCP stream;
    `drop_every`: a response is cut (fewer bytes than its Content-Length) each time the hub has sent about this many
    more body bytes, like a lossy path. A `hang` fault on `/api/info` or `/api/tree` accepts the request and never
    answers (until the client goes away or the server stops)."""

    def __init__(self, flavor: HubFlavor | None = None, bandwidth: float | None = None,
                 per_connection: float | None = None, drop_every: int | None = None):
        self.flavor = flavor or HubFlavor()
        self.bandwidth = bandwidth
        self.per_connection = per_connection
        self.drop_every = drop_every
        self.drops = 0
        self._next_drop = drop_every
        self._stopping = False
        self._link_free_at = 0.0
        self.repos: dict[str, Repo] = {}
        self.faults: list[Fault] = []
        self.requests: Counter[tuple[str, str]] = Counter()   # (method, path-kind) -> count
        self.bytes_sent: Counter[str] = Counter()             # file path -> body bytes
        self.auth_seen: list[str | None] = []
        self.range_starts: dict[str, list[int]] = {}        # file path -> Range starts of GETs
        self._lock = threading.Lock()
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # -- configuration -------------------------------------------------------------------------------------------
    def add_repo(self, repo: Repo) -> Repo:
        self.repos[repo.repo_id] = repo
        return repo

    def inject(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def reset_counters(self) -> None:
        with self._lock:
            self.requests.clear()
            self.bytes_sent.clear()
            self.auth_seen.clear()
            self.range_starts.clear()

    @property
    def total_bytes_sent(self) -> int:
        return sum(self.bytes_sent.values())

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times > 0 and method in fault.methods and fnmatch.fnmatch(path, fault.path):
                    fault.times -= 1
                    return fault
        return None

    async def _pace(self, n: int, connection_free_at: float) -> float:
        """Waits until this connection (at `per_connection`) and then the link (at `bandwidth`, shared) may carry
        `n` more bytes; returns when the connection may send again. The two waits overlap, as on a real path: a
        connection capped at C on a link of B > C sends at C, not at 1/(1/B + 1/C). Times follow the schedule, not
        the moment a sleep ended, so the time spent writing a chunk and the sleeps' own lateness do not add up (up
        to PACING_SLACK behind the schedule is caught up, a burst of at most that long). All handlers run on one
        event loop: no lock needed."""
        behind = time.monotonic() - PACING_SLACK
        ready = max(connection_free_at, behind)
        if ready > time.monotonic():
            await asyncio.sleep(ready - time.monotonic())
        start = ready
        if self.bandwidth:
            start = max(ready, self._link_free_at)
            self._link_free_at = start + n / self.bandwidth
            await asyncio.sleep(self._link_free_at - time.monotonic())
        return start + n / self.per_connection if self.per_connection else 0.0

    def _peek_fault(self, path: str, kind: str) -> Fault | None:
        with self._lock:
            return next((f for f in self.faults if f.times > 0 and f.kind == kind and "GET" in f.methods
                         and fnmatch.fnmatch(path, f.path)), None)

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._runner = web.AppRunner(self.app(), access_log=None)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, host, port)
            self._loop.run_until_complete(site.start())
            bound = site._server.sockets[0].getsockname()[1]  # the port the OS chose
            self.url = f"http://{host}:{bound}{self.flavor.prefix}"
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="hubserver", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("hub server did not start")
        return self.url

    def stop(self) -> None:
        self._stopping = True
        if self._loop and self._runner:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)

    # -- the protocol ----------------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        p = self.flavor.prefix
        app = web.Application()
        app.router.add_get(p + "/api/models/{org}/{name}/revision/{revision}", self.repo_info)
        app.router.add_get(p + "/api/models/{org}/{name}/tree/{revision}", self.tree)
        app.router.add_get(p + "/api/models/{org}/{name}/tree/{revision}/{path:.*}", self.tree)
        app.router.add_route("*", p + "/{org}/{name}/resolve/{revision}/{path:.*}", self.resolve)
        return app

    def _error(self, status: int, code: str | None, message: str) -> web.Response:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        return web.json_response({"error": message}, status=status, headers=headers)

    def _lookup(self, request: web.Request) -> tuple[Repo | None, str | None, web.Response | None]:
        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        authorization = request.headers.get("Authorization")
        self.auth_seen.append(authorization)
        repo = self.repos.get(repo_id)
        if repo is None:
            return None, None, self._error(404, "RepoNotFound", "Repository not found")
        if repo.token and authorization != f"Bearer {repo.token}":
            if repo.gated:
                return None, None, self._error(401, "GatedRepo", "Access to this model is restricted")
            return None, None, self._error(401, "RepoNotFound", "Repository not found")
        revision = request.match_info["revision"]
        commit = repo.branches.get(revision, revision if revision == repo.commit else None)
        if commit is None:
            return None, None, self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo, commit, None

    def _entry(self, f: RepoFile) -> dict:
        entry = {"type": "file", "path": f.path, "size": f.size, "oid": f.blob_id if self.flavor.blob_ids else ""}
        if f.is_lfs and self.flavor.lfs_metadata:
            entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": len(f.pointer)}
        return entry

    async def _hang(self, request: web.Request) -> web.Response:
        while not self._stopping and request.transport is not None and not request.transport.is_closing():
            await asyncio.sleep(0.05)
        return self._error(503, None, "hung")

    async def repo_info(self, request: web.Request) -> web.Response:
        self.requests[("GET", "info")] += 1
        fault = self._take_fault("GET", "/api/info")
        if fault and fault.kind == "status":
            return self._status_fault(fault)
        if fault and fault.kind == "hang":
            return await self._hang(request)
        repo, commit, error = self._lookup(request)
        if error:
            return error
        siblings = []
        for f in repo.files.values():
            sibling = {"rfilename": f.path}
            if request.query.get("blobs") == "true":
                sibling.update(size=f.size, blobId=f.blob_id)
                if f.is_lfs and self.flavor.lfs_metadata:
                    sibling["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": len(f.pointer)}
            siblings.append(sibling)
        sha = commit if repo.info_sha is None else repo.info_sha
        return web.json_response({"id": repo.repo_id, "modelId": repo.repo_id, "sha": sha, "private": bool(repo.token),
                                  "gated": "manual" if repo.gated else False, "siblings": siblings})

    async def tree(self, request: web.Request) -> web.Response:
        self.requests[("GET", "tree")] += 1
        fault = self._take_fault("GET", "/api/tree")
        if fault and fault.kind == "status":
            return self._status_fault(fault)
        if fault and fault.kind == "hang":
            return await self._hang(request)
        repo, commit, error = self._lookup(request)
        if error:
            return error
        prefix = request.match_info.get("path", "").strip("/")
        recursive = request.query.get("recursive", "false").lower() in ("true", "1")
        entries, folders = [], set()
        for f in repo.files.values():
            if prefix and not f.path.startswith(prefix + "/"):
                continue
            relative = f.path[len(prefix) + 1:] if prefix else f.path
            if "/" in relative and not recursive:
                folders.add(f"{prefix}/{relative.split('/')[0]}".strip("/"))
                continue
            parts = f.path.split("/")[:-1]
            for i in range(len(prefix.split("/")) if prefix else 0, len(parts)):
                folders.add("/".join(parts[: i + 1]))
            entries.append(self._entry(f))
        entries += [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0}
                    for d in sorted(folders)]
        return web.json_response(entries)

    def _status_fault(self, fault: Fault) -> web.Response:
        headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
        if fault.error_code:
            headers["X-Error-Code"] = fault.error_code
        return web.json_response({"error": "injected"}, status=fault.status, headers=headers)

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        method = request.method
        path = request.match_info["path"]
        self.requests[(method, "resolve")] += 1
        # HEAD and GET of one download share a truncate fault: the HEAD peeks, the GET consumes it.
        fault = self._take_fault(method, path) or (self._peek_fault(path, "truncate") if method == "HEAD" else None)
        if fault and fault.kind == "status":
            return self._status_fault(fault)
        repo, commit, error = self._lookup(request)
        if error:
            return error
        f = repo.files.get(path)
        if f is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {commit}")
        etag = f.blob_id if self.flavor.blob_ids else hashlib.md5(f.data).hexdigest()
        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes", "ETag": f'"{etag}"'}
        if f.is_lfs and self.flavor.lfs_metadata:
            headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)})
        data = memoryview(f.data)    # slices of it are sent as they are: no copy of a multi-gigabyte body
        if fault and fault.kind == "truncate":
            data = data[:-fault.short_by]
        if fault and fault.kind == "truncate" and "X-Linked-Size" in headers:
            headers["X-Linked-Size"] = str(len(data))
        start, end, ranged = 0, len(data), False
        if (range_header := request.headers.get("Range", "")).startswith("bytes="):
            first, _, last = range_header[6:].partition("-")
            start, ranged = int(first or 0), True
            end = min(len(data), int(last) + 1) if last else len(data)
        if method == "GET":
            self.range_starts.setdefault(path, []).append(start)
        body = data[start:end]
        status = 206 if ranged and (start or end < len(data)) else 200
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        headers["Content-Length"] = str(len(body))
        if method == "HEAD":
            return web.Response(status=200, headers=headers)
        if fault and fault.kind == "corrupt":
            body = bytes(b ^ 0xFF for b in body[:64]) + body[64:]
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        await self._send(request, response, path, body, fault)
        return response

    async def _send(self, request, response, path: str, body: bytes, fault: Fault | None) -> None:
        chunk = 256 * 1024
        cut = len(body)
        if fault and fault.kind == "drop":
            cut = min(fault.after_bytes, len(body))
        offset = 0
        connection_free_at = 0.0
        while offset < cut:
            if self.drop_every and self.total_bytes_sent >= self._next_drop:
                self._next_drop = self.total_bytes_sent + self.drop_every
                self.drops += 1
                request.transport.close()
                return
            if fault and fault.kind == "trickle" and offset >= fault.after_bytes:
                piece = body[offset:offset + 16]
                await asyncio.sleep(fault.delay)
            else:
                piece = body[offset:min(offset + chunk, cut)]
                if fault and fault.kind == "slow":
                    await asyncio.sleep(fault.delay)
            connection_free_at = await self._pace(len(piece), connection_free_at)
            try:
                await response.write(piece)
            except ConnectionResetError:     # the client went away (a killed puller, a cut stream)
                return
            offset += len(piece)
            with self._lock:
                self.bytes_sent[path] += len(piece)
        if fault and fault.kind == "drop":
            # Cut the connection with fewer bytes than Content-Length announced.
            request.transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve local model folders over the Hugging Face Hub protocol")
    parser.add_argument("--repo", action="append", required=True, metavar="ORG/NAME=DIR")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    server = HubServer()
    for spec in args.repo:
        repo_id, folder = spec.split("=", 1)
        repo = server.add_repo(Repo.from_folder(repo_id, Path(folder)))
        print(json.dumps({"repo": repo_id, "commit": repo.commit, "files": len(repo.files)}), flush=True)
    print(json.dumps({"url": server.start(args.host, args.port)}), flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
