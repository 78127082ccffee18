"""Structural removal of heads and neurons with torch-pruning's dependency graph.

A head is a whole-head channel range of `to_q`/`to_k`/`to_v` (output rows) and of
`to_out[0]` (input columns); a neuron is one row of `ff.net[0].proj` and one column of
`ff.net[2]`. Nothing else is touched: the residual stream, embeddings and adaLN layers keep
their shapes. Units keep their original (unpruned) numbering, so a pruned model can be pruned
again with the same `Unit`s.

Example:
    >>> from dit_prune.models import new_dit
    >>> from dit_prune.units import Unit
    >>> model = new_dit("tiny", 10, 8, 1)
    >>> plan = prune_units(model, [Unit("head", 0, 1), Unit("neuron", 2, 7)])
    >>> plan.counts, plan.params_before - plan.params_after
    ({'head': 1, 'neuron': 1}, 16737)
    >>> model.transformer_blocks[0].attn1.heads
    3
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from tqdm.auto import tqdm

from dit_prune.errors import DitPruneError
from dit_prune.pruning.inputs import example_inputs, forward_sample
from dit_prune.structure import fix_attention_bookkeeping, read_structure
from dit_prune.units import NEURON, BlockAdapter, Unit, adapter_for, group_units


@dataclass(frozen=True)
class PrunePlan:
    """What one `prune_units` call removed, in the original (unpruned) numbering."""

    removed: tuple[Unit, ...]  # sorted
    params_before: int
    params_after: int
    model_class: str
    kept: dict[str, list[list[int]]] = field(default_factory=dict)  # kind -> block -> indices

    @property
    def counts(self) -> dict[str, int]:
        """Removed units per kind, e.g. {'head': 3, 'neuron': 120}."""
        counts: dict[str, int] = {}
        for unit in self.removed:
            counts[unit.kind] = counts.get(unit.kind, 0) + 1
        return counts

    def to_json(self) -> dict[str, Any]:
        return {
            "removed": [u.to_json() for u in self.removed],
            "counts": self.counts,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "model_class": self.model_class,
            "kept": self.kept,
        }

    @classmethod
    def from_json(cls, data: Any) -> PrunePlan:
        try:
            return cls(
                removed=tuple(sorted(Unit.from_json(u) for u in data["removed"])),
                params_before=int(data["params_before"]),
                params_after=int(data["params_after"]),
                model_class=str(data["model_class"]),
                kept={str(k): [[int(i) for i in b] for b in v]
                      for k, v in dict(data.get("kept", {})).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DitPruneError(f"malformed pruning plan: {type(exc).__name__}: {exc}") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def unit_cost(adapter: BlockAdapter, block: nn.Module, kind: str) -> int:
    """Parameters one unit of `kind` holds in `block` (weights and biases of its slices)."""
    width = adapter.width(block, kind)
    ups = adapter.up_proj(block, kind)
    down = adapter.down_proj(block, kind)
    per_channel = sum(up.in_features + (up.bias is not None) for up in ups) + down.out_features
    return width * per_channel


def prune_units(model: nn.Module, units: Iterable[Unit], progress: bool = False) -> PrunePlan:
    """Remove exactly `units` from `model` in place; returns the plan (original numbering).

    Raises a one-line DitPruneError for units the model does not have (already pruned or out
    of range) and for a request that would leave a block without any unit of a kind.
    """
    adapter = adapter_for(model)
    units = sorted(set(units))
    grouped = group_units(model, units)
    blocks = adapter.blocks(model)
    for (b, kind), positions in sorted(grouped.items()):
        if len(positions) >= adapter.count(blocks[b], kind):
            raise DitPruneError(
                f"refusing to prune every {kind} of block {b} ({len(positions)} of "
                f"{adapter.count(blocks[b], kind)}): a block must keep at least one"
            )
    params_before = count_parameters(model)
    expected = sum(unit_cost(adapter, blocks[b], kind) * len(pos)
                   for (b, kind), pos in grouped.items())
    if grouped:
        _prune_groups(model, adapter, grouped, progress)
    params_after = count_parameters(model)
    if params_before - params_after != expected:
        raise RuntimeError(
            f"structural pruning removed {params_before - params_after} parameters, "
            f"expected {expected}"
        )
    return PrunePlan(tuple(units), params_before, params_after, type(model).__name__,
                     read_structure(model)["kept"])


def build_graph(model: nn.Module) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of `model`, traced on one example input."""
    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=example_inputs(model), forward_fn=forward_sample,
            verbose=False,
        )


def _prune_groups(
    model: nn.Module,
    adapter: BlockAdapter,
    grouped: dict[tuple[int, str], list[int]],
    progress: bool,
) -> None:
    was_training = model.training
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(True)  # tracing follows autograd
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    try:
        graph = build_graph(model)
        # every group is built and checked before any is applied: a refusal changes nothing
        groups = [(b, kind, positions, _checked_group(graph, adapter, model, b, kind, positions))
                  for (b, kind), positions in sorted(grouped.items())]
        touched: set[str] = set()
        for b, kind, positions, group in tqdm(groups, desc="pruning", disable=not progress):
            touched |= _apply_group(group, model, adapter, b, kind, positions)
        for name, p in model.named_parameters():
            if name not in touched and tuple(p.shape) != shapes[name]:
                raise RuntimeError(f"structural pruning changed {name}, which it must not touch")
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, True))
        model.train(was_training)


def _checked_group(
    graph: tp.DependencyGraph,
    adapter: BlockAdapter,
    model: nn.Module,
    b: int,
    kind: str,
    positions: list[int],
) -> Any:
    """torch-pruning's group for the units at `positions` of one (block, kind), checked."""
    block = adapter.blocks(model)[b]
    width = adapter.width(block, kind)
    channels = [p * width + c for p in positions for c in range(width)]  # whole-unit ranges
    ups = adapter.up_proj(block, kind)
    group = graph.get_pruning_group(ups[0], tp.prune_linear_out_channels, channels)
    allowed = {id(layer) for layer in [*ups, adapter.down_proj(block, kind)]}
    _check_group(group, allowed, channels, f"block {b} {kind}")
    return group


def _apply_group(
    group: Any,
    model: nn.Module,
    adapter: BlockAdapter,
    b: int,
    kind: str,
    positions: list[int],
) -> set[str]:
    """Prune one checked group, fix bookkeeping; returns the parameter names touched."""
    block = adapter.blocks(model)[b]
    width = adapter.width(block, kind)
    kept = adapter.kept(block, kind)
    ups = adapter.up_proj(block, kind)
    down = adapter.down_proj(block, kind)
    group.prune(record_history=False)
    remaining = len(kept) - len(positions)
    if any(up.out_features != remaining * width for up in ups) or \
            down.in_features != remaining * width:
        raise RuntimeError(f"block {b} {kind}: layers have unexpected widths after pruning")
    if kind != NEURON:
        fix_attention_bookkeeping(adapter.attention(block, kind), remaining, width)
    dropped = set(positions)
    adapter.set_kept(block, kind, [orig for pos, orig in enumerate(kept) if pos not in dropped])
    names = {id(m): n for n, m in model.named_modules()}
    return {f"{names[id(layer)]}.{p}" for layer in [*ups, down] for p, _ in
            layer.named_parameters()}


def _check_group(group: Any, allowed: set[int], channels: list[int], where: str) -> None:
    """Refuse a group that reaches beyond the unit's layers or other channels than requested."""
    wanted = sorted(channels)
    for dep, idxs in group:
        target = dep.target.module
        if id(target) in allowed:
            if sorted(int(i) for i in idxs) != wanted:
                raise RuntimeError(f"{where}: torch-pruning coupled other channels of a layer")
            continue
        if isinstance(target, nn.Parameter) or isinstance(target, tp.ops._OutputOp) or (
            isinstance(target, nn.Module) and any(True for _ in target.parameters())
        ):
            raise RuntimeError(
                f"{where}: torch-pruning coupled {type(target).__name__} outside the unit's layers"
            )
