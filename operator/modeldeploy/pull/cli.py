"""`modeldeploy pull`: the program the operator's pull Job runs. Exit codes: 0 pulled (or already complete),
2 usage, 3 permanent failure (not found, no access, unsafe file name, nothing selected), 4 transient failure
(network, rate limit, stall, deadline), 5 no space in the cache, 6 integrity failure after retries."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from modeldeploy.pull.errors import PullError, exit_code
from modeldeploy.pull.puller import Puller, PullOptions, emit_json, redact, token_from_env
from modeldeploy.pull.sources import SOURCES

REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")


def repo_id(value: str) -> str:
    if not REPO_ID_RE.match(value) or ".." in value:
        raise argparse.ArgumentTypeError(f"{value!r} is not a model id of the form ORG/NAME")
    return value


def checksum(value: str) -> tuple[str, str]:
    path, _, digest = value.rpartition("=")
    if not path or not SHA256_RE.match(digest):
        raise argparse.ArgumentTypeError(f"{value!r} is not PATH=SHA256 (64 hex digits)")
    return path, digest.lower()


def positive(kind):
    def parse(value: str):
        number = kind(value)
        if number <= 0:
            raise argparse.ArgumentTypeError(f"{value} must be greater than 0")
        return number
    return parse


def register(subparsers) -> None:
    p = subparsers.add_parser("pull", help="pull model weights into a shared Hugging Face cache",
                              description=__doc__)
    p.add_argument("--source", choices=sorted(SOURCES), default="huggingface")
    p.add_argument("--model", required=True, type=repo_id, help="ORG/NAME on the hub")
    p.add_argument("--revision", default="main", help="branch, tag or 40-hex commit (default: main)")
    p.add_argument("--cache-dir", required=True, type=Path, help="the shared cache (Hugging Face cache layout)")
    p.add_argument("--files", nargs="+", metavar="PATTERN",
                   help="fnmatch patterns of files to pull (default: all but duplicate weight formats)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="PATTERN")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also pull pickle weights (*.bin, *.pt) when safetensors exist")
    p.add_argument("--checksum", action="append", type=checksum, default=[], metavar="PATH=SHA256",
                   help="a sha256 to check PATH against (for hubs that publish no hashes)")
    p.add_argument("--endpoint", help="hub or mirror URL (default: the source's own)")
    p.add_argument("--token-env", help="environment variable holding the token (default: HF_TOKEN for "
                                       "huggingface, GITEE_TOKEN for gitee)")
    p.add_argument("--timeout", type=positive(float), default=30.0, help="seconds per network read (default 30)")
    p.add_argument("--retries", type=int, default=5, help="attempts after the first (default 5)")
    p.add_argument("--retry-wait", type=positive(float), default=2.0, help="first backoff in seconds (default 2)")
    p.add_argument("--workers", type=positive(int), default=4, help="files downloaded at once (default 4)")
    p.add_argument("--stall-timeout", type=positive(float), default=60.0,
                   help="cut and retry when less than --stall-bytes arrive in this many seconds (default 60)")
    p.add_argument("--stall-bytes", type=positive(int), default=64 * 1024)
    p.add_argument("--deadline", type=positive(float), help="overall limit in seconds")
    p.add_argument("--progress-interval", type=positive(float), default=5.0, help="seconds between progress lines")
    p.add_argument("--termination-log", type=Path, default=Path("/dev/termination-log"),
                   help="where the final JSON line is also written (the pod's termination message)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    source = SOURCES[args.source]
    token = token_from_env(source, args.token_env)
    termination_log = args.termination_log if args.termination_log.parent.is_dir() else None
    emit = emit_json(token, termination_log)
    options = PullOptions(
        source=source, repo_id=args.model, revision=args.revision, cache_dir=args.cache_dir,
        endpoint=args.endpoint, patterns=args.files, excludes=args.exclude, allow_pickle=args.allow_pickle,
        checksums=dict(args.checksum), timeout=args.timeout, retries=max(0, args.retries),
        retry_wait=args.retry_wait, workers=args.workers, stall_timeout=args.stall_timeout,
        stall_bytes=args.stall_bytes, deadline=args.deadline, progress_interval=args.progress_interval, token=token)
    # huggingface_hub logs its own retries as warnings, with URLs; keep them, they carry no token.
    logging.getLogger("huggingface_hub").setLevel(logging.WARNING)
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    try:
        result = Puller(options, emit).run()
    except PullError as error:
        emit({"event": "failed", "repo": args.model, "revision": args.revision, "reason": error.reason.value,
              "message": redact(error.message, token), "retryable": error.retryable})
        return exit_code(error.reason)
    emit(result)
    return 0
