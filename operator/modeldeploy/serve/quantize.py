"""int8-dynamic for CPUs: int8 weights with one scale per output channel, activations quantized on the fly.

Kernels. Where torch has fbgemm (its x86 builds), fbgemm's dynamic linear (`torch.ops.quantized.linear_dynamic`)
quantizes the activations inside the kernel and multiplies with AVX2 or AVX-512 int8 instructions.
`torch._int_mm`, which torchao builds on, reaches oneDNN only on CPUs with AVX512-VNNI and otherwise runs a
reference loop far slower than fp32 (measured on this project's AVX2 machine: 35-55x per layer), so it is the
kernel only where fbgemm is missing (loong64 and arm64 builds), with one activation scale per token, and a warning
at load where it is that reference loop.

Accuracy. fbgemm gives the activations one scale per tensor, and transformer activations have outliers: in a few
channels (inputs that come from a LayerNorm) or in a few tokens (the MLP's down projection: [CLS], [SEP],
punctuation). A calibration pass at load time gives each layer whichever of two treatments reproduces its fp32
output more closely: SmoothQuant's per-channel smoothing (x / s and W * s: channel outliers move into the weights),
or a split of its input rows into outlier tokens and the rest, each group with its own scale. Measured on
all-MiniLM-L6-v2 (bench/serve_bench.py): mean cosine to fp32 0.996; one scale per tensor alone gave 0.970.

fbgemm's weight packing takes torch's quantized tensors, whose creation functions print a deprecation warning in
torch 2.13 (pytorch issue 184982). They are used on purpose, with that warning silenced: torch is pinned, the tests
run this path, and no supported CPU int8 kernel of this torch is faster on AVX2. torch.ao's
`quantize_dynamic` (deprecated too) is not used: it quantizes every layer alike and lost too much accuracy."""

from __future__ import annotations

import logging
import warnings

import torch

log = logging.getLogger(__name__)

# Heads that turn features into outputs stay in full precision: they are small next to the body and sensitive.
KEEP_FULL_PRECISION = ("lm_head", "classifier", "score", "pooler")
SMOOTHING_ALPHA = 0.7          # share of an input channel's range moved into the weights (best of 0.6-0.9 here)
OUTLIER_TOKEN_FACTOR = 4.0     # rows whose peak is above this many times the median row's are quantized apart
# fbgemm without VNNI adds pairs of u8 x s8 products in 16 bits; 7-bit activations cannot overflow them.
REDUCE_RANGE = True

# Calibration runs these as one padded batch: padded positions carry outliers of their own, and serving pads too.
CALIBRATION_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France, with 2.1 million residents.",
    "I absolutely loved this movie, the acting was superb!",
    "Terrible service; we waited 45 minutes and the food was cold.",
    "def add(a, b):\n    return a + b",
    "Kubernetes schedules pods onto nodes according to their resource requests.",
    "The mitochondria is the powerhouse of the cell.",
    "Q3 revenue rose 12% year over year to $4.5B, beating estimates.",
    "Please reset my password, I can't log in since yesterday.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "机器学习模型需要大量的数据。",
    "How do I bake sourdough bread at home without a dutch oven?",
    "The patient presented with fever, cough and shortness of breath.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Breaking: heavy rain expected across the north-east this weekend.",
    "Contact us at support@example.com or call +1 (555) 010-2030.",
    "A B C D E F G 1 2 3 4 5 6 7 8 9 0 ! ? ; : ( ) [ ] { }",
    "In 1969, Apollo 11 landed the first humans on the Moon.",
    "yes", "No.", "ok thanks!!",
    "The committee will reconvene after the recess to discuss the amendments to the bill, including provisions on "
    "data privacy, consumer protection and cross-border enforcement.",
    "Transformers use self-attention to weigh the importance of each token in a sequence.",
)


def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def int_mm_is_fast() -> bool:
    """Whether `torch._int_mm` reaches oneDNN here (AVX512-VNNI), rather than torch's reference loop."""
    return torch.backends.mkldnn.is_available() and torch.cpu._is_vnni_supported()


def _pack(weight: torch.Tensor, bias: torch.Tensor | None):
    scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        qweight = torch.quantize_per_channel(weight, scale.double(), torch.zeros(len(scale), dtype=torch.long),
                                             0, torch.qint8)
    return torch.ops.quantized.linear_prepack(qweight, bias)


def _bias(linear: torch.nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().float().clone()


class SmoothedInt8Linear(torch.nn.Module):
    """fbgemm's dynamic int8 linear on x / s, with s folded into the weights' input channels."""

    def __init__(self, linear: torch.nn.Linear, input_peak: torch.Tensor):
        super().__init__()
        weight = linear.weight.detach().float()
        smoothing = (input_peak.clamp(min=1e-5).pow(SMOOTHING_ALPHA)
                     / weight.abs().amax(dim=0).clamp(min=1e-5).pow(1 - SMOOTHING_ALPHA)).clamp(min=1e-5)
        self.register_buffer("input_scale", (1 / smoothing).clone())
        self.packed = _pack(weight * smoothing, _bias(linear))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x * self.input_scale, self.packed, REDUCE_RANGE)


class TokenSplitInt8Linear(torch.nn.Module):
    """fbgemm's dynamic int8 linear, called apart for the outlier rows (tokens) so they set no scale for the rest."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.packed = _pack(linear.weight.detach().float(), _bias(linear))
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        peaks = rows.abs().amax(dim=1)      # 12x faster here than vector_norm(ord=inf)
        outliers = peaks > OUTLIER_TOKEN_FACTOR * peaks.median()
        if not outliers.any():
            return torch.ops.quantized.linear_dynamic(x, self.packed, REDUCE_RANGE)
        out = rows.new_empty(rows.shape[0], self.out_features)
        for selected in (outliers, ~outliers):
            index = selected.nonzero().squeeze(1)
            out.index_copy_(0, index, torch.ops.quantized.linear_dynamic(rows.index_select(0, index), self.packed,
                                                                         REDUCE_RANGE))
        return out.reshape(*x.shape[:-1], self.out_features)


class PerTokenInt8Linear(torch.nn.Module):
    """Without fbgemm: one activation scale per token, multiplied by `torch._int_mm`."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
        self.register_buffer("weight_int8", torch.round(weight / scale).to(torch.int8).t().contiguous())
        self.register_buffer("weight_scale", scale.t().contiguous())
        self.bias = None if linear.bias is None else torch.nn.Parameter(_bias(linear), requires_grad=False)
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        scale = rows.abs().amax(dim=1, keepdim=True).clamp_(min=1e-8) / 127
        quantized = torch.round(rows / scale).to(torch.int8)     # |rows / scale| <= 127 by construction
        out = torch._int_mm(quantized, self.weight_int8).float()
        out.mul_(scale).mul_(self.weight_scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def _relative_error(approximation: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(approximation - reference) / torch.linalg.vector_norm(reference)
                 .clamp(min=1e-12))


Target = tuple[torch.nn.Module, str, torch.nn.Linear]     # (parent, attribute name, the Linear layer)


def linear_targets(model: torch.nn.Module) -> list[Target]:
    """The body's Linear layers, which int8-dynamic replaces (heads excepted)."""
    targets = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, torch.nn.Linear) and not any(k in full.split(".") for k in KEEP_FULL_PRECISION):
                targets.append((module, child_name, child))
    return targets


def restore(targets: list[Target]) -> None:
    """Puts the original fp32 layers back (targets as linear_targets listed them before quantizing)."""
    for module, child_name, child in targets:
        setattr(module, child_name, child)


def int8_kernel_layer(linear: torch.nn.Linear) -> torch.nn.Module:
    """The int8 layer this torch build would run for `linear`, without calibration: for timing its kernel."""
    return TokenSplitInt8Linear(linear) if fbgemm_available() else PerTokenInt8Linear(linear)


def quantize_int8_dynamic(model: torch.nn.Module, tokenizer) -> dict[str, int]:
    """Replaces the body's Linear layers in place (calibrating them on CALIBRATION_TEXTS where fbgemm is used);
    returns how many layers got each treatment."""
    targets = linear_targets(model)
    if not fbgemm_available():
        if not int_mm_is_fast():
            # Only an explicit int8-dynamic comes here on such a CPU (auto measures the kernel first): say its cost.
            log.warning("int8-dynamic: this torch build has no fbgemm and this CPU no AVX512-VNNI, so int8 matrix "
                        "products run torch's reference loop (35-55x slower than fp32 per layer on an AVX2 CPU); "
                        "--quantization none is likely faster here")
        for module, child_name, child in targets:
            setattr(module, child_name, PerTokenInt8Linear(child))
        return {PerTokenInt8Linear.__name__: len(targets)} if targets else {}

    chosen: dict[torch.nn.Linear, torch.nn.Module] = {}

    def choose(linear: torch.nn.Linear, inputs: tuple) -> None:
        x = inputs[0].detach().float().reshape(-1, linear.in_features)
        reference = torch.nn.functional.linear(x, linear.weight, linear.bias)
        candidates = [SmoothedInt8Linear(linear, x.abs().amax(dim=0)), TokenSplitInt8Linear(linear)]
        chosen[linear] = min(candidates, key=lambda candidate: _relative_error(candidate(x), reference))

    hooks = [child.register_forward_pre_hook(choose) for _, _, child in targets]
    try:
        with torch.no_grad():
            model(**tokenizer(list(CALIBRATION_TEXTS), padding=True, truncation=True, return_tensors="pt"))
    finally:
        for hook in hooks:
            hook.remove()
    counts: dict[str, int] = {}
    for module, child_name, child in targets:
        replacement = chosen.get(child) or TokenSplitInt8Linear(child)    # a layer the calibration never reached
        setattr(module, child_name, replacement)
        counts[type(replacement).__name__] = counts.get(type(replacement).__name__, 0) + 1
    return counts
