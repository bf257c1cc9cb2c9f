"""`modeldeploy render -f md.yaml`: the objects a ModelDeployment becomes, from the same builders the operator
uses - for review in GitOps and for debugging, like `helm template`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from modeldeploy.api import KIND, SpecError, name_problems, parse_spec
from modeldeploy.manifests.cache import build_cache_pvc
from modeldeploy.manifests.common import weights_key
from modeldeploy.manifests.monitoring import build_pod_monitor
from modeldeploy.manifests.pull_job import build_pull_job
from modeldeploy.manifests.serving import build_deployment, build_service
from modeldeploy.config import OperatorConfig, load_config
from modeldeploy.pull.selection import served_gguf


class PlainDumper(yaml.SafeDumper):
    """No YAML anchors: builders share label dicts between objects, readers want them spelled out."""

    def ignore_aliases(self, data) -> bool:
        return True


class RenderError(Exception):
    pass


def render(body: dict, config: OperatorConfig, commit: str | None = None, pod_monitor: bool = False) -> list[dict]:
    if body.get("kind") != KIND:
        raise RenderError(f"expected kind {KIND}, got {body.get('kind')!r}")
    name = body.get("metadata", {}).get("name")
    if not name:
        raise RenderError("metadata.name is required")
    try:
        spec = parse_spec(body)
    except SpecError as error:
        raise RenderError(str(error)) from None
    if problems := name_problems(name) + spec.problems(config):
        raise RenderError("; ".join(problems))
    key = weights_key(spec, config)
    # Before the pull, the commit is unknown unless the revision is one; the operator fills in the resolved one.
    pinned = commit or spec.model.revision
    # So is the GGUF file llama.cpp loads (the pull chooses it), unless spec.model.files names one.
    gguf = served_gguf(p for p in spec.model.files or [] if not any(c in p for c in "*?[")) or "<pulled>.gguf"
    objects = [build_cache_pvc(spec, config), build_pull_job(spec, config, key),
               build_deployment(name, spec, config, pinned, gguf=gguf), build_service(name, spec)]
    if pod_monitor and spec.monitoring.enabled:
        objects.append(build_pod_monitor(name))
    namespace = body.get("metadata", {}).get("namespace")
    if namespace:
        for obj in objects:
            obj["metadata"]["namespace"] = namespace
    return objects


def register(subparsers) -> None:
    p = subparsers.add_parser("render", help="print the objects a ModelDeployment becomes", description=__doc__)
    p.add_argument("-f", "--filename", required=True, type=Path, help="a ModelDeployment manifest (- for stdin)")
    p.add_argument("--config", type=Path, help="the operator's configuration file (default: built-in profiles)")
    p.add_argument("--pod-monitor", action="store_true",
                   help="include the PodMonitor the operator adds where the Prometheus Operator runs")
    p.add_argument("--commit", help="the resolved commit to pin the serving pods to (default: the revision)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if str(args.filename) == "-" else args.filename.read_text()
    try:
        documents = [d for d in yaml.safe_load_all(text) if d]
        config = load_config(args.config)
        objects = [obj for body in documents for obj in render(body, config, args.commit, args.pod_monitor)]
    except (RenderError, yaml.YAMLError, ValidationError, OSError) as error:
        print(f"modeldeploy render: {error}", file=sys.stderr)
        return 1
    yaml.dump_all(objects, sys.stdout, Dumper=PlainDumper, sort_keys=False)
    return 0
