"""Units (heads and neurons), their enumeration, and where each lives in the model.

Every family's anatomy is declared in `dit_prune.units.families` (docs/families.md).

Example:
    >>> from dit_prune.models import new_dit
    >>> model = new_dit("tiny", 10, 8, 1)
    >>> units = enumerate_units(model)
    >>> len(units), units[0], units[4]
    (2064, Unit(kind='head', block=0, index=0), Unit(kind='neuron', block=0, index=0))
    >>> layer, columns = locate(model, Unit("head", 1, 2))
    >>> columns
    range(64, 96)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

from torch import nn

from dit_prune.errors import DitPruneError
from dit_prune.units.adapters import ADAPTERS, BlockAdapter, adapter_for
from dit_prune.units.unit import (
    CONTEXT_NEURON,
    CROSS_HEAD,
    DUAL_HEAD,
    HEAD,
    JOINT_HEAD,
    NEURON,
    SINGLE_HEAD,
    SINGLE_NEURON,
    UNIT_KINDS,
    Unit,
)

__all__ = [
    "ADAPTERS", "BlockAdapter", "CONTEXT_NEURON", "CROSS_HEAD", "DUAL_HEAD", "HEAD",
    "JOINT_HEAD", "NEURON", "SINGLE_HEAD", "SINGLE_NEURON", "UNIT_KINDS", "Unit",
    "adapter_for", "enumerate_units", "group_units", "locate", "unit_columns",
]


def enumerate_units(model: nn.Module, kinds: Sequence[str] | None = None) -> list[Unit]:
    """Every present unit of the given kinds (default: the family's `default_kinds`, e.g.
    head and neuron for DiT and PixArt), ordered by block, then kind, then original index."""
    adapter = adapter_for(model)
    kinds = adapter.default_kinds if kinds is None else tuple(kinds)
    for kind in kinds:
        if kind not in adapter.kinds:
            raise DitPruneError(f"{adapter.family} has no units of kind {kind!r}; its kinds: "
                                f"{', '.join(adapter.kinds)}")
    units: list[Unit] = []
    for b, block in enumerate(adapter.blocks(model)):
        for kind in kinds:
            units.extend(Unit(kind, b, i) for i in sorted(adapter.kept(block, kind)))
    return units


def group_units(model: nn.Module, units: Iterable[Unit]) -> dict[tuple[int, str], list[int]]:
    """(block, kind) -> current positions of the named units; errors on units not in the model."""
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    positions: dict[tuple[int, str], dict[int, int]] = {}
    grouped: dict[tuple[int, str], list[int]] = defaultdict(list)
    present = [k for k in adapter.kinds if any(adapter.spec(b, k) is not None for b in blocks)]
    for unit in units:
        if unit.kind not in present:
            raise DitPruneError(f"{type(model).__name__} has no units of kind {unit.kind!r}; its "
                                f"kinds: {', '.join(present)} ({unit})")
        if unit.block >= len(blocks) or adapter.spec(blocks[unit.block], unit.kind) is None:
            raise DitPruneError(f"{unit} does not exist in the model ({len(blocks)} blocks)")
        key = (unit.block, unit.kind)
        if key not in positions:
            kept = adapter.kept(blocks[unit.block], unit.kind)
            positions[key] = {orig: pos for pos, orig in enumerate(kept)}
        if unit.index not in positions[key]:
            raise DitPruneError(f"{unit} does not exist in the model (pruned or out of range)")
        grouped[key].append(positions[key][unit.index])
    return {k: sorted(set(v)) for k, v in grouped.items()}


def unit_columns(adapter: BlockAdapter, block: nn.Module, kind: str, position: int,
                 offset: int = 0) -> range:
    """Input-channel range a unit at `position` occupies in a down-projection whose unit
    columns start at `offset`."""
    width = adapter.width(block, kind)
    return range(offset + position * width, offset + (position + 1) * width)


def locate(model: nn.Module, unit: Unit) -> tuple[nn.Module, range]:
    """The first down-projection of `unit` and its input-channel range (current numbering)."""
    adapter = adapter_for(model)
    ((block_index, kind), positions), = group_units(model, [unit]).items()
    block = adapter.blocks(model)[block_index]
    site, layer = adapter.modules(block, adapter.require(block, kind).downs)[0]
    return layer, unit_columns(adapter, block, kind, positions[0],
                               adapter.down_offset(block, site))
