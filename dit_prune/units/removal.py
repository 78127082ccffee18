"""Remove units from one block with torch-pruning's per-layer pruning functions, driven by the
family's anatomy; fix the attention bookkeeping and the kept original indices.

Every channel list is computed before the first layer changes (a down site's offset reads the
current width of another layer). Layer functions: `torch_pruning.prune_linear_out_channels` /
`prune_linear_in_channels`, `prune_conv_out_channels` / `prune_conv_in_channels`,
`prune_depthwise_conv_out_channels`, `prune_layernorm_out_channels`, and
`prune_parameter_out_channels` for the 1-D weights of other norms (diffusers `RMSNorm`).

Example:
    >>> from dit_prune.models import new_dit
    >>> from dit_prune.units.adapters import adapter_for
    >>> model = new_dit("tiny", 10, 8, 1)
    >>> adapter = adapter_for(model)
    >>> block = adapter.blocks(model)[0]
    >>> _ = remove_positions(adapter, block, "head", [1])
    >>> block.attn1.heads, adapter.kept(block, "head")
    (3, [0, 2, 3])
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from dit_prune.errors import DitPruneError
from dit_prune.units.adapters import BlockAdapter, out_channels

Step = tuple[nn.Module, str, list[int]]  # (module, "out" | "in" | "norm", channel indices)


def removal_steps(adapter: BlockAdapter, block: nn.Module, kind: str,
                  positions: list[int]) -> list[Step]:
    """Every (layer, side, channels) the units at current `positions` of `block` occupy."""
    spec = adapter.require(block, kind)
    base = adapter.unit_channels(block, kind, positions)
    steps: list[Step] = []
    for site, module in adapter.modules(block, spec.ups):
        steps.append((module, "out", adapter.up_channels(block, site, module, base)))
    for site, module in adapter.modules(block, spec.downs):
        steps.append((module, "in", adapter.down_channels(block, site, base)))
    for module in adapter.norm_modules(block, kind):
        steps.append((module, "norm", base))
    kv = adapter.kv_positions(block, kind, positions)  # refuses unbalanced GQA removals
    if kv:
        kv_base = adapter.unit_channels(block, kind, kv)
        for _, module in adapter.modules(block, spec.kv_ups):
            steps.append((module, "out", kv_base))
    return steps


def remove_positions(adapter: BlockAdapter, block: nn.Module, kind: str,
                     positions: list[int]) -> list[nn.Module]:
    """Remove the units at current `positions` of `kind` from `block`; returns the layers
    changed. Raises a one-line DitPruneError when a layer ends with an unexpected width."""
    spec = adapter.require(block, kind)
    width = adapter.width(block, kind)
    kept = adapter.kept(block, kind)
    remaining = len(kept) - len(set(positions))
    kv_left = None
    if spec.kv_ups:
        kv_module = adapter.modules(block, spec.kv_ups)[0][1]
        kv_left = out_channels(kv_module) // width - len(adapter.kv_positions(block, kind,
                                                                             positions))
    steps = removal_steps(adapter, block, kind, positions)
    for module, side, channels in steps:
        prune_channels(module, side, channels)
    if spec.attention is not None:
        fix_attention_bookkeeping(adapter.attention(block, kind), remaining, width, kv_left)
    if spec.count_attr is not None:
        setattr(block, spec.count_attr, remaining)
    dropped = set(positions)
    adapter.set_kept(block, kind, [orig for pos, orig in enumerate(kept) if pos not in dropped])
    if adapter.count(block, kind) != remaining:
        raise DitPruneError(f"{kind}: layers have unexpected widths after pruning")
    return [module for module, _, _ in steps]


def prune_channels(module: nn.Module, side: str, channels: list[int]) -> None:
    """Remove `channels` of one layer with torch-pruning's per-layer function for its type."""
    if side == "out" and isinstance(module, nn.Linear):
        tp.prune_linear_out_channels(module, channels)
    elif side == "in" and isinstance(module, nn.Linear):
        tp.prune_linear_in_channels(module, channels)
    elif side == "out" and isinstance(module, nn.Conv2d):
        depthwise = module.groups > 1 and module.groups == module.in_channels == \
            module.out_channels
        if depthwise:
            tp.prune_depthwise_conv_out_channels(module, channels)
        else:
            tp.prune_conv_out_channels(module, channels)
    elif side == "in" and isinstance(module, nn.Conv2d):
        tp.prune_conv_in_channels(module, channels)
    elif side == "norm" and isinstance(module, nn.LayerNorm):
        tp.prune_layernorm_out_channels(module, channels)
    elif side == "norm":
        _prune_norm(module, channels)
    else:
        raise DitPruneError(f"no torch-pruning function for {side} channels of "
                            f"{type(module).__name__}")


def _prune_norm(module: nn.Module, channels: list[int]) -> None:
    """Slice the 1-D weight and bias of a norm (diffusers or torch RMSNorm) and its shape."""
    for name in ("weight", "bias"):
        param = getattr(module, name, None)
        if isinstance(param, nn.Parameter):
            setattr(module, name, tp.prune_parameter_out_channels(param, channels))
    length = None
    for name in ("weight", "bias"):
        param = getattr(module, name, None)
        if isinstance(param, torch.Tensor):
            length = int(param.shape[-1])
    for attr in ("dim", "normalized_shape"):
        shape = getattr(module, attr, None)
        if length is not None and isinstance(shape, tuple):
            setattr(module, attr, type(shape)((*tuple(shape)[:-1], length)))


def fix_attention_bookkeeping(attn: nn.Module, heads: int, head_dim: int,
                              kv_heads: int | None = None) -> None:
    """The one place that updates an attention's head count and inner widths (diffusers
    `Attention` and `FluxAttention`): `heads`, `inner_dim`, `inner_kv_dim` (the key/value
    width; `kv_heads` of a grouped-query attention), `sliceable_head_dim`."""
    attn.heads = heads
    attn.inner_dim = heads * head_dim
    if hasattr(attn, "inner_kv_dim"):
        attn.inner_kv_dim = (heads if kv_heads is None else kv_heads) * head_dim
    if hasattr(attn, "sliceable_head_dim"):
        attn.sliceable_head_dim = heads
