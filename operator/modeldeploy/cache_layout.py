"""Where things live in a shared model cache: the Hugging Face cache layout plus modeldeploy's completion markers.
Used by the puller (writes markers) and the runtime (refuses a snapshot without one), so a half-pulled snapshot is
never served.

A marker is recognised only by its exact place and shape: `.modeldeploy/complete/<repo folder>/<40-hex commit>/
<16-hex selection key>.json`, a regular file (not a link) whose record names that repository and commit, maps each
file to `{"size": int|None, "check": str}` and gives `bytes`. Anything else under the marker folder is ignored."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tempfile
from pathlib import Path

MARKER_DIR = ".modeldeploy/complete"
MARKER_NAME_RE = re.compile(r"^[0-9a-f]{16}\.json$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
MAX_MARKER_BYTES = 16 * 1024 * 1024


class UnsafeCachePath(ValueError):
    """A path that would leave the folder it belongs in (a `..`, an absolute part, or a link pointing out)."""


def inside(folder: Path, path: Path) -> bool:
    """Whether `path`, with every link and `..` resolved, stays within `folder`. The folder's own last component is
    not followed: a `refs/` or marker folder that is itself a link elsewhere holds nothing of this cache."""
    folder = Path(folder)
    base = os.path.join(os.path.realpath(folder.parent), folder.name)
    return os.path.realpath(path).startswith(base.rstrip(os.sep) + os.sep)


def confined(folder: Path, path: Path) -> Path:
    if not inside(folder, path):
        raise UnsafeCachePath(f"{path} is not inside {folder}")
    return path


def repo_folder(cache_dir: Path, repo_id: str) -> Path:
    return Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))


def snapshot_dir(cache_dir: Path, repo_id: str, commit: str) -> Path:
    return repo_folder(cache_dir, repo_id) / "snapshots" / commit


def selection_key(files: list[str]) -> str:
    """Identifies a set of files of one commit: two pulls of different file sets get different markers."""
    return hashlib.sha256("\n".join(sorted(files)).encode()).hexdigest()[:16]


def marker_folder(cache_dir: Path, repo_id: str, commit: str) -> Path:
    if not COMMIT_RE.fullmatch(commit):
        raise UnsafeCachePath(f"{commit!r} is not a 40-hex commit")
    root = Path(cache_dir) / MARKER_DIR
    return confined(root, root / repo_folder(cache_dir, repo_id).name / commit)


def marker_path(cache_dir: Path, repo_id: str, commit: str, files: list[str]) -> Path:
    return marker_folder(cache_dir, repo_id, commit) / f"{selection_key(files)}.json"


def write_marker(path: Path, record: dict) -> None:
    """Atomic: readers see either no marker or a whole one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as out:
        json.dump(record, out, indent=1, sort_keys=True)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def is_record(record, repo_id: str, commit: str) -> bool:
    """The shape the puller writes: this repository, this commit, `files` {path: {size, check}}, `bytes`."""
    def integer(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not isinstance(record, dict) or record.get("repo") != repo_id or record.get("commit") != commit:
        return False
    files = record.get("files")
    if not integer(record.get("bytes")) or not isinstance(files, dict):
        return False
    return all(isinstance(path, str) and isinstance(meta, dict) and "size" in meta
               and (meta["size"] is None or integer(meta["size"])) and isinstance(meta.get("check"), str)
               for path, meta in files.items())


def read_marker(path: Path, repo_id: str, commit: str) -> dict | None:
    """The record at `path` if it is a marker of `repo_id` at `commit` (see the module's docstring), else None."""
    if not MARKER_NAME_RE.fullmatch(path.name):
        return None
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_MARKER_BYTES:
            return None
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if is_record(record, repo_id, commit) else None


def complete_markers(cache_dir: Path, repo_id: str, commit: str) -> list[dict]:
    """Every completion record of `repo_id` at `commit` (one per pulled file selection)."""
    try:
        folder = marker_folder(cache_dir, repo_id, commit)
        names = sorted(entry.name for entry in os.scandir(folder))
    except (UnsafeCachePath, OSError):
        return []
    records = [read_marker(folder / name, repo_id, commit) for name in names]
    return [r for r in records if r]
