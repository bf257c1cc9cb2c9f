"""The pull: resolve the revision to a commit, choose the files, check the cache has room, then download in
supervised attempts (retries with backoff and jitter, stall and deadline cut-offs, progress lines), and write the
completion marker only once every file is verified.

Everything the operator needs comes out as JSON lines on stdout (`progress`, then `complete` or `failed`), and the
last one also goes to the container's termination message file, so neither the pod nor the operator needs more
than the pod's log and status."""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from modeldeploy import cache_layout
from modeldeploy.pull import transfer, worker
from modeldeploy.pull.errors import PullError, Reason, classify
from modeldeploy.pull.integrity import Expected
from modeldeploy.pull.names import COMMIT_RE
from modeldeploy.pull.selection import select
from modeldeploy.pull.sources import Source

# Headroom kept free when checking that the cache can hold a download.
FREE_SPACE_MARGIN = 64 * 1024 * 1024
TERMINATION_LIMIT = 4000
# Failures that move a pull on to the next endpoint once its retries are spent.
FALLBACK = {Reason.NETWORK, Reason.RATE_LIMITED, Reason.STALLED}

Emit = Callable[[dict], None]


@dataclass
class PullOptions:
    source: Source
    repo_id: str
    revision: str
    cache_dir: Path
    endpoints: list[str] = field(default_factory=list)   # in order of preference; empty: the source's own hub
    patterns: list[str] | None = None
    excludes: list[str] = field(default_factory=list)
    allow_pickle: bool = False
    gguf: bool = False          # for llama.cpp: the .gguf files of one quantisation only
    checksums: dict[str, str] = field(default_factory=dict)
    timeout: float = 30.0
    retries: int = 5
    retry_wait: float = 2.0
    workers: int = 4
    stall_timeout: float = 60.0
    stall_bytes: int = 64 * 1024
    deadline: float | None = None
    progress_interval: float = 5.0
    streams_per_file: int = 4
    streams: int = 8
    split_size: int = 64 << 20
    token: str | None = field(default=None, repr=False)

    @property
    def hubs(self) -> list[str]:
        return [e.rstrip("/") for e in self.endpoints] or [self.source.endpoint]

    def selection_spec(self) -> list[str]:
        """What decides the file set, for the completion marker's key."""
        spec = [f"files={self.patterns}", f"exclude={sorted(self.excludes)}", f"pickle={self.allow_pickle}"]
        return spec + ["gguf"] if self.gguf else spec


class Puller:
    def __init__(self, options: PullOptions, emit: Emit):
        self.o = options
        self.emit = emit
        self.started = time.monotonic()
        self.deadline = self.started + options.deadline if options.deadline else None
        self.endpoint_index = 0
        self.resolved: dict[str, str] = {}        # endpoint -> the commit it resolved the revision to
        self.served: dict[str, tuple[str, str, int]] = {}   # path -> (check, endpoint, bytes received)

    @property
    def hub(self) -> str:
        return self.o.hubs[self.endpoint_index]

    # -- steps ----------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        commit = self.resolve()
        try:
            marker = cache_layout.marker_path(self.o.cache_dir, self.o.repo_id, commit, self.o.selection_spec())
        except cache_layout.UnsafeCachePath as error:
            raise PullError(Reason.UNSAFE_PATH, f"the completion marker of {commit}: {error}") from None
        record = cache_layout.read_marker(marker, self.o.repo_id, commit)
        if record and self.snapshot_intact(commit, record["files"]):
            return self.result(commit, record, downloaded=0, cached=True)

        files = self.with_retries("listing the repository", lambda: self.list_files(commit))
        missing = [f for f in files if not self.present(commit, f)]
        self.check_space(sum((f.size or 0) - transfer.partial_bytes(self.partial(commit, f), f.size) for f in missing))
        self.download(commit, files)
        record = {
            "repo": self.o.repo_id, "commit": commit, "source": self.o.source.name, "endpoint": self.o.hubs[0],
            "files": {f.path: {"size": f.size, "check": self.served[f.path][0], "endpoint": self.served[f.path][1]}
                      for f in files},
            "bytes": sum(f.size or 0 for f in files),
        }
        cache_layout.write_marker(marker, record)
        self.write_ref(commit)
        return self.result(commit, record, downloaded=sum(received for _, _, received in self.served.values()),
                           cached=False)

    def resolve(self) -> str:
        """The revision's commit: a 40-hex revision as it is, else what the hub answers, which must be 40-hex too
        (it names folders in the cache and the runtime's `--revision`)."""
        if COMMIT_RE.fullmatch(self.o.revision):
            return self.o.revision
        what = f"resolving {self.o.repo_id}@{self.o.revision}"
        return self.with_retries(what, lambda: self.resolve_at(self.hub))

    def resolve_at(self, hub: str) -> str:
        from huggingface_hub import HfApi

        def info() -> str:
            api = HfApi(endpoint=hub, token=self.o.token or False)
            return api.model_info(self.o.repo_id, revision=self.o.revision, timeout=self.o.timeout).sha

        commit = self.supervised(f"resolving {self.o.repo_id}@{self.o.revision} at {hub}", info)
        if not isinstance(commit, str) or not COMMIT_RE.fullmatch(commit):
            raise PullError(Reason.INVALID_COMMIT, f"{hub} resolved {self.o.repo_id}@{self.o.revision} to "
                                                   f"{str(commit)[:80]!r}, not a 40-hex commit; refusing to use it")
        self.resolved[hub] = commit
        return commit

    def agreed(self, commit: str) -> None:
        """Before an endpoint other than the one that resolved the revision serves anything: it must resolve the
        revision to the same commit (a mirror that lags behind the hub would otherwise mix two commits)."""
        if COMMIT_RE.fullmatch(self.o.revision) or self.hub in self.resolved:
            return
        theirs = self.resolve_at(self.hub)
        if theirs != commit:
            first = next(iter(self.resolved))
            raise PullError(Reason.COMMIT_MISMATCH, f"{first} resolved {self.o.repo_id}@{self.o.revision} to "
                                                    f"{commit} but {self.hub} to {theirs}; not mixing them")

    def list_files(self, commit: str) -> list[Expected]:
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile

        self.agreed(commit)
        api = HfApi(endpoint=self.hub, token=self.o.token or False)
        seen = [0]

        def listing() -> list:
            entries = []
            for entry in api.list_repo_tree(self.o.repo_id, revision=commit, recursive=True):
                entries.append(entry)
                seen[0] += 1
            return entries

        found = self.supervised("listing the repository", listing, lambda: seen[0])
        entries = {e.path: e for e in found if isinstance(e, RepoFile)}
        chosen = select(list(entries), self.o.patterns, self.o.excludes, self.o.allow_pickle, self.o.gguf)
        unknown = set(self.o.checksums) - set(chosen)
        if unknown:
            raise PullError(Reason.NO_FILES, f"checksums given for files that are not pulled: {sorted(unknown)}")
        return [Expected(path=p, size=entries[p].size, sha256=entries[p].lfs.sha256 if entries[p].lfs else None,
                         git_sha1=entries[p].blob_id or None, checksum=self.o.checksums.get(p))
                for p in chosen]

    def supervised(self, what: str, call, advanced: Callable[[], int] = lambda: 0):
        """Runs a metadata call (resolution, listing) under the same cut-offs as a transfer: it fails as Stalled
        when `advanced()` (entries received so far) has not moved for --stall-timeout, and at the deadline. The
        call runs in a daemon thread: a hub that accepts the connection and never answers leaves that thread
        blocked on its socket until the process ends, never the pull."""
        outcome: dict = {}
        finished = threading.Event()

        def target() -> None:
            try:
                outcome["value"] = call()
            except BaseException as error:  # handed to the caller, classified there
                outcome["error"] = error
            finally:
                finished.set()

        threading.Thread(target=target, name=what, daemon=True).start()
        mark, last_advance = advanced(), time.monotonic()
        while not finished.wait(0.2):
            now = time.monotonic()
            if advanced() != mark:
                mark, last_advance = advanced(), now
            if now - last_advance > self.o.stall_timeout:
                raise PullError(Reason.STALLED, f"{what}: no answer from {self.hub} in "
                                                f"{self.o.stall_timeout:.0f}s; cutting it off")
            if self.deadline and now > self.deadline:
                raise PullError(Reason.DEADLINE, f"{what}: the pull ran past its {self.o.deadline:.0f}s deadline")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def check_space(self, needed: int) -> None:
        self.o.cache_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.o.cache_dir).free
        if needed + FREE_SPACE_MARGIN > free:
            raise PullError(Reason.NO_SPACE, f"the cache needs {human(needed)} more for {self.o.repo_id} but has "
                                             f"{human(free)} free")

    def download(self, commit: str, files: list[Expected]) -> None:
        keep = {transfer.blob_name(f, self.o.repo_id, commit) for f in files}

        def attempt() -> None:
            self.agreed(commit)
            plan = worker.Plan(repo_id=self.o.repo_id, commit=commit, cache_dir=str(self.o.cache_dir),
                               endpoint=self.hub, files=[f for f in files if f.path not in self.served],
                               timeout=self.o.timeout, workers=self.o.workers, streams_per_file=self.o.streams_per_file,
                               streams=self.o.streams, split_size=self.o.split_size,
                               reclaim_after=self.o.stall_timeout, keep=keep, token=self.o.token)
            if plan.files:
                self.attempt(plan, files)

        self.with_retries(f"downloading {self.o.repo_id}@{commit[:12]}", attempt)

    # -- one supervised attempt -----------------------------------------------------------------------------------
    def attempt(self, plan: worker.Plan, files: list[Expected]) -> None:
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        child = context.Process(target=worker.run, args=(plan, results), name="pull-worker", daemon=True)
        child.start()
        progress = Progress(self.o.cache_dir, self.o.repo_id, plan.commit, files, self.o.stall_bytes)
        try:
            while True:
                try:
                    message = results.get(timeout=min(1.0, self.o.progress_interval))
                    if message[0] == "file":
                        _, path, check, received = message
                        self.served[path] = (check, plan.endpoint, received)
                        continue
                    if message[0] == "reclaimed":
                        if message[1]:
                            self.emit({"event": "reclaimed", "files": message[1], "bytes": message[2]})
                        continue
                    break
                except queue.Empty:
                    pass
                now = time.monotonic()
                progress.sample(now)
                if progress.due(now, self.o.progress_interval):
                    self.emit(progress.line(now))
                if not child.is_alive() and results.empty():
                    raise PullError(Reason.NETWORK, f"the download process died (exit code {child.exitcode})")
                if now - progress.last_advance > self.o.stall_timeout:
                    raise PullError(Reason.STALLED, f"less than {human(self.o.stall_bytes)} received in "
                                                    f"{self.o.stall_timeout:.0f}s from {plan.endpoint}; cutting the "
                                                    "connection")
                if self.deadline and now > self.deadline:
                    raise PullError(Reason.DEADLINE, f"the pull ran past its {self.o.deadline:.0f}s deadline")
        finally:
            if child.is_alive():
                child.kill()
            child.join(10)
        if message[0] == "ok":
            progress.sample(time.monotonic())
            self.emit(progress.line(time.monotonic()))
            return
        _, reason, message_text, retry_after = message
        raise PullError(Reason(reason), message_text, retry_after)

    def with_retries(self, what: str, step):
        """Retries with backoff and jitter; once an endpoint has failed its retries with a connection failure, a
        5xx, a 429 or a stall, moves on to the next endpoint (never on 401/403/404: a repository of that name
        elsewhere is another repository)."""
        attempt = 0
        while True:
            try:
                return step()
            except Exception as error:
                failure = classify(error, what)
                if not failure.retryable or failure.reason in (Reason.DEADLINE, Reason.COMMIT_MISMATCH):
                    raise failure from None
                if attempt >= self.o.retries:
                    if failure.reason in FALLBACK and self.endpoint_index + 1 < len(self.o.hubs):
                        self.endpoint_index += 1
                        self.emit({"event": "fallback", "from": self.o.hubs[self.endpoint_index - 1],
                                   "to": self.hub, "reason": failure.reason.value, "message": failure.message})
                        attempt = 0
                        continue
                    raise failure from None
                wait = min(60.0, self.o.retry_wait * 2 ** attempt) * random.uniform(0.5, 1.5)
                if failure.retry_after is not None:
                    wait = max(wait, failure.retry_after)
                if self.deadline and time.monotonic() + wait > self.deadline:
                    raise PullError(Reason.DEADLINE, f"{failure.message}; no time left before the deadline "
                                                     "to retry") from None
                attempt += 1
                self.emit({"event": "retry", "attempt": attempt, "of": self.o.retries, "reason":
                           failure.reason.value, "message": failure.message, "wait_seconds": round(wait, 1),
                           "endpoint": self.hub})
                time.sleep(wait)

    # -- the cache ------------------------------------------------------------------------------------------------
    def partial(self, commit: str, f: Expected) -> Path:
        return transfer.blob_paths(self.o.cache_dir, self.o.repo_id, transfer.blob_name(f, self.o.repo_id, commit))[1]

    def present(self, commit: str, f: Expected) -> bool:
        snapshot = cache_layout.snapshot_dir(self.o.cache_dir, self.o.repo_id, commit)
        path = snapshot / f.path
        if not cache_layout.inside(snapshot, path.parent / "x") or not cache_layout.inside(snapshot.parent.parent, path):
            return False   # a link planted in the snapshot that leads out of the repository's folder
        try:
            return f.size is None or path.stat().st_size == f.size
        except OSError:
            return False

    def write_ref(self, commit: str) -> None:
        """refs/<branch or tag> -> commit, as huggingface_hub writes it, so `revision="main"` loads offline too.
        The ref stays inside refs/ (checked with links resolved, before and after creating its folder)."""
        if self.o.revision == commit:
            return
        refs = cache_layout.repo_folder(self.o.cache_dir, self.o.repo_id) / "refs"
        ref = refs / self.o.revision
        try:
            cache_layout.confined(refs, ref)
            ref.parent.mkdir(parents=True, exist_ok=True)
            cache_layout.confined(refs, ref.parent / ref.name)
        except cache_layout.UnsafeCachePath as error:
            raise PullError(Reason.UNSAFE_PATH, f"the ref of {self.o.revision!r}: {error}") from None
        tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
        tmp.write_text(commit)
        os.replace(tmp, ref)

    def snapshot_intact(self, commit: str, files: dict) -> bool:
        return all(self.present(commit, Expected(path=p, size=meta["size"])) for p, meta in files.items())

    def result(self, commit: str, record: dict, downloaded: int, cached: bool) -> dict:
        checks: dict[str, int] = {}
        served_by: dict[str, int] = {}
        for meta in record["files"].values():
            checks[meta["check"]] = checks.get(meta["check"], 0) + 1
            endpoint = meta.get("endpoint") or record.get("endpoint")
            if isinstance(endpoint, str):
                served_by[endpoint] = served_by.get(endpoint, 0) + 1
        return {"event": "complete", "repo": self.o.repo_id, "revision": self.o.revision, "commit": commit,
                "files": len(record["files"]), "bytes": record["bytes"], "downloaded_bytes": downloaded,
                "cached": cached, "checks": checks, "endpoints": served_by,
                "file_endpoints": {path: meta.get("endpoint") for path, meta in record["files"].items()},
                "seconds": round(time.monotonic() - self.started, 2)}


class Progress:
    """Bytes on disk for the plan's files: finished snapshot files plus their partial files (whoever writes them:
    this attempt, a racing pull holding the blob's lock). Partials of other blobs do not count."""

    def __init__(self, cache_dir: Path, repo_id: str, commit: str, files: list[Expected], stall_bytes: int):
        self.snapshot = cache_layout.snapshot_dir(cache_dir, repo_id, commit)
        self.repo_id, self.commit = repo_id, commit
        self.files = [(f, transfer.blob_paths(cache_dir, repo_id, transfer.blob_name(f, repo_id, commit))[1])
                      for f in files]
        self.total = sum(f.size or 0 for f in files)
        self.bytes = self.measure()
        self.mark = self.bytes
        self.last_advance = self.last_emit = self.rate_time = time.monotonic()
        self.rate_bytes = self.bytes
        self.rate = 0.0
        self.stall_bytes = stall_bytes

    def measure(self) -> int:
        done = 0
        for f, partial in self.files:
            try:
                done += (self.snapshot / f.path).stat().st_size
            except OSError:
                done += transfer.partial_bytes(partial, f.size)
        return min(done, self.total)

    def sample(self, now: float) -> None:
        self.bytes = self.measure()
        if self.bytes - self.mark >= self.stall_bytes or self.bytes >= self.total:
            self.mark = self.bytes
            self.last_advance = now
        if now - self.rate_time >= 1.0:
            instant = max(0, self.bytes - self.rate_bytes) / (now - self.rate_time)
            self.rate = instant if self.rate == 0 else 0.7 * self.rate + 0.3 * instant
            self.rate_bytes, self.rate_time = self.bytes, now

    def due(self, now: float, interval: float) -> bool:
        return now - self.last_emit >= interval

    def line(self, now: float) -> dict:
        self.last_emit = now
        remaining = self.total - self.bytes
        eta = round(remaining / self.rate) if self.rate > 0 else None
        return {"event": "progress", "repo": self.repo_id, "commit": self.commit, "bytes": self.bytes,
                "total": self.total, "rate": round(self.rate), "eta_seconds": eta if remaining else 0,
                "text": f"{human(self.bytes)}/{human(self.total)} at {human(self.rate)}/s"
                        + (f", eta {eta}s" if eta is not None and remaining else "")}


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f}{unit}" if unit != "B" else f"{int(n)}B"
        n /= 1024
    return f"{n}"


def redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


def emit_json(secret: str | None, termination_log: Path | None) -> Emit:
    """Prints each event as one JSON line (token-redacted); the final event also goes to the termination log."""

    def emit(event: dict) -> None:
        line = redact(json.dumps(event, sort_keys=True), secret)
        print(line, flush=True)
        if termination_log is not None and event["event"] in ("complete", "failed"):
            if len(line) > TERMINATION_LIMIT:     # Kubernetes keeps 4 KiB: drop the per-file detail, stay JSON
                short = {k: v for k, v in event.items() if k != "file_endpoints"}
                # Redacted before it is cut: a token cut in two would no longer match.
                short["message"] = redact(str(short["message"]), secret)[:1000] if "message" in short else None
                line = redact(json.dumps({k: v for k, v in short.items() if v is not None}, sort_keys=True), secret)
            try:
                termination_log.write_text(line[:TERMINATION_LIMIT])
            except OSError:
                pass

    return emit


def token_from_env(source: Source, override: str | None) -> str | None:
    value = os.environ.get(override or source.token_env, "").strip()
    return value or None
