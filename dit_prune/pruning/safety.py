"""Undo and verify a structural removal: a snapshot of the unit layers, and the forward check.

`prune_units` snapshots the modules it is about to shrink (their attribute and `Parameter`
dicts: widths, the attention bookkeeping, the kept indices; torch-pruning's per-layer functions
replace parameters, they never write into the old ones), removes the units, and compares one
forward on an example input with `ablate` of the same units on the unpruned model. Any failure
restores the snapshot, so the caller's model is left as it was, without a deep copy of the model.

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
from dit_prune.units import BlockAdapter


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
    """What pruning one set of (block, kind) groups may change, to put back on failure: the
    attribute dict and parameter dict of every site layer, attention module and block
    (widths, `heads`/`inner_dim`, `mlp_hidden_dim`, the kept indices)."""

    saved: list[tuple[nn.Module, dict[str, Any], dict[str, Any]]] = field(default_factory=list)

    @classmethod
    def take(cls, adapter: BlockAdapter, blocks: list[nn.Module],
             keys: list[tuple[int, str]]) -> LayerSnapshot:
        snap = cls()
        seen: set[int] = set()
        for b, kind in keys:
            block = blocks[b]
            spec = adapter.require(block, kind)
            modules = [m for _, m in adapter.modules(block, spec.sites)] + [block]
            if spec.attention is not None:
                modules.append(adapter.attention(block, kind))
            for module in modules:
                if id(module) not in seen:
                    seen.add(id(module))
                    snap.saved.append((module, dict(module.__dict__),
                                       dict(module._parameters)))
        return snap

    def restore(self) -> None:
        for module, attributes, parameters in self.saved:
            for name in [k for k in module.__dict__ if k not in attributes]:
                del module.__dict__[name]  # e.g. a kept-indices record added since
            module.__dict__.update(attributes)
            module.__dict__["_parameters"] = dict(parameters)  # torch-pruning replaced entries
