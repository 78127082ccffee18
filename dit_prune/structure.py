"""Per-block widths of a (possibly pruned) DiT: read them off a model, or shrink a model to them.

A pruned model's config records, per unit kind, the original indices each block still has, so
the directory can be rebuilt without the base checkpoint and units keep their unpruned numbering.

Example:
    >>> from dit_prune.models import new_dit
    >>> model = new_dit("tiny", 10, 8, 1)
    >>> is_uniform(model)
    True
    >>> kept = read_structure(model)["kept"]
    >>> kept["head"][0] = [0, 2, 3]
    >>> resize_to_structure(model, {"kept": kept})
    >>> read_structure(model)["heads"], is_uniform(model)
    ([3, 4, 4, 4], False)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dit_prune.errors import DitPruneError
from dit_prune.units.adapters import adapter_for
from dit_prune.units.unit import NEURON


def read_structure(model: nn.Module) -> dict[str, Any]:
    """Head counts, FF widths and the kept original indices of every block and unit kind."""
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    kept = {kind: [adapter.kept(b, kind) for b in blocks] for kind in adapter.kinds}
    return {
        "heads": [adapter.count(b, "head") for b in blocks],
        "ff_dims": [adapter.count(b, NEURON) for b in blocks],
        "kept": kept,
    }


def is_uniform(model: nn.Module) -> bool:
    """True when no unit of any block has been removed."""
    adapter = adapter_for(model)
    return all(
        adapter.kept(b, kind) == list(range(len(adapter.kept(b, kind))))
        and not hasattr(b, "dit_prune_kept")
        for b in adapter.blocks(model)
        for kind in adapter.kinds
    )


def original_counts(model: nn.Module) -> dict[str, list[int]]:
    """Units per kind and block of the unpruned architecture that `model.config` describes.

    The unpruned model is built on the meta device, so this costs no memory even for DiT-XL.
    """
    adapter = adapter_for(model)
    config = {k: v for k, v in dict(model.config).items()
              if not k.startswith("_") and k != "dit_prune_structure"}
    with torch.device("meta"):
        full = type(model).from_config(config)
    return {kind: [adapter.count(b, kind) for b in adapter.blocks(full)] for kind in adapter.kinds}


def resize_to_structure(model: nn.Module, structure: dict[str, Any]) -> None:
    """Replace the Linears of every unit kind by smaller uninitialised ones matching `structure`.

    Weights are meant to be loaded right after (they are left uninitialised here).
    """
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    kept = structure.get("kept")
    if not isinstance(kept, dict):
        raise DitPruneError("pruned structure has no 'kept' indices per unit kind")
    for kind, per_block in kept.items():
        if kind not in adapter.kinds or len(per_block) != len(blocks):
            raise DitPruneError(
                f"pruned structure lists {kind!r} for {len(per_block)} blocks; the model has "
                f"{len(blocks)} blocks and kinds {adapter.kinds}"
            )
        for block_index, (block, indices) in enumerate(zip(blocks, per_block, strict=True)):
            full = adapter.count(block, kind)
            if not indices:
                raise DitPruneError(f"block {block_index} must keep at least one {kind}")
            if len(set(indices)) != len(indices) or min(indices) < 0 or max(indices) >= full:
                raise DitPruneError(f"block {block_index}: invalid kept {kind} indices {indices}")
            shrink_kind(adapter, block, kind, len(indices))
            adapter.set_kept(block, kind, list(indices))


def shrink_kind(adapter: Any, block: nn.Module, kind: str, count: int) -> None:
    """Resize the layers of one unit kind of `block` to `count` units (weights uninitialised)."""
    channels = count * adapter.width(block, kind)
    rows = count * adapter.up_rows_per_unit(block, kind)  # GLU neurons own two proj rows
    for layer_owner, name, layer in _layers(adapter, block, kind):
        is_down = layer is adapter.down_proj(block, kind)
        new = _resized(layer, in_features=channels if is_down else None,
                       out_features=None if is_down else rows)
        _set(layer_owner, name, new)
    if kind != NEURON:
        attn = adapter.attention(block, kind)
        head_dim = attn.inner_dim // attn.heads
        fix_attention_bookkeeping(attn, count, head_dim)


def fix_attention_bookkeeping(attn: nn.Module, heads: int, head_dim: int) -> None:
    """The one place that updates diffusers Attention's head count and inner widths."""
    attn.heads = heads
    attn.inner_dim = heads * head_dim
    attn.inner_kv_dim = heads * head_dim


def _layers(adapter: Any, block: nn.Module, kind: str) -> list[tuple[Any, Any, nn.Linear]]:
    if kind == NEURON:
        return [(block.ff.net[0], "proj", block.ff.net[0].proj), (block.ff.net, 2, block.ff.net[2])]
    attn = adapter.attention(block, kind)
    return [(attn, n, getattr(attn, n)) for n in ("to_q", "to_k", "to_v")] + [
        (attn.to_out, 0, attn.to_out[0])
    ]


def _set(owner: Any, name: Any, layer: nn.Linear) -> None:
    if isinstance(name, int):
        owner[name] = layer
    else:
        setattr(owner, name, layer)


def _resized(
    layer: nn.Linear, in_features: int | None = None, out_features: int | None = None
) -> nn.Linear:
    return nn.Linear(
        in_features or layer.in_features,
        out_features or layer.out_features,
        bias=layer.bias is not None,
        device=layer.weight.device,
        dtype=layer.weight.dtype,
    ).requires_grad_(layer.weight.requires_grad)
