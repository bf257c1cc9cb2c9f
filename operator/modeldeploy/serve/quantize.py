"""int8-dynamic for CPUs (x86 and Loongson alike): int8 weights with one scale per output channel, and
activations quantized on the fly with one scale per token, multiplied by torch's int8 matrix product
(`torch._int_mm`, the kernel torchao's int8 dynamic quantization uses too).

Why not `torch.ao.quantization.quantize_dynamic`: it is deprecated in the torch we ship, and its one scale per
activation tensor lost too much on small encoders (mean cosine to fp32 0.91-0.96 on all-MiniLM-L6-v2, against
0.994 here); torchao itself has no loong64 builds."""

from __future__ import annotations

import torch

# Heads that turn features into outputs stay in full precision: they are small next to the body and sensitive.
KEEP_FULL_PRECISION = ("lm_head", "classifier", "score", "pooler")


class Int8DynamicLinear(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
        self.register_buffer("weight_int8", torch.round(weight / scale).to(torch.int8).t().contiguous())
        self.register_buffer("weight_scale", scale.t().contiguous())
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().float(),
                                                                        requires_grad=False)
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


def quantize_int8_dynamic(model: torch.nn.Module) -> int:
    """Replaces the body's Linear layers in place; returns how many were replaced."""
    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, torch.nn.Linear) and not any(k in full.split(".") for k in KEEP_FULL_PRECISION):
                setattr(module, child_name, Int8DynamicLinear(child))
                replaced += 1
    return replaced
