"""`modeldeploy monitor`: the monitoring sidecar of a serving pod."""

from __future__ import annotations

import argparse
from pathlib import Path

from aiohttp import web

from modeldeploy.cache_layout import snapshot_dir
from modeldeploy.monitor.exporter import Monitor, MonitorOptions
from modeldeploy.pull.cli import positive


def register(subparsers) -> None:
    p = subparsers.add_parser("monitor", help="the monitoring sidecar: one Prometheus endpoint per pod",
                              description=__doc__)
    p.add_argument("--target", required=True, help="the model server beside it, e.g. http://127.0.0.1:8080")
    p.add_argument("--port", type=int, default=9090)
    p.add_argument("--host", default="0.0.0.0")
    probe = p.add_mutually_exclusive_group()
    probe.add_argument("--probe-path", default="/v2/health/ready", help="the server's health path (2xx = up)")
    probe.add_argument("--probe-tcp", action="store_true",
                       help="for servers with no health path: up while the target port accepts connections")
    p.add_argument("--metrics-path", default="/metrics", help="the server's metrics path, merged into ours")
    p.add_argument("--interval", type=positive(float), default=10.0, help="seconds between health probes")
    p.add_argument("--cache-dir", type=Path, help="the cache volume, for its usage")
    p.add_argument("--model", help="ORG/NAME of the served model, with --revision: its on-disk size")
    p.add_argument("--revision", help="the served commit")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    snapshot = snapshot_dir(args.cache_dir, args.model, args.revision) if (
        args.cache_dir and args.model and args.revision) else None
    probe_path = None if args.probe_tcp else args.probe_path
    monitor = Monitor(MonitorOptions(target=args.target.rstrip("/"), probe_path=probe_path,
                                     metrics_path=args.metrics_path, interval=args.interval,
                                     cache_dir=args.cache_dir, snapshot=snapshot))
    web.run_app(monitor.app(), host=args.host, port=args.port, access_log=None, print=None)
    return 0
