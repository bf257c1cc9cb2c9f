"""What the runtime tests share (test_serve.py, test_serve_adversarial.py): one cache of real models pulled by the
real puller, `modeldeploy serve` processes over it, and small HTTP helpers that return errors instead of raising."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import ServeProcess
from tests.hubserver import HubServer, Repo
from tests.models import (MINILM, TINY_CLASSIFIER, TINY_GENERATOR, build_classifier, build_generator, minilm_dir,
                          pull_into)

# A tiny generator with a long context (4096 positions): generations long enough to cancel midway. Its head is not
# tied to its embeddings, so that greedy decoding does not echo the prompt's last token ([SEP], also its EOS).
LONG_GENERATOR = "tiny/gpt2-long"


def build_long_generator(target: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    build_generator(target)          # the tokenizer and chat template; the weights are replaced
    config = GPT2Config.from_pretrained(target)
    config.n_positions, config.tie_word_embeddings = 4096, False
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(target, safe_serialization=True)
    return target


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> dict:
    """One cache holding MiniLM and the tiny models, pulled from a local hub; repo id -> commit. Built once per
    session: a module that imports this fixture gets its own fixture instance, so the build is reused by path."""
    base = tmp_path_factory.getbasetemp() / "serve-cache"
    built = base / "commits.json"
    if not built.is_file():
        models = base / "models"
        hub = HubServer()
        hub.add_repo(Repo.from_folder(MINILM, minilm_dir()))
        hub.add_repo(Repo.from_folder(TINY_CLASSIFIER, build_classifier(models / "classifier")))
        hub.add_repo(Repo.from_folder(TINY_GENERATOR, build_generator(models / "generator")))
        hub.add_repo(Repo.from_folder(LONG_GENERATOR, build_long_generator(models / "long-generator")))
        hub.start()
        try:
            commits = {repo: pull_into(base / "cache", hub.url, repo)["commit"] for repo in hub.repos}
        finally:
            hub.stop()
        built.write_text(json.dumps(commits))
    return {"dir": base / "cache", **json.loads(built.read_text())}


def serve(cache: dict, repo: str, task: str, *extra: str) -> ServeProcess:
    """fp32 unless `extra` names a precision: what these tests compare against is fp32's, and `auto` on CPU
    decides by timing (tests/unit/test_precision.py, test_serve.py's own auto test)."""
    precision = () if "--quantization" in extra else ("--quantization", "none")
    return ServeProcess("--model", repo, "--revision", cache[repo], "--cache-dir", str(cache["dir"]), "--task", task,
                        *precision, *extra)


@pytest.fixture(scope="module")
def embedder(cache):
    server = serve(cache, MINILM, "feature-extraction", "--max-batch-size", "32").wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def generator(cache):
    server = serve(cache, TINY_GENERATOR, "text-generation").wait_ready()
    yield server
    server.stop()


def post(url: str, body, raw: bool = False) -> tuple[int, dict]:
    data = body if raw else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def metric(server: ServeProcess, name: str, **labels) -> float:
    _, text = get(f"{server.url}/metrics")
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0
