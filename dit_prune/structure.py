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
    >>> read_structure(model)["counts"]["head"]
    [3, 4, 4, 4]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dit_prune.errors import DitPruneError
from dit_prune.units.adapters import KEPT_ATTRIBUTE, adapter_for
from dit_prune.units.removal import remove_positions
from dit_prune.units.unit import HEAD, NEURON


def read_structure(model: nn.Module) -> dict[str, Any]:
    """Unit counts per kind and block, and the kept original indices of every block and kind
    (`[]` where a block has no units of a kind, e.g. the text feed-forward of SD3's last
    block). DiT-style families also get `heads` and `ff_dims` (head and neuron counts)."""
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    kept = {kind: [adapter.kept(b, kind) if adapter.spec(b, kind) else [] for b in blocks]
            for kind in adapter.kinds}
    structure: dict[str, Any] = {}
    if HEAD in adapter.kinds and NEURON in adapter.kinds:
        structure["heads"] = [adapter.count(b, HEAD) for b in blocks]
        structure["ff_dims"] = [adapter.count(b, NEURON) for b in blocks]
    structure["counts"] = {kind: [adapter.count(b, kind) for b in blocks]
                           for kind in adapter.kinds}
    structure["kept"] = kept
    return structure


def is_uniform(model: nn.Module) -> bool:
    """True when no unit of any block has been removed."""
    adapter = adapter_for(model)
    return not any(hasattr(b, KEPT_ATTRIBUTE) for b in adapter.blocks(model))


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
    """Shrink the unit layers of a freshly built model to `structure`'s kept indices, with the
    same per-layer removal as pruning (`dit_prune.units.removal`); weights are meant to be
    loaded right after. One-line DitPruneError for kinds, block counts or indices the model
    does not have.
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
            if full == 0 and not indices:
                continue  # the block has no units of this kind
            if not indices:
                raise DitPruneError(f"block {block_index} must keep at least one {kind}")
            if len(set(indices)) != len(indices) or min(indices) < 0 or max(indices) >= full:
                raise DitPruneError(f"block {block_index}: invalid kept {kind} indices {indices}")
            current = adapter.kept(block, kind)
            keep = set(indices)
            drop = [pos for pos, orig in enumerate(current) if orig not in keep]
            if drop:
                remove_positions(adapter, block, kind, drop)
            order = {orig: i for i, orig in enumerate(indices)}
            adapter.set_kept(block, kind, sorted(adapter.kept(block, kind), key=order.__getitem__))
