"""Precision `auto` on CPU, measured: on the real all-MiniLM-L6-v2 weights, with the int8 kernels this torch really
has. fbgemm (this x86 build's kernel) is faster than fp32 here, so auto picks int8; without fbgemm (as on loong64
and arm64 builds) int8 runs torch's reference `_int_mm` loop on this CPU (no AVX512-VNNI), which is slower, so auto
keeps fp32; and an int8 model whose output does not agree with fp32's closely enough is put back to fp32."""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from modeldeploy.serve import precision, quantize  # noqa: E402
from modeldeploy.serve.loading import LoadOptions, load  # noqa: E402
from tests.models import minilm_dir  # noqa: E402

TEXTS = ["A man is eating food.", "The new movie is awesome", "ok"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_dir())


@pytest.fixture
def fp32_model():
    return AutoModel.from_pretrained(minilm_dir()).eval()


def hidden(model, tokenizer):
    with torch.inference_mode():
        return model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).last_hidden_state


def plain_linear_layers(model) -> int:
    return sum(type(module) is torch.nn.Linear for module in model.modules())


def test_auto_picks_int8_where_fbgemm_is_faster(fp32_model, tokenizer):
    assert quantize.fbgemm_available()
    reference = hidden(fp32_model, tokenizer)
    choice = precision.choose_cpu_precision(fp32_model, tokenizer)
    assert (choice.requested, choice.selected, choice.reason) == ("auto", "int8-dynamic", "int8-faster-and-agrees")
    assert choice.int8_speedup >= precision.MIN_SPEEDUP and choice.agreement >= precision.MIN_AGREEMENT
    assert plain_linear_layers(fp32_model) == 1                      # the pooler only: the body runs int8
    mask = tokenizer(TEXTS, padding=True, return_tensors="pt")["attention_mask"]
    assert precision.mean_cosine(hidden(fp32_model, tokenizer), reference, mask) > 0.99     # texts of its own
    assert not torch.equal(hidden(fp32_model, tokenizer), reference)
    assert 0 < choice.seconds < 60


def test_auto_keeps_fp32_where_the_int8_kernel_is_slower(fp32_model, tokenizer, monkeypatch):
    if quantize.int_mm_is_fast():
        pytest.skip("this CPU has AVX512-VNNI: torch._int_mm reaches oneDNN here, not the slow reference loop")
    monkeypatch.setattr(quantize, "fbgemm_available", lambda: False)     # a loong64 or arm64 build's kernel
    assert isinstance(quantize.int8_kernel_layer(torch.nn.Linear(8, 8)), quantize.PerTokenInt8Linear)
    reference = hidden(fp32_model, tokenizer)
    choice = precision.choose_cpu_precision(fp32_model, tokenizer)
    assert (choice.selected, choice.reason) == ("none", "int8-slower")
    assert choice.int8_speedup < 1 and choice.agreement is None       # not even quantized: no calibration paid
    assert plain_linear_layers(fp32_model) == 37
    assert torch.equal(hidden(fp32_model, tokenizer), reference)


def test_auto_keeps_fp32_when_int8_disagrees(fp32_model, tokenizer, monkeypatch):
    """int8 is always fast enough here (MIN_SPEEDUP 0), and the agreement asked for is one int8 cannot reach on
    this model (it measures 0.994): the quantized model is really built, checked, and taken apart again."""
    monkeypatch.setattr(precision, "MIN_SPEEDUP", 0.0)
    monkeypatch.setattr(precision, "MIN_AGREEMENT", 0.9999)
    reference = hidden(fp32_model, tokenizer)
    choice = precision.choose_cpu_precision(fp32_model, tokenizer)
    assert (choice.selected, choice.reason) == ("none", "int8-disagrees")
    assert 0.9 < choice.agreement < 0.9999
    assert plain_linear_layers(fp32_model) == 37                      # every layer back to fp32
    assert torch.equal(hidden(fp32_model, tokenizer), reference)


def test_a_model_without_linear_layers_stays_as_it_is(tokenizer):
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4))
    choice = precision.choose_cpu_precision(model, tokenizer)
    assert (choice.selected, choice.reason, choice.int8_speedup) == ("none", "no-linear-layers", None)


def test_agreement_is_per_token_and_leaves_padding_out():
    reference = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    output = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-5.0, 5.0]]])     # the third position differs
    assert precision.mean_cosine(output, reference, torch.tensor([[1, 1, 0]])) == pytest.approx(1.0)
    assert precision.mean_cosine(output, reference, torch.tensor([[1, 1, 1]])) == pytest.approx(2 / 3)
    logits = torch.tensor([[1.0, 2.0]])                                # no sequence axis: per row
    assert precision.mean_cosine(logits, -logits, torch.tensor([[1]])) == pytest.approx(-1.0)


def test_load_reports_the_choice(tmp_path, monkeypatch, caplog):
    """Through the server's loading path: the decision is logged with its figures and kept on the loaded model."""
    from tests.models import MINILM, pull_minilm

    commit = pull_minilm(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")        # load() sets it for its process; unset again after this test
    monkeypatch.setattr(quantize, "fbgemm_available", lambda: False)
    if quantize.int_mm_is_fast():
        pytest.skip("this CPU has AVX512-VNNI")
    options = LoadOptions(model_id=MINILM, revision=commit, cache_dir=tmp_path, task="feature-extraction",
                          device="cpu", quantization="auto", requested="auto")
    with caplog.at_level(logging.INFO, logger="modeldeploy.serve.loading"):
        loaded = load(options)
    assert loaded.quantization == "none" and loaded.precision.reason == "int8-slower"
    assert "precision auto -> none (int8-slower: int8 linear layers" in caplog.text
    explicit = load(LoadOptions(model_id=MINILM, revision=commit, cache_dir=tmp_path, task="feature-extraction",
                                device="cpu", quantization="none"))
    assert (explicit.precision.requested, explicit.precision.reason) == ("none", "requested")
