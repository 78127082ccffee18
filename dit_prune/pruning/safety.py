"""Undo and verify a structural removal: a snapshot of the unit layers, and the forward check.

`prune_units` snapshots the layers it is about to shrink (their `Parameter` objects, widths, the
attention bookkeeping and the kept indices: torch-pruning's per-layer functions replace
parameters, they never write into the old ones), removes the units, and compares one forward on
an example input with `ablate` of the same units on the unpruned model. Any failure restores the
snapshot, so the caller's model is left as it was, without a deep copy of the model.

Tolerance: max |pruned - reference| <= rtol * max |reference| + atol, with (rtol, atol) =
(1e-4, 1e-6) for float32/float64 and (2e-2, 1e-3) for 16-bit floats (the pruned matmuls sum
fewer terms, so rounding differs from the ablated ones).

Example:
    >>> import torch
    >>> reference = torch.tensor([[1.0, -2.0]])  # (B, D)
    >>> check_forward(reference + 1e-5, reference, "block 0 head")
    >>> check_forward(reference + 0.5, reference, "block 0 head")
    Traceback (most recent call last):
    ...
    dit_prune.errors.DitPruneError: pruned model disagrees with ablation of the same units \
(block 0 head): max |diff| 0.5 > 0.000201 (max |output| 2); the model was left unchanged
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dit_prune.errors import DitPruneError
from dit_prune.units import NEURON, BlockAdapter
from dit_prune.units.adapters import KEPT_ATTRIBUTE

ATTENTION_FIELDS = ("heads", "inner_dim", "inner_kv_dim")  # what fix_attention_bookkeeping writes
MISSING = object()


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) of the forward check for outputs of `dtype`."""
    if dtype in (torch.float16, torch.bfloat16):
        return 2e-2, 1e-3
    return 1e-4, 1e-6


def check_forward(pruned: torch.Tensor, reference: torch.Tensor, where: str) -> None:
    """One-line DitPruneError when `pruned` differs from `reference` beyond `tolerance`."""
    if pruned.shape != reference.shape:
        raise DitPruneError(f"pruned model's output has shape {tuple(pruned.shape)}, ablation "
                            f"gives {tuple(reference.shape)} ({where}); the model was left "
                            f"unchanged")
    rtol, atol = tolerance(reference.dtype)
    ref = reference.float()  # (B, ...)
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    diff = (pruned.float() - ref).abs()  # (B, ...)
    worst = float(diff.max()) if diff.numel() else 0.0
    bound = rtol * scale + atol
    if not worst <= bound:  # NaN fails too
        raise DitPruneError(f"pruned model disagrees with ablation of the same units ({where}): "
                            f"max |diff| {worst:.3g} > {bound:.3g} (max |output| {scale:.3g}); "
                            f"the model was left unchanged")


@dataclass
class LayerSnapshot:
    """What pruning one set of (block, kind) groups may change, to put back on failure."""

    linears: list[tuple[nn.Linear, Any, Any, int, int]] = field(default_factory=list)
    attentions: list[tuple[nn.Module, dict[str, Any]]] = field(default_factory=list)
    kept: list[tuple[nn.Module, Any]] = field(default_factory=list)

    @classmethod
    def take(cls, adapter: BlockAdapter, blocks: list[nn.Module],
             keys: list[tuple[int, str]]) -> LayerSnapshot:
        snap = cls()
        seen: set[int] = set()
        for b, kind in keys:
            block = blocks[b]
            for layer in [*adapter.up_proj(block, kind), adapter.down_proj(block, kind)]:
                snap.linears.append((layer, layer.weight, layer.bias, layer.in_features,
                                     layer.out_features))
            if kind != NEURON:
                attn = adapter.attention(block, kind)
                snap.attentions.append((attn, {f: getattr(attn, f) for f in ATTENTION_FIELDS}))
            if id(block) not in seen:
                seen.add(id(block))
                recorded = getattr(block, KEPT_ATTRIBUTE, MISSING)
                snap.kept.append((block, recorded if recorded is MISSING else dict(recorded)))
        return snap

    def restore(self) -> None:
        for layer, weight, bias, in_features, out_features in self.linears:
            layer.weight, layer.in_features, layer.out_features = weight, in_features, out_features
            if bias is not None:
                layer.bias = bias
        for attn, fields in self.attentions:
            for name, value in fields.items():
                setattr(attn, name, value)
        for block, recorded in self.kept:
            if recorded is MISSING:
                if hasattr(block, KEPT_ATTRIBUTE):
                    delattr(block, KEPT_ATTRIBUTE)
            else:
                setattr(block, KEPT_ATTRIBUTE, recorded)
