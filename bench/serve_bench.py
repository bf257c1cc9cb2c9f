"""Serving benchmark with all-MiniLM-L6-v2, side by side in one run on this machine (the load generator shares the
cores with the server, as it would in a noisy pod):

  * offline: the model's own batched throughput (batch 1 and 32) - the ceiling;
  * naive: one forward pass per request behind an asyncio lock - the classic model service;
  * modeldeploy serve (fp32, dynamic batching) and modeldeploy serve --quantization int8-dynamic.

Loads: single-text requests from 64 concurrent clients, and 16-text requests from 16 clients. Prints texts/s,
p50/p99 latency, the ratios the runtime's targets name, and int8's mean cosine to fp32.

    .venv/bin/python bench/serve_bench.py [--seconds 15]
"""

from __future__ import annotations

import argparse
import asyncio
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


async def load(url: str, clients: int, texts_per_request: int, seconds: float, corpus: list[str]) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds

    async def client(index: int, session) -> None:
        nonlocal errors
        rng = random.Random(index)
        while time.monotonic() < deadline:
            texts = rng.sample(corpus, texts_per_request)
            started = time.monotonic()
            async with session.post(f"{url}/v1/embeddings", json={"input": texts}) as response:
                await response.read()
                if response.status != 200:
                    errors += 1
                    continue
            latencies.append(time.monotonic() - started)

    started = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        await asyncio.gather(*(client(i, session) for i in range(clients)))
    elapsed = time.monotonic() - started
    latencies.sort()
    return {"texts_per_s": len(latencies) * texts_per_request / elapsed, "requests": len(latencies),
            "p50": statistics.median(latencies), "p99": latencies[int(0.99 * (len(latencies) - 1))],
            "errors": errors}


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

    return {"fp32 batch 1": rate(model, 1, corpus), "fp32 batch 32": rate(model, 32, by_length),
            "int8 batch 32": rate(int8, 32, by_length)}


def embed_all(url: str, texts: list[str]) -> np.ndarray:
    import json
    import urllib.request

    request = urllib.request.Request(f"{url}/v1/embeddings", data=json.dumps({"input": texts}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return np.array([d["embedding"] for d in json.loads(response.read())["data"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each load run")
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

    rates = offline(snapshot, corpus, args.threads)
    print(f"offline (the model alone, {args.threads} threads): " + ", ".join(f"{k} {v:.0f} texts/s"
                                                                        for k, v in rates.items()))

    loads = {"1 text x 64 clients": (64, 1), "16 texts x 16 clients": (16, 16)}
    results: dict[str, dict] = {}

    def run_loads(label: str, url: str) -> None:
        asyncio.run(load(url, 8, 1, 2, corpus))      # warm-up
        for name, (clients, per_request) in loads.items():
            r = asyncio.run(load(url, clients, per_request, args.seconds, corpus))
            results[(label, name)] = r
            print(f"{label:>24} | {name:>22} | {r['texts_per_s']:7.1f} texts/s | p50 {r['p50'] * 1000:7.1f} ms | "
                  f"p99 {r['p99'] * 1000:7.1f} ms | errors {r['errors']}")

    port = free_port()
    naive = subprocess.Popen([sys.executable, "-c", NAIVE_SERVER, str(snapshot), str(port), str(args.threads)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    naive_url = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        def naive_ready():
            with urllib.request.urlopen(f"{naive_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200

        wait_for(naive_ready, 120, "the naive server")
        run_loads("naive (lock per request)", naive_url)
    finally:
        naive.terminate()
        naive.wait()

    common = ["--model", MINILM, "--revision", commit, "--cache-dir", str(cache), "--task", "feature-extraction",
              "--threads", str(args.threads)]
    vectors = {}
    check_texts = corpus[:256]
    for label, extra in (("modeldeploy fp32", []), ("modeldeploy int8-dynamic", ["--quantization", "int8-dynamic"])):
        server = ServeProcess(*common, *extra).wait_ready()
        try:
            run_loads(label, server.url)
            vectors[label] = embed_all(server.url, check_texts)
        finally:
            server.stop()

    def ratio(a, b, key="texts_per_s"):
        return results[a][key] / results[b][key]

    single, multi = loads
    fp32, int8, naive_label = "modeldeploy fp32", "modeldeploy int8-dynamic", "naive (lock per request)"
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
