"""The runtime's pure pieces: device/precision choices, CPU limits from cgroups, padding-aware grouping, the
batcher's queue bound, grouping and cancellation, and the validated request layer."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from types import SimpleNamespace

import pytest

from modeldeploy.serve import device, requests
from modeldeploy.serve.batching import DynamicBatcher
from modeldeploy.serve.engine import Engine
from modeldeploy.serve.errors import BadInput, QueueFull, TooLarge


def test_quantization_choices_and_refusals():
    assert device.resolve_quantization("auto", "cpu") == "auto"        # measured at load (precision.py)
    assert device.resolve_quantization("auto", "cuda") == "fp16"
    assert device.resolve_quantization("int8-dynamic", "cpu") == "int8-dynamic"
    with pytest.raises(device.StartupError, match="fp16 needs a CUDA device"):
        device.resolve_quantization("fp16", "cpu")
    with pytest.raises(device.StartupError, match="the CPU quantization"):
        device.resolve_quantization("int8-dynamic", "cuda")


def test_cpu_limit_from_cgroup_v2_and_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert device.cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert device.cpu_limit(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert device.cpu_limit(v1) == 3.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    assert device.cpu_limit(v1) is None


def grouping_engine(max_batch_size: int) -> Engine:
    engine = Engine.__new__(Engine)
    engine.batcher = SimpleNamespace(max_batch_size=max_batch_size)
    return engine


def test_forward_groups_pads_little_keeps_order_and_respects_the_batch_size():
    items = [[0] * n for n in (3, 100, 4, 98, 5, 3, 99, 4)]
    passes = []

    def forward(rows):
        passes.append([len(r) for r in rows])
        return [len(r) for r in rows]

    assert grouping_engine(8).forward_groups(items, forward) == [len(i) for i in items]
    assert sorted(passes) == [[3, 3, 4, 4, 5], [98, 99, 100]]      # short and long rows padded apart
    passes.clear()
    grouping_engine(2).forward_groups(items, forward)
    assert max(len(p) for p in passes) <= 2


def test_batcher_bounds_its_queue_and_batches_by_group():
    seen = []

    def run_batch(items):
        seen.append(list(items))
        return [i * 10 for i in items]

    async def scenario():
        batcher = DynamicBatcher(run_batch, max_batch_size=4, max_delay=0.05, max_queue=6)
        batcher.start()
        with pytest.raises(TooLarge, match="more than the queue holds"):
            await batcher.submit(list(range(7)))          # bigger than the queue: refused even when it is empty
        first = asyncio.ensure_future(batcher.submit([1, 2], group="a"))
        second = asyncio.ensure_future(batcher.submit([3], group="b"))
        third = asyncio.ensure_future(batcher.submit([4, 5], group="a"))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await batcher.submit([6, 7], group="a")     # 5 queued + 2 > 6
        with pytest.raises(TooLarge):
            await batcher.submit(list(range(7)))          # and the same answer when it is busy
        results = await asyncio.gather(first, second, third)
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    assert results == [[10, 20], [30], [40, 50]]
    assert [1, 2, 4, 5] in seen and [3] in seen          # same group together, the other group apart


def test_a_cancelled_request_leaves_the_queue_and_its_room_is_free_again():
    seen = []

    async def scenario():
        batcher = DynamicBatcher(lambda items: seen.append(list(items)) or items, max_batch_size=4, max_delay=0.5,
                                 max_queue=4)
        batcher.start()
        waiting = asyncio.ensure_future(batcher.submit([1, 2, 3]))
        await asyncio.sleep(0)
        assert batcher.queued_items == 3
        waiting.cancel()                                  # the client went away while it waited for company
        await asyncio.gather(waiting, return_exceptions=True)
        assert batcher.queued_items == 0 and not batcher.pending
        result = await batcher.submit([4, 5, 6, 7])       # fits only because the room came back
        await batcher.stop()
        return result

    assert asyncio.run(scenario()) == [4, 5, 6, 7]
    assert seen == [[4, 5, 6, 7]]                          # the cancelled items never reached the model


CONTEXT = requests.Context(requests.Limits(max_inputs=3, max_new_tokens=50), dimensions=8)


@pytest.mark.parametrize("model,body,error,param,fragment", [
    (requests.EmbeddingsRequest, {"input": ["a"] * 4}, TooLarge, "input", "at most 3"),
    (requests.EmbeddingsRequest, {"input": [" "]}, BadInput, "input", "input[0]: is empty"),
    (requests.EmbeddingsRequest, {"input": "a", "dimensions": 9}, BadInput, "dimensions", "at most 8"),
    (requests.CompletionRequest, {"prompt": "a", "max_tokens": 51}, BadInput, "max_tokens", "at most 50"),
    (requests.CompletionRequest, {"prompt": "a", "max_tokens": float("inf")}, BadInput, "max_tokens", "integer"),
    (requests.CompletionRequest, {"prompt": "a", "top_p": float("nan")}, BadInput, "top_p", "finite"),
    (requests.CompletionRequest, {"prompt": "a", "temperature": True}, BadInput, "temperature", "number"),
    (requests.ChatRequest, {"messages": [{"role": "user", "content": 1}]}, BadInput, "messages",
     "messages[0].content: must be a string"),
    (requests.InferenceRequest, {"inputs": [{"name": "t", "datatype": "BYTES", "data": ["a"]}],
                                 "parameters": {"top_p": 0}}, BadInput, "parameters", "parameters.top_p"),
])
def test_requests_are_refused_naming_the_field(model, body, error, param, fragment):

    with pytest.raises(error, match=re.escape(fragment)) as raised:
        requests.parse(model, json.dumps(body).encode(), CONTEXT)
    assert raised.value.param == param


def test_sampling_means_the_same_in_both_protocols():
    def parse(model, body: str):
        return requests.parse(model, body.encode(), CONTEXT)

    completion = parse(requests.CompletionRequest, '{"prompt": "x", "stop": "abc", "max_tokens": 7}')
    v2 = parse(requests.InferenceRequest, '{"inputs": [{"name": "t", "datatype": "BYTES", "data": ["x"]}], '
                                          '"parameters": {"stop": "abc", "max_tokens": 7}}')
    assert completion.options(16)["stop"] == v2.parameters.options(16)["stop"] == ["abc"]   # one stop string
    assert completion.options(16)["max_new_tokens"] == v2.parameters.options(16)["max_new_tokens"] == 7
    chat = parse(requests.ChatRequest, '{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],'
                                       ' "max_completion_tokens": 5, "stop": null}')
    assert chat.options(256) == {"max_new_tokens": 5, "temperature": 1.0, "top_p": 1.0, "stop": []}
    assert chat.messages[0].text() == {"role": "user", "content": "hi"}
    both = parse(requests.ChatRequest, '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9, '
                                       '"max_completion_tokens": 5}')
    assert both.options(256)["max_new_tokens"] == 5                  # the newer name wins, as in OpenAI


def _outliers(tokens: bool, channels: bool):
    import torch

    torch.manual_seed(0)
    x = torch.randn(4, 8, 64)
    if tokens:
        x[0, 0] *= 40
        x[2, 3] *= 40
    if channels:
        x[..., 7] *= 15
    return x


def test_int8_layers_each_tame_the_outliers_they_are_for():
    import torch

    from modeldeploy.serve import quantize

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)

    def error(layer, x):
        with torch.no_grad():
            out = layer(x)
            assert out.shape == (4, 8, 32) and out.dtype == torch.float32
            return quantize._relative_error(out, linear(x))

    def one_scale_per_tensor(x):     # fbgemm's dynamic linear with nothing done about outliers
        return torch.ops.quantized.linear_dynamic(x, quantize._pack(linear.weight.detach(), linear.bias.detach()),
                                                  quantize.REDUCE_RANGE)

    def peaks(x):
        return x.reshape(-1, 64).abs().amax(dim=0)

    tokens, channels, both = _outliers(True, False), _outliers(False, True), _outliers(True, True)
    assert error(quantize.TokenSplitInt8Linear(linear), tokens) < 0.6 * error(one_scale_per_tensor, tokens)
    assert error(quantize.SmoothedInt8Linear(linear, peaks(channels)), channels) < \
        0.5 * error(one_scale_per_tensor, channels)
    for layer in (quantize.PerTokenInt8Linear(linear), quantize.SmoothedInt8Linear(linear, peaks(both)),
                  quantize.TokenSplitInt8Linear(linear)):
        assert 0 < error(layer, both) < 0.04, type(layer).__name__


def test_int8_dynamic_calibrates_the_body_and_keeps_heads_in_full_precision(tmp_path, monkeypatch, caplog):
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from modeldeploy.serve import quantize
    from tests.models import build_classifier

    build_classifier(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    batch = tokenizer(["a short text", "and a somewhat longer one, with punctuation!"], padding=True,
                      return_tensors="pt")

    def fresh():
        return BertForSequenceClassification.from_pretrained(tmp_path).eval()

    with torch.no_grad():
        reference = fresh()(**batch).logits
        model = fresh()
        counts = quantize.quantize_int8_dynamic(model, tokenizer)
        assert sum(counts.values()) == 12                          # 2 layers x (q, k, v, attention out, MLP in, out)
        assert set(counts) <= {"SmoothedInt8Linear", "TokenSplitInt8Linear"}
        assert isinstance(model.classifier, torch.nn.Linear) and isinstance(model.bert.pooler.dense, torch.nn.Linear)
        assert not any(type(m) is torch.nn.Linear for m in model.bert.encoder.modules())
        logits = model(**batch).logits
        assert torch.nn.functional.cosine_similarity(logits, reference).min() > 0.99
        assert not torch.equal(logits, reference)

        monkeypatch.setattr(quantize, "fbgemm_available", lambda: False)     # loong64 and arm64 builds of torch
        monkeypatch.setattr(quantize, "int_mm_is_fast", lambda: False)
        model = fresh()
        with caplog.at_level(logging.WARNING, logger=quantize.log.name):
            assert quantize.quantize_int8_dynamic(model, tokenizer) == {"PerTokenInt8Linear": 12}
        assert "reference loop" in caplog.text and "--quantization none" in caplog.text
        assert torch.nn.functional.cosine_similarity(model(**batch).logits, reference).min() > 0.99
