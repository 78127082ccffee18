"""Grouped-query attention (Lumina2): shrink a selection of heads to one that can be removed.

Key/value head g serves query heads `[g·n, (g+1)·n)`. A removal keeps the query -> key/value
mapping only when every group that keeps heads keeps the same number (`BlockAdapter.kv_positions`
refuses anything else). `balance_kv_groups` turns any selection (highest priority first) into
the largest removable subset of it, per block: k whole groups (all of whose heads were chosen)
plus the m highest-priority chosen heads of every other group, with k·n + (G - k)·m as large as
the selection allows. Units of other kinds, and heads of attentions without groups, pass through.
`select_units` uses it (with `grouped_blocks` and `smallest_removal`) so that budgets on such
heads select removable sets (docs/pruning.md, Selection and budgets).

Example:
    >>> import diffusers
    >>> from dit_prune.units import Unit
    >>> model = diffusers.Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4,
    ...     hidden_size=36, num_layers=1, num_refiner_layers=1, num_attention_heads=6,
    ...     num_kv_heads=3, multiple_of=16, axes_dim_rope=(2, 2, 2), axes_lens=(20, 20, 20),
    ...     cap_feat_dim=8)
    >>> chosen = [Unit("head", 2, 0), Unit("head", 2, 2), Unit("head", 2, 3)]
    >>> balance_kv_groups(model, chosen)  # group 1 (heads 2, 3) goes whole; head 0 cannot go
    [Unit(kind='head', block=2, index=2), Unit(kind='head', block=2, index=3)]
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from dit_prune.units.adapters import adapter_for, out_channels
from dit_prune.units.unit import Unit


def grouped_blocks(model: nn.Module, units: Iterable[Unit]) -> set[tuple[int, str]]:
    """The (block, kind) pairs among `units` whose heads share key/value heads in groups."""
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    found: set[tuple[int, str]] = set()
    for b, kind in {(u.block, u.kind) for u in units}:
        spec = adapter.spec(blocks[b], kind) if b < len(blocks) else None
        if spec is not None and spec.kv_ups:
            found.add((b, kind))
    return found


def smallest_removal(model: nn.Module, block: int, kind: str) -> int | None:
    """Fewest heads of `kind` one removal can take from grouped-query `block`: one from every
    group (G heads, when groups hold n >= 2) or a whole group (n heads, when G >= 2); None
    when no removal leaves a head."""
    groups, n = kv_group_shape(model, block, kind)
    options = ([groups] if n >= 2 else []) + ([n] if groups >= 2 else [])
    return min(options) if options else None


def kv_group_shape(model: nn.Module, block: int, kind: str) -> tuple[int, int]:
    """(G key/value groups, n query heads per group) of `kind` in `block`, current widths."""
    adapter = adapter_for(model)
    module = adapter.blocks(model)[block]
    spec = adapter.require(module, kind)
    width = adapter.width(module, kind)
    groups = out_channels(adapter.modules(module, spec.kv_ups)[0][1]) // width
    return groups, adapter.count(module, kind) // groups


def balance_kv_groups(model: nn.Module, units: Iterable[Unit]) -> list[Unit]:
    """The largest removable subset of `units` (ordered highest priority first), in that order."""
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    units = list(units)
    dropped: set[Unit] = set()
    for b, kind in sorted({(u.block, u.kind) for u in units}):
        if b >= len(blocks) or adapter.spec(blocks[b], kind) is None:
            continue
        spec = adapter.require(blocks[b], kind)
        if not spec.kv_ups:
            continue
        block = blocks[b]
        kept = adapter.kept(block, kind)
        width = adapter.width(block, kind)
        kv_heads = out_channels(adapter.modules(block, spec.kv_ups)[0][1]) // width
        n = len(kept) // kv_heads
        group_of = {orig: pos // n for pos, orig in enumerate(kept)}
        chosen = [u for u in units if (u.block, u.kind) == (b, kind) and u.index in group_of]
        keep = _best_subset(chosen, group_of, kv_heads, n)
        dropped |= set(chosen) - keep
    return [u for u in units if u not in dropped]


def _best_subset(chosen: list[Unit], group_of: dict[int, int], groups: int, n: int) -> set[Unit]:
    per_group: dict[int, list[Unit]] = {g: [] for g in range(groups)}
    for u in chosen:  # priority order kept within each group
        per_group[group_of[u.index]].append(u)
    full = sorted((g for g in range(groups) if len(per_group[g]) == n),
                  key=lambda g: max(chosen.index(u) for u in per_group[g]))
    best: tuple[int, int, int] = (0, 0, 0)  # (size, whole groups k, heads per other group m)
    for k in range(0, min(len(full), groups - 1) + 1):
        whole = set(full[:k])
        others = [g for g in range(groups) if g not in whole]
        m = min(min(len(per_group[g]) for g in others), n - 1)
        size = k * n + len(others) * m
        if size > best[0]:
            best = (size, k, m)
    _, k, m = best
    whole = set(full[:k])
    keep = {u for g in whole for u in per_group[g]}
    for g in range(groups):
        if g not in whole:
            keep |= set(per_group[g][:m])
    return keep
