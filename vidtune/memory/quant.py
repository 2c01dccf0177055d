"""int8 weight-only quantization of the frozen base with torchao (Int8WeightOnlyConfig).

All nn.Linear layers inside ``model.blocks`` (attention projections and FFN) and the modules a
family names in ``model.quantize_also`` become
``Int8Tensor`` weights: int8 data + per-row scales, dequantized in the matmul; backward reaches
the input, so LoRA (peft) trains on top. Apply order: quantize -> adapters -> offload ->
checkpointing. NF4/INT4 are refused for Wan: the guides say Wan is too sensitive to 4-bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

FOUR_BIT = ("nf4", "int4", "fp4", "int4_weight_only")


@dataclass
class QuantConfig:
    base_precision: str = "bf16"
    """Precision of the frozen base blocks: 'bf16', 'fp32' or 'int8' (torchao weight-only)."""
    quantize_via: str = "cpu"
    """Where quantization runs: 'cpu' (low device memory) or 'device' (each block on the device, faster)."""

    def validate(self, family: str = "wan") -> None:
        p = self.base_precision.lower()
        if p in FOUR_BIT:
            if family.startswith("wan"):
                raise ValueError(
                    f"base_precision = {self.base_precision!r} is refused for {family}: Wan is too sensitive "
                    "to 4-bit quantization and cannot be used with NF4 or INT4 (see the Wan quickstart). "
                    "Use base_precision = 'int8'.")
            raise ValueError(f"base_precision = {self.base_precision!r} is not supported; use 'int8'")
        if p not in ("bf16", "fp32", "int8"):
            raise ValueError(f"base_precision must be bf16, fp32 or int8, got {self.base_precision!r}")
        if self.quantize_via not in ("cpu", "device"):
            raise ValueError(f"quantize_via must be 'cpu' or 'device', got {self.quantize_via!r}")


def apply_quantization(model: nn.Module, cfg: QuantConfig, device="cpu", family: str | None = None) -> int:
    """Quantize every block linear of ``model.blocks`` to int8 in place; returns how many.

    ``quantize_via = 'device'`` moves one block at a time to ``device``, quantizes it there and
    moves it back, so at most one bf16 block is on the device at once.
    """
    cfg.validate(family or getattr(model, "family", "wan"))
    if cfg.base_precision.lower() != "int8":
        return 0
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    count = 0
    # Families with frozen Linears outside the blocks name them in quantize_also (Wan S2V's injector).
    for block in [*model.blocks, *(model.get_submodule(n) for n in getattr(model, "quantize_also", ()))]:
        n = sum(isinstance(m, nn.Linear) and type(m.weight) in (torch.Tensor, nn.Parameter) for m in block.modules())
        if not n:
            continue
        home = next(block.parameters()).device
        if cfg.quantize_via == "device":
            block.to(device)
        quantize_(block, Int8WeightOnlyConfig(),
                  filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and type(m.weight) in (torch.Tensor, nn.Parameter))
        if cfg.quantize_via == "device":
            block.to(home)
        for p in block.parameters():
            if not (type(p) in (torch.Tensor, nn.Parameter)):
                p.requires_grad_(False)
        count += n
    return count


def weight_bytes(module: nn.Module) -> int:
    """Bytes of all parameters, counting tensor-subclass inner tensors (int8 data + scales)."""
    total = 0
    for p in module.parameters():
        if hasattr(p, "__tensor_flatten__") and type(p) not in (torch.Tensor, nn.Parameter):
            names, _ = p.__tensor_flatten__()
            total += sum(getattr(p, n).numel() * getattr(p, n).element_size() for n in names)
        else:
            total += p.numel() * p.element_size()
    return total
