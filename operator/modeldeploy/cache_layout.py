"""Where things live in a shared model cache: the Hugging Face cache layout (written by huggingface_hub) plus
modeldeploy's completion markers. Used by the puller (writes markers) and the runtime (refuses a snapshot without
one), so a half-pulled snapshot is never served."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

MARKER_DIR = ".modeldeploy/complete"


def repo_folder(cache_dir: Path, repo_id: str) -> Path:
    return Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))


def snapshot_dir(cache_dir: Path, repo_id: str, commit: str) -> Path:
    return repo_folder(cache_dir, repo_id) / "snapshots" / commit


def selection_key(files: list[str]) -> str:
    """Identifies a set of files of one commit: two pulls of different file sets get different markers."""
    return hashlib.sha256("\n".join(sorted(files)).encode()).hexdigest()[:16]


def marker_path(cache_dir: Path, repo_id: str, commit: str, files: list[str]) -> Path:
    folder = repo_folder(cache_dir, repo_id).name
    return Path(cache_dir) / MARKER_DIR / folder / commit / f"{selection_key(files)}.json"


def write_marker(path: Path, record: dict) -> None:
    """Atomic: readers see either no marker or a whole one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as out:
        json.dump(record, out, indent=1, sort_keys=True)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def complete_markers(cache_dir: Path, repo_id: str, commit: str) -> list[dict]:
    """Every completion record of `repo_id` at `commit` (one per pulled file selection)."""
    folder = Path(cache_dir) / MARKER_DIR / repo_folder(cache_dir, repo_id).name / commit
    records = [read_marker(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    return [r for r in records if r]
