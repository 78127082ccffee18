"""Every weight slice a unit owns, read from its family's anatomy: for each up-projection site
the unit's output rows (both halves of a GLU), for each down-projection site its input columns
(after `Site.after`'s width). Norms across heads and grouped-query key/value rows are left out:
they are scale factors, or shared by a group.

Used by the `magnitude` scorer; parameter counts come from `BlockAdapter.unit_cost`, which reads
the same sites (and adds the norm entries).

Example:
    >>> from dit_prune.models import new_dit
    >>> from dit_prune.units.adapters import adapter_for
    >>> model = new_dit("tiny", 10, 8, 1)
    >>> adapter = adapter_for(model)
    >>> block = adapter.blocks(model)[0]
    >>> [(s.side, tuple(s.index.shape)) for s in unit_slices(adapter, block, "head")]
    [('out', (4, 32)), ('out', (4, 32)), ('out', (4, 32)), ('in', (4, 32))]
    >>> unit_squared_norms(adapter, block, "neuron").shape  # (units present,)
    torch.Size([512])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dit_prune.units.adapters import BlockAdapter, out_channels


@dataclass(frozen=True)
class UnitSlice:
    """One site's channels of every unit of a kind in a block: `index[p]` are the channels of
    the unit at current position p (rows of `module` for side "out", columns for "in")."""

    module: nn.Module
    side: str  # "out" (up-projection rows) or "in" (down-projection columns)
    index: torch.Tensor  # (count, channels per unit) long


def unit_slices(adapter: BlockAdapter, block: nn.Module, kind: str) -> list[UnitSlice]:
    """Every up and down site of `kind` in `block` with each present unit's channels."""
    spec = adapter.require(block, kind)
    count, width = adapter.count(block, kind), adapter.width(block, kind)
    base = torch.arange(count * width).view(count, width)  # (count, width)
    slices = []
    for site, module in adapter.modules(block, spec.ups):
        index = base
        if adapter.is_glu(block, site):
            index = torch.cat([base, base + out_channels(module) // 2], 1)  # (count, 2·width)
        slices.append(UnitSlice(module, "out", index))
    for site, module in adapter.modules(block, spec.downs):
        slices.append(UnitSlice(module, "in", base + adapter.down_offset(block, site)))
    return slices


@torch.no_grad()
def unit_squared_norms(adapter: BlockAdapter, block: nn.Module, kind: str) -> torch.Tensor:
    """(count,) float64: sum of squares of each present unit's weights and up-projection
    biases over every site (conv kernels included), in current position order."""
    total = torch.zeros(adapter.count(block, kind), dtype=torch.float64)  # (count,)
    for piece in unit_slices(adapter, block, kind):
        weight = piece.module.weight.detach().to(torch.float64)  # (C_out, C_in, ...)
        if piece.side == "out":
            per_channel = weight.pow(2).flatten(1).sum(1)  # (C_out,)
            bias = getattr(piece.module, "bias", None)
            if bias is not None:
                per_channel = per_channel + bias.detach().to(torch.float64).pow(2)
        else:
            per_channel = weight.pow(2).transpose(0, 1).flatten(1).sum(1)  # (C_in,)
        index = piece.index.to(per_channel.device)  # (count, k)
        total += per_channel[index].sum(1).cpu()  # (count,)
    return total
