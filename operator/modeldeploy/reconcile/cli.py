"""`modeldeploy operator`: runs the reconciler against the current kubeconfig or the in-cluster service account."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("operator", help="run the ModelDeployment operator", description=__doc__)
    p.add_argument("--namespace", action="append", default=[], metavar="NS",
                   help="watch only this namespace (repeatable; default: the whole cluster)")
    p.add_argument("--config", type=Path, default=os.environ.get("MODELDEPLOY_CONFIG") or None,
                   help="the operator's configuration file (default: $MODELDEPLOY_CONFIG, else built-in)")
    p.add_argument("--health-port", type=int, default=8081, help="liveness endpoint /healthz (0: off)")
    p.add_argument("--metrics-port", type=int, default=8082, help="Prometheus endpoint /metrics (0: off)")
    p.add_argument("--check-permissions", action="store_true",
                   help="only check that this identity holds the RBAC permissions the operator needs, then exit")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import kopf
    from kubernetes import client
    from kubernetes import config as kube_config
    from prometheus_client import start_http_server

    from modeldeploy.config import load_config
    from modeldeploy.reconcile import handlers  # noqa: F401  (registers the handlers)
    from modeldeploy.reconcile.permissions import missing_permissions

    config = load_config(args.config)
    namespaces = args.namespace or config.namespaces
    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        kube_config.load_kube_config()
    missing = missing_permissions(client.AuthorizationV1Api(), namespaces)
    if missing:
        print("modeldeploy operator: this identity lacks permissions the operator needs (see the chart's RBAC):\n"
              + "\n".join(f"  {m}" for m in missing), file=sys.stderr)
        return 2
    if args.check_permissions:
        print(f"modeldeploy operator: all permissions held "
              f"({'namespaces ' + ', '.join(namespaces) if namespaces else 'cluster-wide'})")
        return 0
    if args.metrics_port:
        start_http_server(args.metrics_port)
    kopf.run(standalone=True, clusterwide=not namespaces, namespaces=namespaces,
             liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None,
             memo=kopf.Memo(config=config, namespaces=namespaces))
    return 0
