"""Gateway benchmark: what `modeldeploy gateway` adds to a request, against calling the model's server directly, side
by side in one run on this machine. One `modeldeploy serve` of all-MiniLM-L6-v2 (the pod; 2 torch threads), one
`modeldeploy gateway` routing to it (--static-model: the same proxy path as in the cluster, without the watch). The
two paths take turns, round after round, so that the machine's drift falls on both.

What the gateway adds to a request is measured outside the model server: each answer carries the server's own
share (`Server-Timing: serve;dur=`, from its handler's start to the answer ready: queued for a batch, the forward
pass), which the gateway passes on. A request's time less that share is its time outside the server's handler
(the client, the network, the server's HTTP handling, and on the one path the gateway); the gateway's added time is
that figure through the gateway less the same figure direct, at p50 and p99. End to end, the two paths' latencies at
64 in flight differ by whatever the batches' luck was (+-100 ms here): the server's share takes that out. What is
left still moves by several ms from round to round (where in a batch's answers a probe's falls, what else the two
cores ran), so at 64 in flight the added p50 is taken round by round, each gateway round against the direct round
just before it, and printed with a 95% interval for the mean of those differences.

Loads, single-text embedding requests:
- 64 in flight: 56 kept by wrk (C, so that the load generator takes little of the cores) and 8 probes from this
  process, which time each of their requests and read Server-Timing (the target: <= 2 ms p50 added, >= 0.9x direct
  throughput).
- 1 client (no queueing), from this process.
- Then a stub server answering a fixed 384-float embedding at once (no model, no Server-Timing): the gateway's own
  cost per request end to end, and how many requests a second it can forward here at most.

With --separate-cores the model server gets core 0 (1 thread) and the gateway and the load core 1: the gateway off
the model's cores, as in a cluster where it runs in a pod of its own. wrk: Debian's `wrk` (hack/install-deps.sh).

    .venv/bin/python bench/gateway_bench.py [--seconds 10] [--paired-rounds 16] [--rounds 3] [--separate-cores]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.serve_bench import load, percentile, sentences, summarize  # noqa: E402
from tests.helpers import ServeProcess, free_port, wait_for  # noqa: E402
from tests.hubserver import HubServer, Repo  # noqa: E402
from tests.models import MINILM, minilm_dir, pull_into  # noqa: E402


STUB_SERVER = r'''
import json, sys
from aiohttp import web
answer = json.dumps({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.125] * 384}],
                     "model": "stub", "usage": {"prompt_tokens": 8, "total_tokens": 8}})
async def embeddings(request):
    await request.read()
    return web.Response(text=answer, content_type="application/json")
app = web.Application(); app.router.add_post("/v1/embeddings", embeddings)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
'''


def compare(paths: dict, clients: int, rounds: int, seconds: float, corpus: list[str], what: str) -> None:
    runs: dict[str, list[dict]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, (url, extra) in paths.items():
            runs[name].append(asyncio.run(load(url, clients, 1, seconds, corpus, extra)))
    direct, through = summarize(runs["direct"]), summarize(runs["gateway"])
    print(f"{what}, single text x {clients} client{'s' if clients > 1 else ''}, {rounds} rounds of {seconds:g} s "
          f"per path:")
    for name, result in (("direct", direct), ("gateway", through)):
        print(f"  {name:8s} {result['texts_per_s']:7.1f} req/s  p50 {result['p50'] * 1000:7.2f} ms  "
              f"p99 {result['p99'] * 1000:7.2f} ms  ({result['errors']} errors; rounds "
              f"{', '.join(f'{r:.1f}' for r in result['round_rates'])} req/s)")
    print(f"  gateway added, end to end: p50 {(through['p50'] - direct['p50']) * 1000:+.2f} ms, "
          f"p99 {(through['p99'] - direct['p99']) * 1000:+.2f} ms; throughput "
          f"{through['texts_per_s'] / direct['texts_per_s']:.3f}x direct")
    if direct["outside"] and through["outside"]:
        print(outside_the_server(direct["outside"], through["outside"]))


def outside_the_server(direct: list[float], through: list[float]) -> str:
    """Each path's time outside the model server's handler (sorted lists, seconds), and the gateway's added time:
    the difference at p50 and at p99."""
    figures = {name: (statistics.median(times), percentile(times, 0.99)) for name, times in
               (("direct", direct), ("gateway", through))}
    each = "; ".join(f"{name} p50 {p50 * 1000:.2f} ms p99 {p99 * 1000:.2f} ms ({len(times)} requests)"
                     for (name, (p50, p99)), times in zip(figures.items(), (direct, through)))
    return (f"  outside the server's handler (a request's time less its Server-Timing serve): {each}\n"
            f"  gateway added: p50 {(figures['gateway'][0] - figures['direct'][0]) * 1000:+.2f} ms, "
            f"p99 {(figures['gateway'][1] - figures['direct'][1]) * 1000:+.2f} ms")


def paired_rounds(direct: list[float], through: list[float]) -> str:
    """The gateway's added p50 round by round (each gateway round less the direct round just before it), with a
    95% interval for their mean from resampling the rounds. Which batch a probe lands in moves a round's p50 by
    several ms, so one pooled p50 difference cannot show a 2 ms target; pairing adjacent rounds takes out the
    machine's drift, and the interval says how much is left."""
    differences = [(g - d) * 1000 for d, g in zip(direct, through)]
    rng = random.Random(0)
    means = sorted(statistics.mean(rng.choices(differences, k=len(differences))) for _ in range(10_000))
    return (f"  gateway added p50, round by round: {', '.join(f'{d:+.1f}' for d in differences)} ms; mean "
            f"{statistics.mean(differences):+.2f} ms (95% interval {means[250]:+.2f} to {means[9750]:+.2f} ms), "
            f"median {statistics.median(differences):+.2f} ms")


WRK_SCRIPT = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = {body}
"""


def wrk_with_probes(paths: dict, rounds: int, seconds: int, text: str, probes: int = 8) -> None:
    """64 in flight per path: wrk keeps 64 - `probes`, the probes the rest; the paths take turns."""
    results = {name: {"rates": [], "wrk_p50": [], "times": [], "outside": [], "round_p50": []} for name in paths}
    with tempfile.TemporaryDirectory(prefix="gateway-bench-wrk-") as folder:
        scripts = {}
        for name, (url, extra) in paths.items():
            scripts[name] = Path(folder) / f"{name}.lua"
            # A JSON string is also a valid Lua string: the body (as load() sends it), quoted once more.
            scripts[name].write_text(WRK_SCRIPT.format(body=json.dumps(json.dumps({"input": [text], **extra}))))
        for _ in range(rounds):
            for name, (url, extra) in paths.items():
                wrk = subprocess.Popen(["wrk", "-t1", f"-c{64 - probes}", f"-d{seconds}s", "--latency", "--timeout",
                                        "60s", "-s", str(scripts[name]), f"{url}/v1/embeddings"],
                                       stdout=subprocess.PIPE, text=True)
                # The probes stop a second early, so that all of their requests meet wrk's full load.
                probed = asyncio.run(load(url, probes, 1, seconds - 1, [text], extra))
                report = wrk.communicate()[0]
                if probed["errors"]:
                    sys.exit(f"{probed['errors']} of the probes' requests failed ({name})")
                rate, p50 = (re.search(r"Requests/sec:\s+([\d.]+)", report), re.search(r"\s50%\s+(\S+)", report))
                if wrk.returncode or not rate or not p50 or re.search(r"Non-2xx|Socket errors", report):
                    sys.exit(f"wrk failed or had errors ({name}):\n{report}")
                results[name]["rates"].append(float(rate.group(1)))
                results[name]["wrk_p50"].append(p50.group(1))
                results[name]["times"] += probed["latencies"]
                results[name]["outside"] += probed["outside"]
                results[name]["round_p50"].append(statistics.median(probed["outside"]))
    print(f"all-MiniLM-L6-v2 server, single text x 64 in flight (wrk {64 - probes} + {probes} probes), {rounds} "
          f"rounds of {seconds} s per path:")
    for name, result in results.items():
        times = sorted(result["times"])
        print(f"  {name:8s} {statistics.mean(result['rates']):7.1f} req/s (rounds "
              f"{', '.join(f'{r:.1f}' for r in result['rates'])}; wrk's p50 {', '.join(result['wrk_p50'])})  "
              f"probes' p50 {statistics.median(times) * 1000:7.2f} ms ({len(times)} requests)")
    ratios = [g / d for g, d in zip(results["gateway"]["rates"], results["direct"]["rates"])]
    print(outside_the_server(sorted(results["direct"]["outside"]), sorted(results["gateway"]["outside"])))
    print(paired_rounds(results["direct"]["round_p50"], results["gateway"]["round_p50"]))
    print(f"  throughput {statistics.mean(ratios):.3f}x direct (rounds {', '.join(f'{r:.2f}' for r in ratios)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10, help="per path, per load, per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the 1-client and stub loads")
    parser.add_argument("--paired-rounds", type=int, default=16,
                        help="rounds of the 64-in-flight load: its added p50 is the mean of per-round differences")
    parser.add_argument("--separate-cores", action="store_true",
                        help="the model server on core 0 (1 thread), the gateway and the load generator on core 1: "
                        "the gateway off the model's cores, as in a cluster")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    separate = args.separate_cores
    if separate and len(cores) < 2:
        parser.error("--separate-cores needs two cores")
    if not shutil.which("wrk"):
        parser.error("needs wrk (Debian's package; hack/install-deps.sh installs it)")

    corpus = sentences(2048)
    cache = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    hub = HubServer()
    hub.add_repo(Repo.from_folder(MINILM, minilm_dir()))
    hub.start()
    commit = pull_into(cache, hub.url, MINILM)["commit"]
    hub.stop()

    if separate:        # a child keeps the cores it was started on
        os.sched_setaffinity(0, cores[:1])
    server = ServeProcess("--model", MINILM, "--revision", commit, "--cache-dir", str(cache), "--task",
                          "feature-extraction", "--threads", "1" if separate else "2").wait_ready()
    if separate:
        os.sched_setaffinity(0, cores[1:2])
    stub_port, port = free_port(), free_port()
    stub_url = f"http://127.0.0.1:{stub_port}"
    stub_server = subprocess.Popen([sys.executable, "-c", STUB_SERVER, str(stub_port)])
    gateway = subprocess.Popen([sys.executable, "-m", "modeldeploy", "gateway", "--host", "127.0.0.1", "--port",
                                str(port), "--static-model", f"minilm={MINILM}@127.0.0.1:{server.port}",
                                "--static-model", f"stub=stub@127.0.0.1:{stub_port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gateway_url = f"http://127.0.0.1:{port}"

    def gateway_ready() -> bool:
        with urllib.request.urlopen(f"{gateway_url}/readyz", timeout=2) as response:
            return response.status == 200

    try:
        wait_for(gateway_ready, 30, "the gateway")
        paths = {"direct": (server.url, {}), "gateway": (gateway_url, {"model": "minilm"})}
        for url, extra in paths.values():      # warm both paths (connections, the model's first passes)
            asyncio.run(load(url, 8, 1, 2, corpus, extra))
        wrk_with_probes(paths, args.paired_rounds, args.seconds, corpus[0])
        compare(paths, 1, args.rounds, args.seconds, corpus, "all-MiniLM-L6-v2 server")
        server.stop()
        stub = {"direct": (stub_url, {}), "gateway": (gateway_url, {"model": "stub"})}
        asyncio.run(load(stub_url, 8, 1, 1, corpus))
        for clients in (1, 64):
            compare(stub, clients, args.rounds, args.seconds / 2, corpus, "stub server (no model)")
    finally:
        server.stop()
        for process in (gateway, stub_server):
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:       # the gateway waits for requests in flight: none is left behind
                process.kill()
                process.wait()


if __name__ == "__main__":
    main()
