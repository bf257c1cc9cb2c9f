"""`modeldeploy serve` as a real process on real weights (all-MiniLM-L6-v2) and tiny random-weight models, pulled
into a cache by the real puller, spoken to by the OpenAI client, raw HTTP and the KServe v2 protocol.

Bad inputs tried: empty input, an empty string, too long input, wrong types (number, list of numbers, object),
an unknown model name (OpenAI and KServe), malformed JSON, a non-object body, a wrong KServe datatype and shape,
unsupported n, out-of-range temperature, a full queue; and bad start-ups: fp16 on CPU, int8-dynamic on CUDA, a
model not in the cache, a snapshot not marked complete, pickle-only weights."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from modeldeploy import cache_layout
from tests.models import MINILM, TINY_CLASSIFIER, TINY_GENERATOR
from tests.serve_fixtures import cache, embedder, generator, get, metric, post, serve  # noqa: F401 (fixtures)

TEXTS = ["A man is eating food.", "A man is riding a white horse on an enclosed ground.",
         "The new movie is awesome", "Two men pushed carts through the woods.", "ok"]


def test_embeddings_match_sentence_transformers_through_the_openai_client(embedder, cache):
    import openai
    from sentence_transformers import SentenceTransformer

    client = openai.OpenAI(base_url=f"{embedder.url}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == [MINILM]
    response = client.embeddings.create(model=MINILM, input=TEXTS)   # the client asks for base64 by default
    ours = np.array([d.embedding for d in response.data])
    reference = SentenceTransformer(str(cache_layout.snapshot_dir(cache["dir"], MINILM, cache[MINILM])),
                                    device="cpu").encode(TEXTS)
    cosine = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() >= 0.999, cosine
    assert response.usage.prompt_tokens > len(TEXTS)
    raw = client.embeddings.with_raw_response.create(model=MINILM, input="ok", encoding_format="float")
    floats = raw.parse().data[0].embedding
    assert np.allclose(floats, ours[-1], atol=1e-5)
    name, _, milliseconds = raw.headers["Server-Timing"].partition(";dur=")      # the server's own share
    assert name == "serve" and 0 < float(milliseconds) < 60_000


def test_kserve_v2_protocol(embedder):
    base = f"{embedder.url}/v2/models/{MINILM}"
    assert get(f"{embedder.url}/v2/health/live")[0] == 200
    assert get(f"{embedder.url}/v2/health/ready")[0] == 200
    assert get(f"{base}/ready")[0] == 200
    status, meta = get(base)
    assert status == 200 and json.loads(meta)["inputs"][0]["datatype"] == "BYTES"
    status, body = post(f"{base}/infer", {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2],
                                                       "data": TEXTS[:2]}]})
    assert status == 200
    output = body["outputs"][0]
    assert output["shape"] == [2, 384] and output["datatype"] == "FP32" and len(output["data"]) == 768
    _, openai_body = post(f"{embedder.url}/v1/embeddings", {"input": TEXTS[:2]})
    assert np.allclose(output["data"][:384], openai_body["data"][0]["embedding"], atol=1e-5)


@pytest.mark.parametrize("path,body,status,fragment", [
    ("/v1/embeddings", {"input": []}, 400, "must not be empty"),
    ("/v1/embeddings", {"input": ""}, 400, "is empty"),
    ("/v1/embeddings", {"input": "word " * 400}, 400, "at most 256"),
    ("/v1/embeddings", {"input": 42}, 400, "string or a list of strings"),
    ("/v1/embeddings", {"input": [1, 2, 3]}, 400, "input[0]: Input should be a valid string"),
    ("/v1/embeddings", {"input": {"a": 1}}, 400, "string or a list of strings"),
    ("/v1/embeddings", {"model": "gpt-4", "input": "x"}, 404, "does not exist"),
    ("/v1/embeddings", [1, 2], 400, "JSON object"),
    ("/v1/completions", {"prompt": "x"}, 400, "serves feature-extraction"),
    (f"/v2/models/{MINILM}/infer", {"inputs": [{"name": "t", "datatype": "FP32", "data": [1.0]}]}, 400, "BYTES"),
    (f"/v2/models/{MINILM}/infer", {"inputs": [{"name": "t", "datatype": "BYTES", "shape": [3],
                                                "data": ["a"]}]}, 400, "shape"),
    ("/v2/models/other/model/infer", {"inputs": []}, 404, "not found"),
])
def test_bad_requests_get_specific_4xx_errors_in_the_apis_format(embedder, path, body, status, fragment):
    code, answer = post(f"{embedder.url}{path}", body)
    assert code == status
    message = answer["error"] if path.startswith("/v2") else answer["error"]["message"]
    assert fragment in message
    assert get(f"{embedder.url}/v2/health/ready")[0] == 200   # and the server is still up


def test_malformed_json_is_a_400(embedder):
    code, answer = post(f"{embedder.url}/v1/embeddings", b"{not json", raw=True)
    assert code == 400 and "not valid JSON" in answer["error"]["message"]
    assert metric(embedder, "model_inference_errors_total", model_name=MINILM, error_type="bad_request") >= 1


def test_concurrent_requests_share_forward_passes(embedder):
    before_passes = metric(embedder, "model_batch_size_count", model_name=MINILM)
    before_items = metric(embedder, "model_batch_size_sum", model_name=MINILM)
    before_latency = metric(embedder, "model_inference_latency_seconds_count", model_name=MINILM,
                            quantization="none")

    async def load():
        import aiohttp

        async with aiohttp.ClientSession() as session:
            async def one(i):
                async with session.post(f"{embedder.url}/v1/embeddings", json={"input": TEXTS[i % 5]}) as r:
                    return r.status, (await r.json())["data"][0]["embedding"]
            return await asyncio.gather(*(one(i) for i in range(48)))

    results = asyncio.run(load())
    assert all(status == 200 for status, _ in results)
    assert np.allclose(results[0][1], results[5][1], atol=1e-5)   # the same text, in different batches
    passes = metric(embedder, "model_batch_size_count", model_name=MINILM) - before_passes
    items = metric(embedder, "model_batch_size_sum", model_name=MINILM) - before_items
    assert items == 48 and passes < 48          # requests were batched together
    assert metric(embedder, "model_inference_latency_seconds_count", model_name=MINILM,
                  quantization="none") - before_latency == 48


def test_a_full_queue_answers_503_quickly_and_the_server_survives(cache):
    server = serve(cache, MINILM, "feature-extraction", "--max-queue", "8", "--max-batch-size", "4").wait_ready()
    try:
        async def flood():
            import aiohttp

            async with aiohttp.ClientSession() as session:
                async def one():
                    async with session.post(f"{server.url}/v1/embeddings", json={"input": TEXTS}) as r:
                        return r.status, r.headers.get("Retry-After")
                return await asyncio.gather(*(one() for _ in range(40)))

        results = asyncio.run(flood())
        statuses = [s for s, _ in results]
        assert set(statuses) <= {200, 503} and statuses.count(503) > 0 and statuses.count(200) > 0
        assert all(retry == "1" for s, retry in results if s == 503)
        assert metric(server, "model_inference_errors_total", model_name=MINILM, error_type="queue_full") > 0
        assert post(f"{server.url}/v1/embeddings", {"input": "still here"})[0] == 200
    finally:
        server.stop()


def test_int8_dynamic_stays_close_to_fp32(cache, embedder):
    server = serve(cache, MINILM, "feature-extraction", "--quantization", "int8-dynamic").wait_ready()
    try:
        _, quantized = post(f"{server.url}/v1/embeddings", {"input": TEXTS})
        _, full = post(f"{embedder.url}/v1/embeddings", {"input": TEXTS})
        a = np.array([d["embedding"] for d in quantized["data"]])
        b = np.array([d["embedding"] for d in full["data"]])
        assert ((a * b).sum(1)).mean() >= 0.99     # both are normalised
        assert not np.allclose(a, b)                 # and it really is another computation
        assert metric(server, "model_ready", model_name=MINILM) == 1
    finally:
        server.stop()


def test_auto_on_cpu_says_what_it_measured_and_chose(cache, embedder):
    """Which precision auto picks depends on this CPU at this moment (tests/unit/test_precision.py forces each
    outcome); here: whatever it picked, the metadata, the metrics and the served embeddings say the same."""
    server = serve(cache, MINILM, "feature-extraction", "--quantization", "auto").wait_ready()
    try:
        status, meta = get(f"{server.url}/v2/models/{MINILM}")
        precision = json.loads(meta)["precision"]
        assert status == 200 and precision["requested"] == "auto"
        assert precision["selected"] in ("none", "int8-dynamic") and precision["seconds"] > 0
        if precision["selected"] == "int8-dynamic":
            assert precision["reason"] == "int8-faster-and-agrees"
            assert precision["int8_speedup"] >= 1.1 and precision["agreement"] >= 0.99
        else:
            assert precision["reason"] in ("int8-slower", "int8-disagrees")
        labels = {k: precision[k] for k in ("requested", "selected", "reason")}
        assert metric(server, "model_precision_info", model_name=MINILM, **labels) == 1
        assert metric(server, "model_precision_int8_speedup_ratio", model_name=MINILM) == \
            pytest.approx(precision["int8_speedup"])
        assert metric(server, "model_precision_decision_seconds", model_name=MINILM) == \
            pytest.approx(precision["seconds"])
        _, ours = post(f"{server.url}/v1/embeddings", {"input": TEXTS})
        _, full = post(f"{embedder.url}/v1/embeddings", {"input": TEXTS})
        a = np.array([d["embedding"] for d in ours["data"]])
        b = np.array([d["embedding"] for d in full["data"]])
        assert ((a * b).sum(1)).mean() >= 0.99          # as test_int8_dynamic_stays_close_to_fp32 asks
        assert np.allclose(a, b, atol=1e-5) == (precision["selected"] == "none")
        assert metric(server, "model_inference_latency_seconds_count", model_name=MINILM,
                      quantization=precision["selected"]) == 1         # the label is what runs
    finally:
        server.stop()


def test_text_classification(cache):
    server = serve(cache, TINY_CLASSIFIER, "text-classification").wait_ready()
    try:
        status, body = post(f"{server.url}/v1/classify", {"model": TINY_CLASSIFIER, "input": ["good", "bad film"]})
        assert status == 200 and [d["index"] for d in body["data"]] == [0, 1]
        for row in body["data"]:
            assert row["label"] in ("negative", "positive") and abs(sum(row["probs"]) - 1) < 1e-5
        status, body = post(f"{server.url}/v2/models/{TINY_CLASSIFIER}/infer",
                            {"inputs": [{"name": "text", "datatype": "BYTES", "data": ["good"]}]})
        assert status == 200 and body["outputs"][0]["shape"] == [1, 2]
    finally:
        server.stop()


def test_completions_chat_and_streaming_through_the_openai_client(generator):
    import openai

    client = openai.OpenAI(base_url=f"{generator.url}/v1", api_key="unused")
    done = client.completions.create(model=TINY_GENERATOR, prompt="the weather today", max_tokens=6, temperature=0)
    choice = done.choices[0]
    assert done.usage.completion_tokens <= 6 and choice.finish_reason in ("length", "stop")
    assert done.usage.prompt_tokens > 0

    streamed = client.completions.create(model=TINY_GENERATOR, prompt="the weather today", max_tokens=6,
                                         temperature=0, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == choice.text    # greedy: the same text, in pieces
    assert "Server-Timing" not in streamed.response.headers      # sent before the time is known
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason

    chat = client.chat.completions.create(model=TINY_GENERATOR, messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=5, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 5
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=TINY_GENERATOR, messages=[{"role": "user", "content": "hello"}], max_tokens=5, temperature=0,
        stream=True)]
    assert "".join(pieces) == chat.choices[0].message.content

    sampled = client.completions.create(model=TINY_GENERATOR, prompt="once", max_tokens=4, temperature=0.8,
                                        top_p=0.9)
    assert sampled.usage.completion_tokens <= 4


def test_stop_sequences_cut_the_text(generator):
    _, full = post(f"{generator.url}/v1/completions", {"prompt": "a b c", "max_tokens": 12, "temperature": 0})
    text = full["choices"][0]["text"]
    assert len(text) >= 8, text
    stop = text[5:8]
    _, cut = post(f"{generator.url}/v1/completions", {"prompt": "a b c", "max_tokens": 12, "temperature": 0,
                                                      "stop": [stop]})
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["text"] == text[:text.index(stop)]


def test_concurrent_generations_are_batched(generator):
    before = metric(generator, "model_batch_size_count", model_name=TINY_GENERATOR)

    async def load():
        import aiohttp

        async with aiohttp.ClientSession() as session:
            async def one(i):
                body = {"prompt": f"number {i}", "max_tokens": 8, "temperature": 0}
                async with session.post(f"{generator.url}/v1/completions", json=body) as r:
                    return r.status
            return await asyncio.gather(*(one(i) for i in range(16)))

    assert asyncio.run(load()) == [200] * 16
    assert metric(generator, "model_batch_size_count", model_name=TINY_GENERATOR) - before < 16
    assert metric(generator, "model_generated_tokens_total", model_name=TINY_GENERATOR) > 0


@pytest.mark.parametrize("body,fragment", [
    ({"prompt": "x", "n": 2}, "n: Input should be 1"),
    ({"prompt": "x", "temperature": 5}, "temperature: Input should be less than or equal to 2"),
    ({"prompt": "x", "max_tokens": 200}, "128-token context"),
    ({"prompt": ["a", "b"]}, "prompt: Value should have at most 1 item"),
    ({"prompt": "x", "stream": "yes"}, "stream: Input should be a valid boolean"),
])
def test_bad_generation_requests(generator, body, fragment):
    code, answer = post(f"{generator.url}/v1/completions", body)
    assert code == 400 and fragment in answer["error"]["message"]


def start_failure(*args: str) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "modeldeploy", "serve", "--port", "0", *args],
                          capture_output=True, text=True, timeout=180)
    return done.returncode, done.stderr


def test_bad_start_ups_fail_with_a_clear_message(cache, tmp_path):
    common = ["--cache-dir", str(cache["dir"]), "--task", "feature-extraction"]
    code, err = start_failure("--model", MINILM, "--revision", cache[MINILM], "--quantization", "fp16", *common)
    assert code == 1 and "fp16 needs a CUDA device" in err
    code, err = start_failure("--model", MINILM, "--revision", cache[MINILM], "--device", "cuda", *common)
    assert code == 1 and "no CUDA device" in err
    code, err = start_failure("--model", "nobody/nothing", "--revision", "main", *common)
    assert code == 1 and "not in the cache" in err

    # A snapshot without the puller's completion marker is refused.
    partial = tmp_path / "partial"
    shutil.copytree(cache["dir"], partial, symlinks=True)
    shutil.rmtree(partial / cache_layout.MARKER_DIR)
    code, err = start_failure("--model", MINILM, "--revision", cache[MINILM], "--cache-dir", str(partial),
                              "--task", "feature-extraction")
    assert code == 1 and "not marked complete" in err

    # Pickle-only weights need an explicit opt-in.
    snapshot = cache_layout.snapshot_dir(partial, MINILM, cache[MINILM])
    weights = snapshot / "model.safetensors"
    weights.unlink()
    (snapshot / "pytorch_model.bin").write_bytes(b"not loaded")
    cache_layout.write_marker(cache_layout.marker_path(partial, MINILM, cache[MINILM], ["x"]),
                              {"repo": MINILM, "commit": cache[MINILM], "bytes": 10,
                               "files": {"pytorch_model.bin": {"size": 10, "check": "sha256"}}})
    code, err = start_failure("--model", MINILM, "--revision", cache[MINILM], "--cache-dir", str(partial),
                              "--task", "feature-extraction")
    assert code == 1 and "no safetensors weights" in err
