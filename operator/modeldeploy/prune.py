"""`modeldeploy prune --cache-dir DIR --model ORG/NAME --commit SHA40 [--keep ORG/NAME@SHA40 ...]`: the program
the operator's prune Job runs when the last user of a (model, commit) goes.

It removes, in this order, the commit's completion markers (so no runtime takes the snapshot for complete from
then on), every `refs/<name>` holding the commit, each blob the snapshot links to that no other snapshot of the
repository links to, and the snapshot itself; so a run cut off anywhere is finished by the next one. Each blob is
decided and removed under huggingface_hub's per-blob file lock (`.locks/<repo folder>/<blob>.lock`, also taken by
`modeldeploy pull`), with the other snapshots read again once the lock is held, so a blob a concurrent pull is
linking stays; one still locked after `--lock-timeout` stays, with the unmarked snapshot, for the next run. When no
snapshot is left and no `--keep` names the repository, partial downloads nobody holds the lock of, the lock files
and the emptied folders go too.

Nothing is followed out of the cache: the repository's folders must be real folders, a snapshot entry is only ever
unlinked (a link leading out of `blobs/` loses the link, its target is untouched), and blobs are named by the
links' last component inside `blobs/`.

Output as `modeldeploy pull`'s: JSON lines on stdout (`waiting` while a blob's lock is held elsewhere), the last
one `pruned` or `failed` and also written to the termination log. Exit codes: 0 pruned (or nothing to prune),
1 internal error, 2 invalid arguments, 3 an unsafe cache layout (nothing removed)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import sys
import time
from pathlib import Path

from filelock import FileLock, Timeout

from modeldeploy import cache_layout
from modeldeploy.pull.cli import positive, repo_id
from modeldeploy.pull.errors import Reason

EXIT_INTERNAL = 1
EXIT_INVALID = 2
EXIT_UNSAFE = 3
DEFAULT_TERMINATION_LOG = Path("/dev/termination-log")


def commit(value: str) -> str:
    if not cache_layout.COMMIT_RE.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a commit: exactly 40 lower-case hex digits")
    return value


def kept(value: str) -> tuple[str, str]:
    model, at, sha = value.rpartition("@")
    if not at:
        raise argparse.ArgumentTypeError(f"{value!r} is not ORG/NAME@SHA40")
    return repo_id(model), commit(sha)


def is_partial(name: str) -> bool:
    """huggingface_hub's `<etag>.<random>.incomplete`, the puller's `<hash>.part`, `<hash>.part.json` and its
    `.<hash>.part.json.<pid>.tmp`, or any `<hash>.partial...`: the blob's name, then a `part...` or `incomplete`."""
    parts = name.lstrip(".").split(".")
    return len(parts) > 1 and (parts[-1] == "incomplete" or any(p.startswith("part") for p in parts[1:]))


def blob_of_partial(name: str) -> str:
    return name.lstrip(".").split(".")[0]


class Pruner:
    def __init__(self, cache_dir: Path, model: str, sha: str, keep: set[tuple[str, str]], lock_timeout: float,
                 emit):
        self.model, self.commit, self.keep, self.lock_timeout, self.emit = model, sha, keep, lock_timeout, emit
        self.cache = Path(os.path.realpath(cache_dir))
        self.repo = cache_layout.repo_folder(self.cache, model)
        self.blobs, self.snapshots, self.refs = self.repo / "blobs", self.repo / "snapshots", self.repo / "refs"
        self.locks = self.cache / ".locks" / self.repo.name
        self.freed = self.removed = self.kept = self.busy = 0

    def run(self) -> dict:
        started = time.monotonic()
        self.check_layout()
        protected = (self.model, self.commit) in self.keep
        if not protected:
            self.remove_commit()
        removed_repo = not any(model == self.model for model, _ in self.keep) and self.remove_repo_if_unused()
        return {"event": "pruned", "repo": self.model, "commit": self.commit, "protected": protected,
                "freed_bytes": self.freed, "removed_blobs": self.removed, "kept_blobs": self.kept,
                "busy_blobs": self.busy, "removed_repo": removed_repo,
                "seconds": round(time.monotonic() - started, 2)}

    def check_layout(self) -> None:
        """Every folder this run removes from must be a real folder of this cache, not a link to somewhere else."""
        for folder in (self.repo, self.blobs, self.snapshots, self.refs, self.repo / ".no_exist",
                       self.snapshots / self.commit, self.cache / ".locks", self.locks):
            try:
                mode = os.lstat(folder).st_mode
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(mode):
                raise cache_layout.UnsafeCachePath(f"{folder} is not a folder (a link or a file); refusing to prune")
        cache_layout.marker_folder(self.cache, self.model, self.commit)   # raises when the markers lead out

    # -- the commit -----------------------------------------------------------------------------------------------
    def remove_commit(self) -> None:
        remove(cache_layout.marker_folder(self.cache, self.model, self.commit))
        for ref in files_under(self.refs):
            info = os.lstat(ref)
            if stat.S_ISREG(info.st_mode) and info.st_size <= 256 and ref.read_text(errors="replace").strip() == \
                    self.commit:
                ref.unlink()
        snapshot = self.snapshots / self.commit
        for name in sorted(self.linked_blobs(snapshot)):
            self.remove_blob(name)
        if self.busy:
            return    # the snapshot stays (unmarked, so unused) to name the busy blobs to the next run
        self.freed += sum(p.stat(follow_symlinks=False).st_size for p in files_under(snapshot) if not p.is_symlink())
        remove(snapshot)
        remove(self.repo / ".no_exist" / self.commit)
        remove_empty_folders(self.refs)

    def linked_blobs(self, snapshot: Path) -> set[str]:
        """Names in `blobs/` that the snapshot's links point at (with `..` and links above the blob resolved, the
        blob itself not followed)."""
        blobs = os.path.realpath(self.blobs)
        names = set()
        for link in files_under(snapshot):
            if link.is_symlink():
                target = os.path.join(link.parent, os.readlink(link))
                name = os.path.basename(target)
                if os.path.realpath(os.path.dirname(target)) == blobs and name not in ("", ".", "..") \
                        and not is_partial(name):
                    names.add(name)
        return names

    def remove_blob(self, name: str) -> None:
        self.locks.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.locks / f"{name}.lock"), mode=0o664)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            self.emit({"event": "waiting", "repo": self.model, "blob": name, "for": "the blob's lock"})
            try:
                lock.acquire(timeout=self.lock_timeout)
            except Timeout:
                self.busy += 1
                return
        try:
            # Read again under the lock: a pull of another commit may have linked the blob meanwhile.
            others = [s for s in self.snapshots.iterdir() if s.name != self.commit] if self.snapshots.is_dir() else []
            if any(name in self.linked_blobs(s) for s in others):
                self.kept += 1
                return
            blob = self.blobs / name
            try:
                info = os.lstat(blob)
            except FileNotFoundError:
                return
            if stat.S_ISDIR(info.st_mode):
                return
            blob.unlink()
            self.removed += 1
            self.freed += info.st_size if stat.S_ISREG(info.st_mode) else 0
        finally:
            lock.release()

    # -- the repository -------------------------------------------------------------------------------------------
    def remove_repo_if_unused(self) -> bool:
        """True when this run removed the repository's folder; its lock and marker folders go once it is gone
        (also when an earlier run removed the folder and was cut off before them)."""
        existed = self.repo.exists()
        if existed:
            if self.snapshots.is_dir() and any(self.snapshots.iterdir()):
                return False
            self.reclaim_partials()
            remove(self.repo / ".no_exist")
            remove_empty_folders(self.repo)
            if self.repo.exists():
                return False
        for path in sorted(self.locks.glob("*.lock")) if self.locks.is_dir() else []:
            try:
                # Unlinked while held: filelock notices a waiter's inode went and locks a new file instead.
                with FileLock(str(path), timeout=0, mode=0o664):
                    path.unlink(missing_ok=True)
            except Timeout:
                continue
        remove_empty_folders(self.locks)
        remove_empty_folders(self.cache / cache_layout.MARKER_DIR / self.repo.name)
        return existed

    def reclaim_partials(self) -> None:
        """Partial downloads whose blob lock nobody holds: no pull is writing them."""
        self.locks.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.blobs.iterdir()) if self.blobs.is_dir() else []:
            if not is_partial(path.name) or path.is_symlink():
                continue
            try:
                with FileLock(str(self.locks / f"{blob_of_partial(path.name)}.lock"), timeout=0, mode=0o664):
                    info = path.stat(follow_symlinks=False)
                    path.unlink()
            except (Timeout, FileNotFoundError):
                continue
            self.freed += min(info.st_size, info.st_blocks * 512)   # a sparse partial holds only what was written


def files_under(folder: Path) -> list[Path]:
    """Every non-folder entry below `folder`, links included but never followed."""
    found = []
    for root, dirs, names in os.walk(folder):
        found += [Path(root, name) for name in names]
        found += [Path(root, name) for name in dirs if os.path.islink(os.path.join(root, name))]
    return found


def remove(path: Path) -> None:
    """Removes a file, a link (never its target) or a folder tree (shutil's fd-based walk follows no link)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path)
    else:
        path.unlink()


def remove_empty_folders(folder: Path) -> None:
    """`folder` and the folders below it, bottom up, where empty; anything with content stays."""
    if not folder.is_dir() or folder.is_symlink():
        return
    for root, _, _ in os.walk(folder, topdown=False):
        try:
            os.rmdir(root)
        except OSError:
            pass


def emitter(termination_log: Path | None):
    def emit(event: dict) -> None:
        line = json.dumps(event, sort_keys=True)
        print(line, flush=True)
        if termination_log is not None and event["event"] in ("pruned", "failed"):
            try:
                termination_log.write_text(line)
            except OSError:
                pass
    return emit


def termination_log(path: str | Path | None) -> Path | None:
    path = Path(path or DEFAULT_TERMINATION_LOG)
    return path if path.parent.is_dir() else None


def register(subparsers) -> None:
    p = subparsers.add_parser("prune", help="remove a commit's snapshot and the blobs only it used from the cache",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-dir", required=True, type=Path, help="the shared cache (Hugging Face cache layout)")
    p.add_argument("--model", required=True, type=repo_id, help="ORG/NAME")
    p.add_argument("--commit", required=True, type=commit, help="the 40-hex commit whose snapshot goes")
    p.add_argument("--keep", action="append", default=[], type=kept, metavar="ORG/NAME@SHA40",
                   help="a (model, commit) still in use in this cache: never removed (repeat for each)")
    p.add_argument("--lock-timeout", type=positive(float), default=600.0,
                   help="seconds to wait for a blob's lock before leaving that blob (default 600)")
    p.add_argument("--termination-log", type=Path, default=DEFAULT_TERMINATION_LOG,
                   help="where the final JSON line is also written (the pod's termination message)")
    p.set_defaults(run=run)
    answer_usage_errors(p)


def answer_usage_errors(parser: argparse.ArgumentParser) -> None:
    """Every refused argument (a bad id or commit, an unknown or missing option) ends with the `failed` line on
    stdout and in the termination log, exit 2, instead of argparse's line on stderr that the operator cannot read."""
    parse_known_args = parser.parse_known_args

    def error(message: str):
        parser.print_usage(sys.stderr)
        argv = parser._argv
        log = next((a.split("=", 1)[1] if "=" in a else argv[i + 1] for i, a in enumerate(argv)
                    if a.split("=", 1)[0] == "--termination-log" and ("=" in a or i + 1 < len(argv))), None)
        emitter(termination_log(log))({"event": "failed", "reason": Reason.INVALID_ARGUMENTS.value,
                                       "message": message})
        raise SystemExit(EXIT_INVALID)

    def checked_parse(args=None, namespace=None):
        parser._argv = list(sys.argv[1:] if args is None else args)
        namespace, extras = parse_known_args(args, namespace)
        if extras:
            error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    parser._argv = []
    parser.error = error
    parser.parse_known_args = checked_parse


def run(args: argparse.Namespace) -> int:
    emit = emitter(termination_log(args.termination_log))
    failed = {"event": "failed", "repo": args.model, "commit": args.commit}
    if not args.cache_dir.is_dir():
        emit({**failed, "reason": Reason.INVALID_ARGUMENTS.value, "message": f"{args.cache_dir} is not a folder"})
        return EXIT_INVALID
    try:
        emit(Pruner(args.cache_dir, args.model, args.commit, set(args.keep), args.lock_timeout, emit).run())
    except cache_layout.UnsafeCachePath as error:
        emit({**failed, "reason": Reason.UNSAFE_PATH.value, "message": str(error)})
        return EXIT_UNSAFE
    except Exception as error:   # reported like the puller's internal errors: the operator reads a reason
        emit({**failed, "reason": Reason.INTERNAL.value, "message": f"{type(error).__name__}: {error}"})
        return EXIT_INTERNAL
    return 0
