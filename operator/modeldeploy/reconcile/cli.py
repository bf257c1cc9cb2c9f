"""`modeldeploy operator`: runs the reconciler against the current kubeconfig or the in-cluster service account."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("operator", help="run the ModelDeployment operator", description=__doc__)
    p.add_argument("--namespace", action="append", default=[], metavar="NS",
                   help="watch only this namespace (repeatable; default: the whole cluster)")
    p.add_argument("--config", type=Path, default=os.environ.get("MODELDEPLOY_CONFIG") or None,
                   help="the operator's configuration file (default: $MODELDEPLOY_CONFIG, else built-in)")
    p.add_argument("--health-port", type=int, default=8081, help="liveness endpoint /healthz (0: off)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import kopf

    from modeldeploy.config import load_config
    from modeldeploy.reconcile import handlers  # noqa: F401  (registers the handlers)

    config = load_config(args.config)
    namespaces = args.namespace or config.namespaces
    kopf.run(standalone=True, clusterwide=not namespaces, namespaces=namespaces,
             liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None,
             memo=kopf.Memo(config=config, namespaces=namespaces))
    return 0
