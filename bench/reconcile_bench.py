"""Reconcile benchmark on the local cluster (hack/cluster.sh): N ModelDeployments of N different models, through the
operator, against the floor - creating the same child objects (the shared cache PVC and the N pull Jobs, the very
bodies the builders make) directly through the API, one client, in the same run.

The namespace carries a ResourceQuota of zero pods, so the Jobs exist but no pull pod runs: what is measured is the
control plane's work, not N downloads on a 2-core machine. The N models are served by a local hub server (the
operator's configured Hugging Face endpoint), which the operator asks for each model's file sizes, as it would ask
a reachable hub.

The operator talks to the API server through a counting proxy on 127.0.0.1 (this script's): every request it makes,
kopf's watches and writes included, is counted, and nothing the cluster's own controllers do is.

Prints: seconds until every ModelDeployment has its Job and a status (operator) and seconds to create the same
objects directly (floor), their ratio, the API requests the operator made per ModelDeployment and per reconcile, the
requests it made in a minute of idleness once every ModelDeployment was steady, and the operator's RSS.

    .venv/bin/python bench/reconcile_bench.py [--count 200]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import ssl
import threading
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web
from kubernetes import client, config
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from modeldeploy.api import parse_spec  # noqa: E402
from modeldeploy.manifests.cache import build_cache_pvc  # noqa: E402
from modeldeploy.manifests.common import weights_key  # noqa: E402
from modeldeploy.manifests.pull_job import build_pull_job  # noqa: E402
from modeldeploy.config import OperatorConfig  # noqa: E402
from tests.hubserver import HubServer, Repo, RepoFile  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GROUP, VERSION, PLURAL = "modeldeploy.io", "v1alpha1", "modeldeployments"
METRICS_PORT = 18082
SETTLE_SECONDS = 20
RESOURCE_PATH = re.compile(r"/namespaces/[^/]+|(?<=/)(?:modeldeployments|jobs|pods|persistentvolumeclaims|events|"
                           r"deployments|services)/[^/]+")


class CountingProxy:
    """A plain-HTTP proxy on 127.0.0.1 in front of the API server (the admin's token and CA added), counting every
    request that passes; responses are streamed, so watches work through it."""

    def __init__(self, kubeconfig: str):
        conf = yaml.safe_load(Path(kubeconfig).read_text())
        self.server = conf["clusters"][0]["cluster"]["server"]
        self.ca = conf["clusters"][0]["cluster"]["certificate-authority"]
        self.token = conf["users"][0]["user"]["token"]
        self.requests = 0
        self.by_kind: collections.Counter = collections.Counter()
        self.loop = asyncio.new_event_loop()
        self.port = 0

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        kind = RESOURCE_PATH.sub(lambda m: "/namespaces/NS" if m[0].startswith("/") else m[0].split("/")[0] + "/X",
                                 request.path)
        self.by_kind[f"{request.method} {kind}{' (watch)' if 'watch' in request.query else ''}"] += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "authorization")}
        headers["Authorization"] = f"Bearer {self.token}"
        # skip_auto_headers: no Content-Type of aiohttp's own where the client sent none (the API server reads JSON)
        async with self.session.request(request.method, self.server + request.path_qs, headers=headers,
                                        data=await request.read(), skip_auto_headers=("Content-Type",)) as upstream:
            response = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() in ("content-type",)})
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def _start(self) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
            ssl=ssl.create_default_context(cafile=self.ca), limit=0), timeout=aiohttp.ClientTimeout(total=None))
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def start(self) -> str:
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return f"http://127.0.0.1:{self.port}"

    def kubeconfig(self, path: Path) -> str:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "bench",
            "clusters": [{"name": "bench", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
            "users": [{"name": "bench", "user": {}}],
            "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "bench"}}]}))
        return str(path)


def scrape(url: str) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            values[key] = s.value
    return values


def mdep_body(i: int) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelDeployment", "metadata": {"name": f"m{i:04d}"},
            "spec": {"model": {"id": f"bench/model-{i:04d}"}, "task": "feature-extraction", "replicas": 1}}


def fresh_namespace(core: client.CoreV1Api, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name}})
    core.create_namespaced_resource_quota(name, {"metadata": {"name": "no-pods"}, "spec": {"hard": {"pods": "0"}}})
    deadline = time.monotonic() + 60
    while not core.list_namespaced_service_account(name, field_selector="metadata.name=default").items:
        if time.monotonic() > deadline:
            raise SystemExit(f"namespace {name} got no default ServiceAccount")
        time.sleep(0.2)
    return name


def floor(api: client.ApiClient, count: int, operator_config: OperatorConfig) -> float:
    """The same PVC and Jobs the operator would make, created directly, one after the other."""
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    namespace = fresh_namespace(core, "bench-floor")
    started = time.perf_counter()
    for i in range(count):
        spec = parse_spec(mdep_body(i))
        if i == 0:
            core.create_namespaced_persistent_volume_claim(namespace, build_cache_pvc(spec, operator_config))
        batch.create_namespaced_job(namespace, build_pull_job(spec, operator_config,
                                                              weights_key(spec, operator_config)))
    elapsed = time.perf_counter() - started
    core.delete_namespace(namespace)
    return elapsed


def through_operator(api: client.ApiClient, kubeconfig: str, count: int, workdir: Path, hub_url: str,
                     idle_seconds: float) -> dict:
    core, batch, custom = client.CoreV1Api(api), client.BatchV1Api(api), client.CustomObjectsApi(api)
    namespace = fresh_namespace(core, "bench-operator")
    config_file = workdir / "operator.yaml"
    config_file.write_text(yaml.safe_dump({"registry": "localhost", "imagePullPolicy": "Never",
                                           "pull": {"endpoints": {"huggingface": hub_url}}}))
    log = open(workdir / "operator.log", "w")
    proxy = CountingProxy(kubeconfig)
    proxy.start()
    operator = subprocess.Popen([sys.executable, "-m", "modeldeploy", "operator", "--namespace", namespace,
                                 "--config", str(config_file), "--health-port", "0",
                                 "--metrics-port", str(METRICS_PORT)],
                                stdout=log, stderr=subprocess.STDOUT,
                                env={"KUBECONFIG": proxy.kubeconfig(workdir / "kubeconfig"), "PATH": "/usr/bin:/bin"})
    metrics_url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
    try:
        deadline = time.monotonic() + 60
        while True:   # the operator is up once its metrics answer and its watches have started
            try:
                scrape(metrics_url)
                break
            except OSError:
                if time.monotonic() > deadline or operator.poll() is not None:
                    raise SystemExit(f"the operator did not start: {(workdir / 'operator.log').read_text()[-3000:]}")
                time.sleep(0.2)
        time.sleep(2)
        before = proxy.requests
        proxy.by_kind.clear()
        started = time.perf_counter()
        for i in range(count):
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, mdep_body(i))
        created = time.perf_counter() - started
        while True:
            jobs = len(batch.list_namespaced_job(namespace).items)
            items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
            done = sum(1 for m in items if (m.get("status") or {}).get("phase") == "Pulling"
                       and (m["status"].get("download") or {}).get("job"))
            if jobs == count and done == count:
                break
            if time.monotonic() - started > 900:
                raise SystemExit(f"timed out: {jobs} jobs, {done} statuses of {count}")
            time.sleep(0.5)
        elapsed = time.perf_counter() - started
        operator_requests = proxy.requests - before
        by_kind = proxy.by_kind.most_common(8)
        values = scrape(metrics_url)
        reconciles = sum(v for k, v in values.items() if k.startswith("modeldeploy_operator_reconciles_total"))
        own = sum(v for k, v in values.items() if k.startswith("modeldeploy_operator_api_requests_total"))
        rss = values.get("process_resident_memory_bytes", 0)
        by_result = {k.split("result=")[1].rstrip("}"): v for k, v in values.items()
                     if k.startswith("modeldeploy_operator_reconciles_total{")}
        reconcile_seconds = values.get("modeldeploy_operator_reconcile_duration_seconds_sum", 0)
        # Steady once the last retries have run: what the operator asks of the API server then is its idle cost.
        time.sleep(SETTLE_SECONDS)
        before, kinds_before = proxy.requests, collections.Counter(proxy.by_kind)
        time.sleep(idle_seconds)
        idle = proxy.requests - before
        idle_kinds = collections.Counter(proxy.by_kind) - kinds_before
        events = collections.Counter(f"{e.type} {e.reason}" for e in core.list_namespaced_event(namespace).items
                                     if e.source and e.source.component == "modeldeploy-operator")
        return {"seconds": elapsed, "create_seconds": created, "requests": operator_requests, "own": own,
                "reconciles": reconciles, "rss": rss, "namespace": namespace, "idle": idle, "events": events, "idle_kinds": idle_kinds, "by_result": by_result, "reconcile_seconds": reconcile_seconds,
                "by_kind": by_kind}
    finally:
        operator.terminate()
        operator.wait(30)
        log.close()
        core.delete_namespace(namespace)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--idle-seconds", type=float, default=60)
    args = parser.parse_args()
    kubeconfig = subprocess.run(["bash", str(REPO / "hack" / "cluster.sh"), "start"], capture_output=True,
                                text=True, check=True).stdout.strip().splitlines()[-1]
    api = config.new_client_from_config(config_file=kubeconfig)
    crd = yaml.safe_load((REPO / "crds" / "modeldeploy.io_modeldeployments.yaml").read_text())
    extensions = client.ApiextensionsV1Api(api)
    try:
        extensions.create_custom_resource_definition(crd)
    except client.ApiException as error:
        if error.status != 409:
            raise
    hub = HubServer()
    for i in range(args.count):
        hub.add_repo(Repo.from_files(mdep_body(i)["spec"]["model"]["id"],
                                     {"config.json": RepoFile("config.json", b'{"model_type": "bert"}')}))
    hub.start()
    operator_config = OperatorConfig(registry="localhost", image_pull_policy="Never",
                                     pull={"endpoints": {"huggingface": hub.url}})

    try:
        with tempfile.TemporaryDirectory() as workdir:
            floor_seconds = floor(api, args.count, operator_config)
            result = through_operator(api, kubeconfig, args.count, Path(workdir), hub.url, args.idle_seconds)
    finally:
        hub.stop()
    n = args.count
    print(f"ModelDeployments: {n} (different models: {n} pull Jobs, one shared cache PVC; pods held back by a quota)")
    print(f"floor, the same {n + 1} objects created directly:   {floor_seconds:7.2f} s")
    print(f"through the operator, until every Job and status: {result['seconds']:7.2f} s "
          f"(of which {result['create_seconds']:.2f} s creating the ModelDeployments)")
    print(f"ratio operator/floor: {result['seconds'] / floor_seconds:.2f}x")
    print(f"operator API requests (all, kopf's included): {result['requests']:.0f}; {result['requests'] / n:.1f} per "
          f"ModelDeployment; {result['requests'] / max(result['reconciles'], 1):.1f} per reconcile "
          f"({result['reconciles']:.0f} reconciles)")
    print(f"of which the reconciler's own: {result['own'] / n:.1f} per ModelDeployment")
    print(f"reconciles by result: {result['by_result']}; {result['reconcile_seconds']:.1f} s in reconciles in all "
          f"({1000 * result['reconcile_seconds'] / max(result['reconciles'], 1):.0f} ms each)")
    print(f"then idle for {args.idle_seconds:.0f} s, every ModelDeployment steady: {result['idle']:.0f} API requests "
          f"({result['idle'] * 60 / args.idle_seconds / n:.3f} per ModelDeployment per minute)"
          + (": " + ", ".join(f"{k} x{v}" for k, v in result["idle_kinds"].items()) if result["idle"] else ""))
    print(f"operator RSS: {result['rss'] / 2**20:.0f} MiB")
    print("the requests, most frequent first:")
    for kind, number in result["by_kind"]:
        print(f"  {number:6d}  {kind}")
    print("Events posted:", ", ".join(f"{n} {reason}" for reason, n in result["events"].most_common()) or "none")


if __name__ == "__main__":
    main()
