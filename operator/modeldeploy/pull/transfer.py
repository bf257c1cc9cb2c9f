"""One file of a pull into the shared cache, resumable by design.

huggingface_hub downloads into a process-unique `<etag>.<random>.incomplete` that it truncates on open, so a killed
attempt, pod or node loses everything it fetched. Here each blob has one stable partial file in the cache, named by
the blob's hash (`blobs/<hash>.part`), written under huggingface_hub's per-blob lock (`.locks/<repo>/<hash>.lock`,
the same file lock, so a huggingface_hub download of that blob waits too). Beside it, `blobs/<hash>.part.json`
records the byte ranges known to be on disk (data is flushed with fdatasync before a range is recorded), so whoever
takes the lock next — the next attempt, the next pod, a pod on another node of a shared volume — continues from
there with HTTP `Range` requests. A file of at least `split_size` bytes is cut into ranged pieces of about that
size (at least `streams_per_file` of them), fetched `streams_per_file` at once in file order and written in place;
each piece resumes on its own. The whole file is then checked (the sha256 or the other checks of `integrity.py`)
before it becomes `blobs/<hash>` and the snapshot's link: a partial whose bytes are wrong is deleted and only that
file is fetched again. The sha256 is computed while the file arrives (`PieceDigest`: pieces in file order, read
back as they complete), so a large file is not read a second time once its last byte is in.

The transfers themselves are huggingface_hub's `http_get` (its session, proxies, redirects, error mapping and its
own resume-on-drop within a call), handed a writer that keeps each segment in its place."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from modeldeploy import cache_layout
from modeldeploy.pull.errors import PullError, Reason
from modeldeploy.pull.integrity import Expected, IntegrityFailure, verify

PARTIAL = ".part"
STATE = ".part.json"
SYNC_BYTES = 8 * 1024 * 1024      # record progress (after fdatasync) at least this often...
SYNC_SECONDS = 0.5                # ...or this often
WRITE_CHUNK = 1024 * 1024         # what http_get hands over at a time


@dataclass(frozen=True)
class Streams:
    per_file: int = 4            # ranged pieces of one large file fetched at once
    split_size: int = 64 << 20   # files at least this large are split, into pieces of about this size
    total: threading.BoundedSemaphore | None = None   # connections of the whole attempt


def blob_name(f: Expected, repo_id: str, commit: str) -> str:
    """The name a blob is stored (and its partial kept) under: the hash the hub announces for it, as
    huggingface_hub names blobs after their ETag; for a hub that lists no hash, a stable name of its own."""
    return (f.sha256 or f.git_sha1 or f.checksum
            or "x-" + hashlib.sha256(f"{repo_id}@{commit}/{f.path}".encode()).hexdigest()[:40])


def blob_paths(cache_dir: Path, repo_id: str, name: str) -> tuple[Path, Path, Path, Path]:
    """(blob, partial, state, lock)."""
    repo = cache_layout.repo_folder(cache_dir, repo_id)
    blob = repo / "blobs" / name
    lock = Path(cache_dir) / ".locks" / repo.name / f"{name}.lock"
    return blob, blob.with_name(name + PARTIAL), blob.with_name(name + STATE), lock


def file_lock(path: Path, timeout: float = -1):
    """huggingface_hub's blob lock (filelock's flock on the same path, group-writable as it makes them)."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path), timeout=timeout, mode=0o664)


def partial_bytes(partial: Path, size: int | None) -> int:
    """Bytes a partial holds on disk (its allocated blocks: segments are written in place into a sparse file)."""
    try:
        info = partial.stat()
    except OSError:
        return 0
    return min(info.st_blocks * 512, size if size is not None else info.st_size)


class RangeIgnored(Exception):
    """The hub answered a ranged request with more than the range: it does not do ranges."""


class SegmentWriter:
    """The file object `http_get` writes into: positions inside one segment of the partial (pwrite, so segments
    never disturb each other), with progress recorded as it is made durable."""

    def __init__(self, fd: int, segment: list, record, counter):
        self.fd, self.segment, self.record, self.counter = fd, segment, record, counter
        self.position = segment[0] + segment[2]
        self.unsynced, self.synced_at = 0, time.monotonic()

    def tell(self) -> int:
        return self.position

    def seek(self, position: int, whence: int = 0) -> int:
        self.position = position
        return position

    def truncate(self, size: int | None = None) -> None:
        # http_get rewinds and truncates when a server answers a resume with the whole file (200, not 206).
        self.segment[2] = max(0, self.position - self.segment[0])

    def write(self, data: bytes) -> int:
        start, end, _ = self.segment
        if self.position < start or self.position + len(data) > end:
            raise RangeIgnored(f"bytes {self.position}-{self.position + len(data)} fall outside {start}-{end}")
        os.pwrite(self.fd, data, self.position)
        self.position += len(data)
        self.unsynced += len(data)
        self.counter(len(data))
        if self.unsynced >= SYNC_BYTES or time.monotonic() - self.synced_at >= SYNC_SECONDS:
            self.sync()
        return len(data)

    def sync(self) -> None:
        os.fdatasync(self.fd)
        self.segment[2] = self.position - self.segment[0]
        self.unsynced, self.synced_at = 0, time.monotonic()
        self.record()

    def flush(self) -> None:
        pass


class PieceDigest:
    """The sha256 of a partial, computed in a thread of its own in file order: each piece is read back (mostly from
    the page cache) once its transfer has returned, so its bytes are final in this attempt, while later pieces still
    download. Pieces already complete when the attempt starts (a resume) are read first."""

    def __init__(self, fd: int, segments: list[list[int]]):
        self.fd = fd
        self.ends = [end for _, end, _ in segments]
        self.ready = [done == end - start for start, end, done in segments]
        self.next = 0
        self.stopped = False
        self.sha256 = hashlib.sha256()
        self.condition = threading.Condition()
        self.thread = threading.Thread(target=self.run, name="piece-digest", daemon=True)
        self.thread.start()

    def complete(self, index: int) -> None:
        with self.condition:
            self.ready[index] = True
            self.condition.notify()

    def run(self) -> None:
        offset = 0
        try:
            while True:
                with self.condition:
                    self.condition.wait_for(lambda: self.stopped or self.next == len(self.ends)
                                            or self.ready[self.next])
                    if self.stopped or self.next == len(self.ends):
                        return
                    end = self.ends[self.next]
                while offset < end:
                    chunk = os.pread(self.fd, min(WRITE_CHUNK, end - offset), offset)
                    if not chunk:
                        raise OSError(f"the partial ends at {offset}, before {end}")
                    self.sha256.update(chunk)
                    offset += len(chunk)
                self.next += 1
        except OSError:
            self.next = -1           # no digest: the whole file is read again by the check

    def hexdigest(self) -> str | None:
        """Once every piece is complete: the file's sha256 (None if it could not be read as it arrived)."""
        self.thread.join()
        return self.sha256.hexdigest() if self.next == len(self.ends) else None

    def stop(self) -> None:
        with self.condition:
            self.stopped = True
            self.condition.notify()
        self.thread.join()


class BlobTransfer:
    """Downloads one file of a plan into the cache and links it into the snapshot; returns the check that passed."""

    def __init__(self, cache_dir: str, repo_id: str, commit: str, f: Expected, url: str, headers: dict,
                 streams: Streams, counter):
        self.cache_dir, self.repo_id, self.commit, self.f = Path(cache_dir), repo_id, commit, f
        self.url, self.headers, self.streams, self.counter = url, headers, streams, counter
        self.name = blob_name(f, repo_id, commit)
        self.blob, self.partial, self.state, self.lock = blob_paths(self.cache_dir, repo_id, self.name)
        self.snapshot = cache_layout.snapshot_dir(self.cache_dir, repo_id, commit)
        self.link = self.snapshot / f.path
        self._state_lock = threading.Lock()

    def run(self) -> str:
        repo = cache_layout.repo_folder(self.cache_dir, self.repo_id)
        # The link itself may already point at its blob: what must stay in the snapshot is the folder it sits in.
        if not (cache_layout.inside(self.snapshot, self.link.parent / ".x") and cache_layout.inside(repo, self.blob)):
            raise PullError(Reason.UNSAFE_PATH, f"{self.f.path}: its cache path leaves {repo}")
        self.blob.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self.lock):
            check = self.existing_blob()
            if check is None:
                check = self.verified(self.partial, self.fetch())
                os.replace(self.partial, self.blob)
                self.state.unlink(missing_ok=True)
            self.link_snapshot()
        return check

    def existing_blob(self) -> str | None:
        """A blob already in the cache (another revision, a racing pull) is checked, not fetched again."""
        if not self.blob.is_file():
            return None
        try:
            return verify(self.blob, self.f, self.name)
        except IntegrityFailure:
            self.blob.unlink(missing_ok=True)
            return None

    def verified(self, path: Path, known_sha256: str | None = None) -> str:
        try:
            return verify(path, self.f, self.name, known_sha256)
        except IntegrityFailure as failure:
            path.unlink(missing_ok=True)
            self.state.unlink(missing_ok=True)
            raise PullError(Reason.INTEGRITY, str(failure)) from None

    # -- the partial and its segments ------------------------------------------------------------------------------
    def load_segments(self) -> list[list[int]] | None:
        try:
            state = json.loads(self.state.read_text())
            segments = [[int(a), int(b), int(c)] for a, b, c in state["segments"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        size = self.f.size
        ordered = sorted(segments)
        contiguous = (ordered and ordered[0][0] == 0 and ordered[-1][1] == size
                      and all(a[1] == b[0] for a, b in zip(ordered, ordered[1:]))
                      and all(0 <= done <= end - start for start, end, done in ordered))
        if state.get("size") != size or not contiguous or not self.partial.is_file():
            return None
        return ordered

    def new_segments(self) -> list[list[int]]:
        size = self.f.size
        count = max(self.streams.per_file, size // self.streams.split_size) if size >= self.streams.split_size else 1
        bounds = [size * i // count for i in range(count + 1)]
        return [[bounds[i], bounds[i + 1], 0] for i in range(count)]

    def save_segments(self, segments: list[list[int]]) -> None:
        with self._state_lock:
            tmp = self.state.with_name(f".{self.state.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"size": self.f.size, "url_path": self.f.path, "segments": segments}))
            os.replace(tmp, self.state)

    def fetch(self) -> str | None:
        """Fetches what the partial lacks; returns its sha256 when computed on the way (None otherwise)."""
        if self.f.size is None:           # a hub that lists no size: one plain stream, nothing to resume against
            self.partial.unlink(missing_ok=True)
            self.stream_unsized()
            return None
        segments = self.load_segments()
        fresh = segments is None
        if fresh:
            segments = self.new_segments()
        fd = os.open(self.partial, os.O_RDWR | os.O_CREAT, 0o664)
        digest = None
        try:
            if fresh:
                os.ftruncate(fd, 0)
                os.ftruncate(fd, self.f.size)      # sparse: pieces are written in place
                self.save_segments(segments)
            digest = PieceDigest(fd, segments)
            pending = [i for i, (start, end, done) in enumerate(segments) if done < end - start]
            # In file order, `per_file` at once; the first failure cancels the pieces not begun (those in flight
            # finish: they write into `fd`, which stays open until they are done).
            pool = ThreadPoolExecutor(max_workers=max(1, min(self.streams.per_file, len(pending))))
            try:
                for future in as_completed([pool.submit(self.fetch_segment, fd, i, segments, digest)
                                            for i in pending]):
                    future.result()
            except RangeIgnored:
                pool.shutdown(cancel_futures=True)
                # The hub ignores Range: start again as one stream of the whole file.
                self.save_segments([[0, self.f.size, 0]])
                raise PullError(Reason.NETWORK, f"{self.f.path}: the hub does not honour Range requests; "
                                                "fetching it as one stream") from None
            finally:
                pool.shutdown(cancel_futures=True)
            return digest.hexdigest()
        finally:
            if digest is not None:
                digest.stop()
            os.close(fd)

    def fetch_segment(self, fd: int, index: int, segments: list[list[int]], digest: PieceDigest) -> None:
        from huggingface_hub.file_download import http_get

        segment = segments[index]
        start, end, done = segment
        writer = SegmentWriter(fd, segment, lambda: self.save_segments(segments), self.counter)
        headers = dict(self.headers)
        whole = start == 0 and end == self.f.size
        if not whole:
            headers["Range"] = f"bytes={start}-{end - 1}"
        total = self.streams.total
        if total is not None:
            total.acquire()
        try:
            http_get(self.url, writer, resume_size=done, headers=headers, expected_size=end - start,
                     displayed_filename=self.f.path)
        finally:
            if total is not None:
                total.release()
            writer.sync()
        digest.complete(index)

    def stream_unsized(self) -> None:
        from huggingface_hub.file_download import http_get

        class Counting:
            def __init__(self, out, counter):
                self.out, self.counter = out, counter

            def write(self, data):
                self.counter(len(data))
                return self.out.write(data)

            def __getattr__(self, name):
                return getattr(self.out, name)

        with open(self.partial, "wb") as out:
            http_get(self.url, Counting(out, self.counter), headers=dict(self.headers), displayed_filename=self.f.path)

    def link_snapshot(self) -> None:
        """snapshots/<commit>/<path> -> ../../blobs/<hash>, relative, as huggingface_hub links them."""
        self.link.parent.mkdir(parents=True, exist_ok=True)
        target = os.path.relpath(self.blob, self.link.parent)
        tmp = self.link.with_name(f".{self.link.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, self.link)


def reclaim(cache_dir: str, repo_id: str, keep: set[str], older_than: float) -> tuple[int, int]:
    """Deletes this repository's partial files that nothing will resume: huggingface_hub's `*.incomplete` (its
    naming cannot be resumed) and our `*.part` of blobs this pull does not take, when no live process holds the
    blob's lock and they are older than `older_than` seconds. Returns (files, bytes)."""
    from filelock import Timeout

    blobs = cache_layout.repo_folder(Path(cache_dir), repo_id) / "blobs"
    files = size = 0
    try:
        entries = list(blobs.iterdir())
    except OSError:
        return 0, 0
    now = time.time()
    for path in entries:
        if path.name.endswith(".incomplete"):
            name = path.name.split(".")[0]
        elif path.name.endswith(PARTIAL):
            name = path.name[:-len(PARTIAL)]
            if name in keep:
                continue
        else:
            continue
        try:
            info = path.stat()
            if now - info.st_mtime < older_than:
                continue
            with file_lock(blob_paths(Path(cache_dir), repo_id, name)[3], timeout=0):
                path.unlink()
                path.with_name(name + STATE).unlink(missing_ok=True)
        except (OSError, Timeout):
            continue
        files += 1
        size += info.st_blocks * 512
    return files, size
