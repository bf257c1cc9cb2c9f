"""`modeldeploy gateway`: one OpenAI endpoint for every ModelDeployment in the namespaces it serves (default: all),
routing on the request's `model` field; with spec.autoscaling, the autoscaler of those models."""

from __future__ import annotations

import argparse
import sys

from modeldeploy.pull.cli import positive


def register(subparsers) -> None:
    p = subparsers.add_parser("gateway", help="one OpenAI endpoint for every ModelDeployment", description=__doc__)
    p.add_argument("--namespace", action="append", default=[], metavar="NS",
                   help="serve this namespace's ModelDeployments (repeatable; default: the whole cluster)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--max-body-mb", type=positive(float), default=4.0, help="request body size in MiB (413 above)")
    p.add_argument("--hold-timeout", type=positive(float), default=300.0,
                   help="seconds a request waits for a ready replica (a model scaling up from zero), then 503")
    p.add_argument("--max-held", type=positive(int), default=256,
                   help="requests held per model; more answer 503 with Retry-After at once")
    p.add_argument("--request-timeout", type=positive(float), default=600.0,
                   help="seconds to a model server's last byte, then 504")
    p.add_argument("--static-model", action="append", default=[], metavar="NAME=SERVED_AS@HOST:PORT[,HOST:PORT]",
                   help="route NAME to fixed servers instead of watching the cluster (one host, tests, benchmarks)")
    p.set_defaults(run=run)


def static_models(specs: list[str]):
    from modeldeploy.gateway.routing import Model

    for spec in specs:
        name, _, rest = spec.partition("=")
        served_as, _, addresses = rest.rpartition("@")
        if not (name and served_as and addresses):
            raise SystemExit(f"modeldeploy gateway: --static-model {spec!r}: expected NAME=SERVED_AS@HOST:PORT")
        yield Model(namespace="static", name=name, served_as=served_as, ready=True), addresses.split(",")


def run(args: argparse.Namespace) -> int:
    import asyncio

    from aiohttp import web

    from modeldeploy.gateway.proxy import Gateway, Options

    options = Options(max_body_bytes=int(args.max_body_mb * 2**20), hold_timeout=args.hold_timeout,
                      max_held=args.max_held, request_timeout=args.request_timeout)
    gateway = Gateway(options)
    app = gateway.build_app()
    if args.static_model:
        for model, addresses in static_models(args.static_model):
            gateway.set_model(model)
            gateway.set_addresses(model.key, addresses)
        gateway.synced.set()
    else:
        from kubernetes import client
        from kubernetes import config as kube_config

        from modeldeploy.gateway.kube import ClusterView
        from modeldeploy.reconcile.permissions import GATEWAY_RULES, missing_permissions

        try:
            kube_config.load_incluster_config()
        except kube_config.ConfigException:
            kube_config.load_kube_config()
        missing = missing_permissions(client.AuthorizationV1Api(), args.namespace, GATEWAY_RULES)
        if missing:
            print("modeldeploy gateway: this identity lacks permissions the gateway needs (see the chart's RBAC):\n"
                  + "\n".join(f"  {m}" for m in missing), file=sys.stderr)
            return 2
        view = ClusterView(client.ApiClient(), gateway, args.namespace)
        gateway.write_status = view.write_status

        async def watch(_app) -> None:
            view.start(asyncio.get_running_loop())

        app.on_startup.append(watch)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)
    return 0
