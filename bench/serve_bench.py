"""Serving benchmark with all-MiniLM-L6-v2, side by side in one run on this machine (the load generator shares the
cores with the server, as it would in a noisy pod):

  * offline: the model's own batched throughput (batch 1 and 32) - the ceiling;
  * naive: one forward pass per request behind an asyncio lock - the classic model service;
  * modeldeploy serve (fp32, dynamic batching) and modeldeploy serve --quantization int8-dynamic.

Loads: single-text requests from 64 concurrent clients, and 16-text requests from 16 clients. The three servers
run at once and take turns under each load, round after round, so that the machine's drift falls on all of them.
Prints texts/s, p50/p99 latency, the ratios the runtime's targets name, int8's mean cosine to fp32, and how much
int8 can gain here at most (torch's profiler: the share of fp32 time in linear layers, int8's kernels' speed-up).

    .venv/bin/python bench/serve_bench.py [--seconds 15] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.helpers import ServeProcess, free_port, wait_for  # noqa: E402
from tests.hubserver import HubServer, Repo  # noqa: E402
from tests.models import MINILM, minilm_dir, pull_into  # noqa: E402

WORDS = ("model cache cluster request weights serving latency batch token vector river mountain city music "
         "light garden window paper story market energy science ocean forest people time world system data "
         "network question answer friend school table computer morning evening quickly slowly bright dark").split()

# The kernels a linear layer runs: fp32 GEMM (the heads stay fp32 in the int8 model too) and the int8 ones.
LINEAR_KERNELS = {"aten::addmm", "aten::mm", "quantized::linear_dynamic", "aten::_int_mm"}

NAIVE_SERVER = r'''
import asyncio, sys, torch
from aiohttp import web
from transformers import AutoModel, AutoTokenizer
torch.set_num_threads(int(sys.argv[3]))
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1]); model = AutoModel.from_pretrained(sys.argv[1]).eval()
lock = asyncio.Lock()

def embed(texts):
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).tolist()

async def embeddings(request):
    body = await request.json()
    texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
    async with lock:
        vectors = await asyncio.get_running_loop().run_in_executor(None, embed, texts)
    return web.json_response({"data": [{"index": i, "embedding": v} for i, v in enumerate(vectors)]})

async def ready(request):
    return web.json_response({"ready": True})

app = web.Application(); app.router.add_post("/v1/embeddings", embeddings); app.router.add_get("/v2/health/ready", ready)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), print=None)
'''


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40))) + "." for _ in range(n)]


async def load(url: str, clients: int, texts_per_request: int, seconds: float, corpus: list[str],
               extra: dict | None = None) -> dict:
    """One load run: each client sends its next request as soon as the last is answered (`extra`: more fields for
    every body, such as the `model` a gateway routes on)."""
    import aiohttp

    latencies: list[float] = []
    outside: list[float] = []       # each latency less the model server's own share (its `Server-Timing: serve`)
    errors = 0
    deadline = time.monotonic() + seconds

    async def client(index: int, session) -> None:
        nonlocal errors
        rng = random.Random(index)
        while time.monotonic() < deadline:
            texts = rng.sample(corpus, texts_per_request)
            started = time.monotonic()
            async with session.post(f"{url}/v1/embeddings", json={"input": texts, **(extra or {})}) as response:
                await response.read()
                if response.status != 200:
                    errors += 1
                    continue
                timing = response.headers.get("Server-Timing", "")
            latencies.append(time.monotonic() - started)
            serve = server_timing(timing).get("serve")
            if serve is not None:
                outside.append(latencies[-1] - serve)

    started = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        await asyncio.gather(*(client(i, session) for i in range(clients)))
    return {"latencies": latencies, "texts": len(latencies) * texts_per_request, "errors": errors,
            "seconds": time.monotonic() - started, "outside": outside}


def server_timing(header: str) -> dict[str, float]:
    """`serve;dur=12.5, upstream;dur=13.1` as {"serve": 0.0125, "upstream": 0.0131} (seconds)."""
    entries = {}
    for entry in header.split(","):
        name, _, duration = entry.strip().partition(";dur=")
        if name and duration:
            entries[name] = float(duration) / 1000
    return entries


def percentile(ordered: list[float], fraction: float) -> float:
    return ordered[int(fraction * (len(ordered) - 1))]


def summarize(runs: list[dict]) -> dict:
    """Several rounds of one server under one load, pooled: texts/s over all rounds' time, percentiles over all
    their requests."""
    latencies = sorted(x for run in runs for x in run["latencies"])
    outside = sorted(x for run in runs for x in run.get("outside", []))
    return {"texts_per_s": sum(run["texts"] for run in runs) / sum(run["seconds"] for run in runs),
            "p50": statistics.median(latencies), "p99": percentile(latencies, 0.99),
            "outside": outside,
            "errors": sum(run["errors"] for run in runs),
            "round_rates": [run["texts"] / run["seconds"] for run in runs]}


def offline(snapshot: Path, corpus: list[str], threads: int) -> dict:
    """The model alone, in this process: fp32 at batch 1 and 32, and int8-dynamic (modeldeploy's own quantization)
    at batch 32; batches of 32 are cut from length-sorted texts, as the server's pass planning cuts them."""
    import copy

    import torch
    from transformers import AutoModel, AutoTokenizer

    from modeldeploy.serve.quantize import quantize_int8_dynamic

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(snapshot)
    model = AutoModel.from_pretrained(snapshot).eval()
    int8 = copy.deepcopy(model)
    quantize_int8_dynamic(int8, tokenizer)
    by_length = sorted(corpus, key=len)

    def rate(m, batch_size: int, texts: list[str]) -> float:
        count, started = 0, time.monotonic()
        while time.monotonic() - started < 6:
            start = count % (len(texts) - batch_size)
            with torch.inference_mode():
                m(**tokenizer(texts[start:start + batch_size], padding=True, return_tensors="pt"))
            count += batch_size
        return count / (time.monotonic() - started)

    def linear_seconds(m) -> tuple[float, float]:
        """(time in linear layers, time in all) over 20 batches of 32, as torch's profiler counts it."""
        from torch.profiler import ProfilerActivity, profile

        batches = [tokenizer(by_length[i:i + 32], padding=True, return_tensors="pt")   # every third batch of 32
                   for i in range(0, 20 * 96, 96)]
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as profiler:
            for batch in batches:
                m(**batch)
        events = profiler.key_averages()
        linear = sum(e.self_cpu_time_total for e in events if e.key in LINEAR_KERNELS)
        return linear / 1e6, sum(e.self_cpu_time_total for e in events) / 1e6

    rates = {"fp32 batch 1": rate(model, 1, corpus), "fp32 batch 32": rate(model, 32, by_length),
             "int8 batch 32": rate(int8, 32, by_length)}
    (fp32_linear, fp32_all), (int8_linear, _) = linear_seconds(model), linear_seconds(int8)
    return rates, {"fp32 share in linear layers": fp32_linear / fp32_all, "int8 linear speed-up":
                   fp32_linear / int8_linear}


def embed_all(url: str, texts: list[str]) -> np.ndarray:
    import json
    import urllib.request

    request = urllib.request.Request(f"{url}/v1/embeddings", data=json.dumps({"input": texts}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return np.array([d["embedding"] for d in json.loads(response.read())["data"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0, help="time each server spends under each load")
    parser.add_argument("--rounds", type=int, default=3, help="the rounds those seconds are cut into")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every server")
    args = parser.parse_args()

    corpus = sentences(2048)
    cache = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    hub = HubServer()
    hub.add_repo(Repo.from_folder(MINILM, minilm_dir()))
    hub.start()
    commit = pull_into(cache, hub.url, MINILM)["commit"]
    hub.stop()
    snapshot = cache / f"models--{MINILM.replace('/', '--')}" / "snapshots" / commit

    rates, linears = offline(snapshot, corpus, args.threads)
    print(f"offline (the model alone, {args.threads} threads): " + ", ".join(f"{k} {v:.0f} texts/s"
                                                                        for k, v in rates.items()))
    share, speedup = linears["fp32 share in linear layers"], linears["int8 linear speed-up"]
    print(f"offline, batches of 32 under torch's profiler: fp32 spends {share:.0%} of its time in linear layers; "
          f"int8's linear kernels are {speedup:.2f}x fp32's; int8 changes nothing else, so the model can gain at "
          f"most {1 / (1 - share + share / speedup):.2f}x from int8 here")

    loads = {"1 text x 64 clients": (64, 1), "16 texts x 16 clients": (16, 16)}
    naive_label, fp32, int8 = "naive (lock per request)", "modeldeploy fp32", "modeldeploy int8-dynamic"
    common = ["--model", MINILM, "--revision", commit, "--cache-dir", str(cache), "--task", "feature-extraction",
              "--threads", str(args.threads)]
    port = free_port()
    naive = subprocess.Popen([sys.executable, "-c", NAIVE_SERVER, str(snapshot), str(port), str(args.threads)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    servers = {fp32: ServeProcess(*common), int8: ServeProcess(*common, "--quantization", "int8-dynamic")}
    try:
        urls = {naive_label: f"http://127.0.0.1:{port}",
                **{label: server.wait_ready().url for label, server in servers.items()}}
        wait_for(lambda: embed_all(urls[naive_label], ["ready?"]) is not None, 120, "the naive server")
        for url in urls.values():
            asyncio.run(load(url, 8, 1, 2, corpus))      # warm-up
        # This machine's speed drifts by tens of percent over minutes (shared cores): every server gets a share of
        # each round, in a rotating order, so drift falls on all of them alike.
        runs: dict[tuple[str, str], list[dict]] = {key: [] for key in itertools.product(urls, loads)}
        for round_ in range(args.rounds):
            for name, (clients, per_request) in loads.items():
                order = list(urls)[round_ % len(urls):] + list(urls)[:round_ % len(urls)]
                for label in order:
                    runs[(label, name)].append(asyncio.run(load(urls[label], clients, per_request,
                                                                args.seconds / args.rounds, corpus)))
        check_texts = corpus[:256]
        vectors = {label: embed_all(urls[label], check_texts) for label in servers}
    finally:
        naive.terminate()
        naive.wait()
        for server in servers.values():
            server.stop()

    results = {key: summarize(value) for key, value in runs.items()}
    for (label, name), r in results.items():
        print(f"{label:>24} | {name:>22} | {r['texts_per_s']:7.1f} texts/s | p50 {r['p50'] * 1000:7.1f} ms | "
              f"p99 {r['p99'] * 1000:7.1f} ms | errors {r['errors']} | rounds "
              + " ".join(f"{rate:.0f}" for rate in r["round_rates"]))

    def ratio(a, b, key="texts_per_s"):
        return results[a][key] / results[b][key]

    single, multi = loads
    cosine = float((vectors[fp32] * vectors[int8]).sum(1).mean())
    print()
    print(f"single-text, 64 clients: throughput {ratio((fp32, single), (naive_label, single)):.2f}x naive "
          f"(target >= 2.5), p99 {ratio((fp32, single), (naive_label, single), 'p99'):.2f}x naive's "
          f"(target <= 0.5)")
    print(f"16-text, 16 clients: throughput {ratio((fp32, multi), (naive_label, multi)):.2f}x naive (target >= 1.6)")
    print(f"int8-dynamic vs fp32: throughput {ratio((int8, single), (fp32, single)):.2f}x (single-text), "
          f"{ratio((int8, multi), (fp32, multi)):.2f}x (16-text) (target >= 1.8); mean cosine {cosine:.4f} "
          f"(target >= 0.99)")
    print(f"int8-dynamic vs fp32, the model alone at batch 32: {rates['int8 batch 32'] / rates['fp32 batch 32']:.2f}x")
    ceiling = rates["fp32 batch 32"]
    print(f"server fp32 / offline batch-32 ceiling: {results[(fp32, single)]['texts_per_s'] / ceiling:.2f} "
          f"(single-text), {results[(fp32, multi)]['texts_per_s'] / ceiling:.2f} (16-text)")


if __name__ == "__main__":
    main()
