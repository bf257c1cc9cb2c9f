"""Precision `auto` on CPU, decided by measurement at start-up rather than by the CPU's name.

int8-dynamic pays off only where this torch build has a fast int8 kernel for this CPU (fbgemm on x86; oneDNN's
`_int_mm` with AVX512-VNNI); elsewhere (torch's reference `_int_mm` loop, as on loong64) it is many times slower
than fp32. So `auto` times the int8 layer this build would run against the fp32 layer on the model's own linear
shapes and weights (a small batch, a few interleaved repetitions, the fastest of each), and quantizes only where int8 is
clearly faster; then it keeps int8 only if the quantized model's output on texts it was not calibrated on agrees
with fp32's (mean cosine per token). Otherwise the fp32 layers go back. The choice, the reason and the measured
figures are logged, exported as metrics and shown in the model's KServe v2 metadata."""

from __future__ import annotations

import dataclasses
import logging
import time

log = logging.getLogger(__name__)

# Token rows per timed call: a small serving batch (8-16 texts). Fewer rows swing more: for MiniLM here, 128 rows
# measured fbgemm at 1.1-1.5x fp32 from run to run, 256 rows at 1.4-1.5x.
MEASURE_ROWS = 256
# Timed calls per layer shape and precision, interleaved; the fastest counts: another process on the core only ever
# adds time, and one slow median on two shared cores once kept fp32 where int8 measures 1.26-1.39x.
REPEATS = 5
# The linear layers must win by this much: the rest of the model (attention, GELU, LayerNorm) does not speed up,
# and calibration may add a per-channel multiply or a token split around each kernel.
MIN_SPEEDUP = 1.1
# Mean cosine to fp32, per token, on AGREEMENT_TEXTS: all-MiniLM-L6-v2 measures 0.994 here (its embeddings 0.996).
MIN_AGREEMENT = 0.99
# Held out from quantize.CALIBRATION_TEXTS: agreement is judged on texts the calibration did not see.
AGREEMENT_TEXTS = (
    "Shipping was fast and the package arrived in perfect condition.",
    "Which river flows through the middle of Budapest?",
    "The server returned a 503 error during the nightly backup window.",
    "She played the cello in the city orchestra for twenty years.",
    "Bitte schließen Sie das Fenster, es wird kalt.",
    "Interest rates were left unchanged at 4.25% for the third month.",
    "lol that was unexpected",
    "Mix the flour and butter, then chill the dough for an hour before rolling it out.",
)


@dataclasses.dataclass
class PrecisionChoice:
    requested: str                   # what the server was started with
    selected: str                    # what runs: none (fp32) | fp16 | bf16 | int8-dynamic
    reason: str                      # requested | cuda-default | no-linear-layers | int8-slower | int8-disagrees
                                     # | int8-faster-and-agrees
    int8_speedup: float | None = None    # fp32 time / int8 time over the model's linear layers, as measured
    agreement: float | None = None       # mean cosine of the int8 model's output to fp32's
    seconds: float = 0.0                 # what the decision cost at start-up

    def describe(self) -> str:
        figures = []
        if self.int8_speedup is not None:
            figures.append(f"int8 linear layers {self.int8_speedup:.2f}x fp32's speed (needed {MIN_SPEEDUP})")
        if self.agreement is not None:
            figures.append(f"cosine to fp32 {self.agreement:.4f} (needed {MIN_AGREEMENT})")
        if self.seconds:
            figures.append(f"decided in {self.seconds:.2f} s")
        return (f"precision {self.requested} -> {self.selected} ({self.reason}"
                + (f": {'; '.join(figures)}" if figures else "") + ")")


def _seconds(call, x) -> float:
    started = time.perf_counter()
    call(x)
    return time.perf_counter() - started


def _shape_seconds(fp32, int8, x) -> tuple[float, float]:
    """The fastest seconds of one fp32 and one int8 call on `x`, timed in turn so that drift falls on both alike."""
    fp32(x)
    fp32_times = [_seconds(fp32, x) for _ in range(2)]
    int8_times = [_seconds(int8, x)]              # its first call: packing, caches
    if int8_times[0] < 4 * min(fp32_times):       # else plainly slower: a reference loop is not timed again
        int8_times = []
        for _ in range(REPEATS):
            fp32_times.append(_seconds(fp32, x))
            int8_times.append(_seconds(int8, x))
    return min(fp32_times), min(int8_times)


def int8_linear_speedup(layers: list) -> float:
    """fp32 time over int8 time for one pass through `layers` (torch.nn.Linear): each distinct shape is timed once,
    on its first layer's weights, and counted as often as it occurs.

    Timed on one thread: what int8 changes is the work per core, and two-thread timings swing by 2x on a CPU
    another process shares (measured here: 0.8-1.8x for the same layers, against 1.2-1.5x on one thread)."""
    import torch

    from modeldeploy.serve.quantize import int8_kernel_layer

    by_shape: dict[tuple[int, int], list] = {}
    for layer in layers:
        by_shape.setdefault((layer.in_features, layer.out_features), []).append(layer)
    generator = torch.Generator().manual_seed(0)
    fp32_total = int8_total = 0.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for (in_features, _), same in by_shape.items():
                x = torch.randn(MEASURE_ROWS, in_features, generator=generator)
                fp32_seconds, int8_seconds = _shape_seconds(same[0], int8_kernel_layer(same[0]), x)
                fp32_total += fp32_seconds * len(same)
                int8_total += int8_seconds * len(same)
    finally:
        torch.set_num_threads(threads)
    return fp32_total / max(int8_total, 1e-9)


def _output(model, batch):
    import torch

    with torch.inference_mode():
        return model(**batch)[0].float()     # last_hidden_state or logits


def mean_cosine(output, reference, attention_mask) -> float:
    """Per token (or per row, for outputs without a sequence axis), padding left out."""
    import torch

    if output.dim() == 3:
        keep = attention_mask.bool()
        output, reference = output[keep], reference[keep]
    return float(torch.nn.functional.cosine_similarity(output.reshape(-1, output.shape[-1]),
                                                       reference.reshape(-1, reference.shape[-1])).mean())


def choose_cpu_precision(model, tokenizer) -> PrecisionChoice:
    """Decides `auto` on CPU and leaves `model` as decided: int8-dynamic (quantized in place) or fp32."""
    from modeldeploy.serve import quantize

    started = time.monotonic()

    def choice(selected: str, reason: str, **figures) -> PrecisionChoice:
        return PrecisionChoice("auto", selected, reason, seconds=time.monotonic() - started, **figures)

    targets = quantize.linear_targets(model)
    if not targets:
        return choice("none", "no-linear-layers")
    speedup = int8_linear_speedup([layer for _, _, layer in targets])
    if speedup < MIN_SPEEDUP:
        return choice("none", "int8-slower", int8_speedup=speedup)
    batch = tokenizer(list(AGREEMENT_TEXTS), padding=True, truncation=True, return_tensors="pt")
    reference = _output(model, batch)
    quantize.quantize_int8_dynamic(model, tokenizer)
    agreement = mean_cosine(_output(model, batch), reference, batch["attention_mask"])
    if not agreement >= MIN_AGREEMENT:        # NaN disagrees too
        quantize.restore(targets)
        return choice("none", "int8-disagrees", int8_speedup=speedup, agreement=agreement)
    return choice("int8-dynamic", "int8-faster-and-agrees", int8_speedup=speedup, agreement=agreement)
