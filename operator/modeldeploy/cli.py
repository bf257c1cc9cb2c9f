"""The `modeldeploy` command. Each subcommand lives in its own module and registers itself here."""

from __future__ import annotations

import argparse
import logging
import sys

from modeldeploy import __version__, prune, render
from modeldeploy.gateway import cli as gateway_cli
from modeldeploy.monitor import cli as monitor_cli
from modeldeploy.pull import cli as pull_cli
from modeldeploy.reconcile import cli as operator_cli
from modeldeploy.serve import cli as serve_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modeldeploy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"modeldeploy {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    pull_cli.register(commands)
    prune.register(commands)
    serve_cli.register(commands)
    render.register(commands)
    operator_cli.register(commands)
    monitor_cli.register(commands)
    gateway_cli.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    return int(args.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
