"""`modeldeploy pull [options] -- [PATTERN...]`: the program the operator's pull Job runs.

File patterns are positional and come after `--`, so nothing a pattern says is ever read as an option. Every
outcome, a refused argument included, ends with one `complete` or `failed` JSON line on stdout and in the
termination log. Exit codes: 0 pulled (or already complete), 1 internal error, 3 permanent failure (invalid
arguments, not found, no access, unsafe path, invalid commit, nothing selected), 4 transient failure (network, rate
limit, stall, deadline, endpoints disagreeing on the commit), 5 no space in the cache, 6 integrity failure after retries."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from modeldeploy.pull import names
from modeldeploy.pull.errors import PullError, Reason, exit_code
from modeldeploy.pull.puller import Puller, PullOptions, emit_json, redact, token_from_env
from modeldeploy.pull.sources import SOURCES

SHA256_LENGTH = 64
DEFAULT_TERMINATION_LOG = Path("/dev/termination-log")


def argument_type(check):
    """An argparse type from one of `names`' checks (ValueError -> a usage error that names the value)."""
    def parse(value: str) -> str:
        try:
            return check(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    parse.__name__ = check.__name__
    return parse


repo_id = argument_type(names.repo_id)        # also `modeldeploy serve --model`


def checksum(value: str) -> tuple[str, str]:
    path, _, digest = value.rpartition("=")
    if not path or len(digest) != SHA256_LENGTH or any(c not in "0123456789abcdefABCDEF" for c in digest):
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
                              usage="%(prog)s [options] -- [PATTERN ...]", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=sorted(SOURCES), default="huggingface")
    p.add_argument("--model", required=True, type=repo_id, help="ORG/NAME on the hub")
    p.add_argument("--revision", default="main", type=argument_type(names.revision),
                   help="branch, tag, refs/pr/N or 40-hex commit (default: main)")
    p.add_argument("--cache-dir", required=True, type=Path, help="the shared cache (Hugging Face cache layout)")
    p.add_argument("patterns", nargs="*", metavar="PATTERN", type=argument_type(names.pattern),
                   help="after --: fnmatch patterns of files to pull (default: all but duplicate weight formats)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="PATTERN", type=argument_type(names.pattern))
    p.add_argument("--allow-pickle", action="store_true",
                   help="also pull pickle weights (*.bin, *.pt) when safetensors exist")
    p.add_argument("--gguf", action="store_true",
                   help="for llama.cpp: only .gguf files, of one quantisation (the patterns' or a default order's)")
    p.add_argument("--checksum", action="append", type=checksum, default=[], metavar="PATH=SHA256",
                   help="a sha256 to check PATH against (for hubs that publish no hashes)")
    p.add_argument("--endpoint", action="append", default=[], metavar="URL",
                   help="hub or mirror URL; repeat for fallbacks, tried in order (default: the source's own)")
    p.add_argument("--token-env", help="environment variable holding the token (default: HF_TOKEN for "
                                       "huggingface, GITEE_TOKEN for gitee)")
    p.add_argument("--timeout", type=positive(float), default=30.0, help="seconds per network read (default 30)")
    p.add_argument("--retries", type=int, default=5, help="attempts after the first (default 5)")
    p.add_argument("--retry-wait", type=positive(float), default=2.0, help="first backoff in seconds (default 2)")
    p.add_argument("--workers", type=positive(int), default=4, help="files downloaded at once (default 4)")
    p.add_argument("--streams-per-file", type=positive(int), default=4,
                   help="ranged pieces fetched at once for one file of at least --split-size bytes (default 4)")
    p.add_argument("--streams", type=positive(int), default=8, help="streams at once in all (default 8)")
    p.add_argument("--split-size", type=positive(int), default=64 << 20,
                   help="files at least this many bytes are fetched as ranged pieces of about this size, in file "
                        "order (default 64 MiB)")
    p.add_argument("--stall-timeout", type=positive(float), default=60.0,
                   help="cut and retry when less than --stall-bytes arrive in this many seconds (default 60)")
    p.add_argument("--stall-bytes", type=positive(int), default=64 * 1024)
    p.add_argument("--deadline", type=positive(float), help="overall limit in seconds")
    p.add_argument("--progress-interval", type=positive(float), default=5.0, help="seconds between progress lines")
    p.add_argument("--termination-log", type=Path, default=DEFAULT_TERMINATION_LOG,
                   help="where the final JSON line is also written (the pod's termination message)")
    p.set_defaults(run=run)
    answer_usage_errors(p)


def answer_usage_errors(parser: argparse.ArgumentParser) -> None:
    """argparse answers a bad argument with exit 2 and a line on stderr, which the operator cannot read. Here every
    refused argument (a bad id, revision or pattern, an unknown option, a pattern before `--`) ends like any other
    permanent failure: the `failed` line (InvalidArguments) on stdout and in the termination log, exit 3."""
    parse_known_args = parser.parse_known_args

    def error(message: str):
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(refuse(message, parser._argv))

    def checked_parse(args=None, namespace=None):
        parser._argv = list(sys.argv[1:] if args is None else args)
        namespace, extras = parse_known_args(args, namespace)
        if extras:
            error(f"unrecognized arguments: {' '.join(extras)}")
        if namespace.patterns and "--" not in parser._argv:
            error("file patterns come after '--': modeldeploy pull [options] -- PATTERN...")
        return namespace, extras

    parser._argv = []
    parser.error = error                      # instance attributes: what argparse calls on this subparser
    parser.parse_known_args = checked_parse


def refuse(message: str, argv: list[str]) -> int:
    """The `failed` line for arguments that never parsed: the termination log, model and revision are read from
    the options before `--` (best effort), the message is redacted of any token in the environment."""
    options = argv[:argv.index("--")] if "--" in argv else argv

    def option(name: str) -> str | None:
        for i, arg in enumerate(options):
            if arg == name and i + 1 < len(options):
                return options[i + 1]
            if arg.startswith(name + "="):
                return arg[len(name) + 1:]
        return None

    termination_log = Path(option("--termination-log") or DEFAULT_TERMINATION_LOG)
    emit = emit_json(None, termination_log if termination_log.parent.is_dir() else None)
    for source in SOURCES.values():
        message = redact(message, token_from_env(source, None))
    emit({"event": "failed", "repo": option("--model"), "revision": option("--revision") or "main",
          "reason": Reason.INVALID_ARGUMENTS.value, "message": message, "retryable": False})
    return exit_code(Reason.INVALID_ARGUMENTS)


def run(args: argparse.Namespace) -> int:
    source = SOURCES[args.source]
    token = token_from_env(source, args.token_env)
    termination_log = args.termination_log if args.termination_log.parent.is_dir() else None
    emit = emit_json(token, termination_log)
    options = PullOptions(
        source=source, repo_id=args.model, revision=args.revision, cache_dir=args.cache_dir,
        endpoints=args.endpoint, patterns=args.patterns or None, excludes=args.exclude, allow_pickle=args.allow_pickle,
        gguf=args.gguf, checksums=dict(args.checksum), timeout=args.timeout, retries=max(0, args.retries),
        retry_wait=args.retry_wait, workers=args.workers, stall_timeout=args.stall_timeout,
        stall_bytes=args.stall_bytes, deadline=args.deadline, progress_interval=args.progress_interval,
        streams_per_file=args.streams_per_file, streams=args.streams, split_size=args.split_size, token=token)
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
