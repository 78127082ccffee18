"""Structural removal of heads and neurons with torch-pruning's per-layer pruning functions.

Where a unit lives is the family's declared anatomy (`dit_prune.units.families`, e.g. a DiT
head is a channel range of `to_q`/`to_k`/`to_v` rows and `to_out[0]` columns, a Flux joint
head also of `add_*_proj` and `to_add_out`); `dit_prune.units.removal` applies torch-pruning's
per-layer functions to every site. Where torch-pruning's DependencyGraph traces a family
correctly (DiT, PixArt) it cross-checks every group before anything is removed; for every
family one forward is compared with `ablate` of the same units after
(`dit_prune.pruning.safety`). Nothing else is touched: the residual stream, embeddings and adaLN
layers keep their shapes. Units keep their original (unpruned) numbering, so a pruned model can
be pruned again with the same `Unit`s.

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
from dit_prune.hooks import ablate
from dit_prune.legacy import family_name
from dit_prune.pruning.inputs import check_side, example_inputs, forward_sample
from dit_prune.pruning.safety import LayerSnapshot, check_forward
from dit_prune.structure import read_structure
from dit_prune.units import BlockAdapter, Unit, adapter_for, group_units
from dit_prune.units.removal import removal_steps, remove_positions


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
    """Parameters one unit of `kind` holds in `block` (weights and biases of its slices on
    every site; `BlockAdapter.unit_cost`)."""
    return adapter.unit_cost(block, kind)


def prune_units(model: nn.Module, units: Iterable[Unit], progress: bool = False) -> PrunePlan:
    """Remove exactly `units` from `model` in place; returns the plan (original numbering).

    Raises a one-line DitPruneError for units the model does not have (already pruned or out
    of range), for a request that would leave a block without any unit of a kind, and when the
    pruned model's forward on an example input disagrees with `ablate` of the same units (see
    `dit_prune.pruning.safety`); after any error the model is as it was.
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
    expected = 0
    for (b, kind), positions in sorted(grouped.items()):
        try:
            expected += adapter.removal_cost(blocks[b], kind, positions)
        except DitPruneError as exc:  # an unbalanced grouped-query removal
            raise DitPruneError(f"block {b}: {exc}") from None
    if grouped:
        _prune_checked(model, adapter, units, grouped, expected, progress)
    params_after = count_parameters(model)
    return PrunePlan(tuple(units), params_before, params_after, family_name(model),
                     read_structure(model)["kept"])


def build_graph(model: nn.Module) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of `model`, traced on one example input."""
    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=example_inputs(model), forward_fn=forward_sample,
            verbose=False,
        )


def _prune_checked(
    model: nn.Module,
    adapter: BlockAdapter,
    units: list[Unit],
    grouped: dict[tuple[int, str], list[int]],
    expected: int,
    progress: bool,
) -> None:
    """Remove the groups, then check parameter count and one forward against `ablate`; on any
    failure put the snapshot back. Training mode and `requires_grad` flags are restored."""
    was_training = model.training
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    before = count_parameters(model)
    snapshot = LayerSnapshot.take(adapter, adapter.blocks(model), sorted(grouped))
    model.eval()  # tracing and the forward check need eval mode (no dropout)
    try:
        inputs = example_inputs(model, side=check_side(model))  # 2 x 2 patches: cheap
        with torch.no_grad(), ablate(model, units):
            reference = forward_sample(model, inputs)  # (1, C_out, h, w) or (1, T, C_out)
        model.requires_grad_(True)  # tracing follows autograd
        _prune_groups(model, adapter, grouped, progress)
        removed = before - count_parameters(model)
        if removed != expected:
            raise DitPruneError(f"structural pruning removed {removed} parameters, expected "
                                f"{expected}; the model was left unchanged")
        with torch.no_grad():
            pruned = forward_sample(model, inputs)  # (1, C_out, h, w)
        check_forward(pruned, reference, f"{len(units)} units")
    except BaseException:
        snapshot.restore()
        raise
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, True))
        model.train(was_training)


def _prune_groups(
    model: nn.Module,
    adapter: BlockAdapter,
    grouped: dict[tuple[int, str], list[int]],
    progress: bool,
) -> None:
    """Cross-check every group on torch-pruning's dependency graph (families where it traces
    correctly), then remove each with its per-layer pruning functions, driven by the anatomy."""
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    if adapter.anatomy.graph_check:
        graph = build_graph(model)
        # every group is checked before any is applied: a refusal changes nothing
        for (b, kind), positions in sorted(grouped.items()):
            _check_on_graph(graph, adapter, model, b, kind, positions)
    blocks = adapter.blocks(model)
    names = {id(m): n for n, m in model.named_modules()}
    touched: set[str] = set()
    for (b, kind), positions in tqdm(sorted(grouped.items()), desc="pruning",
                                     disable=not progress):
        for layer in remove_positions(adapter, blocks[b], kind, positions):
            touched |= {f"{names[id(layer)]}.{p}" for p, _ in layer.named_parameters()}
    for name, p in model.named_parameters():
        if name not in touched and tuple(p.shape) != shapes[name]:
            raise DitPruneError(f"structural pruning changed {name}, which it must not touch; "
                                f"the model was left unchanged")


def _check_on_graph(
    graph: tp.DependencyGraph,
    adapter: BlockAdapter,
    model: nn.Module,
    b: int,
    kind: str,
    positions: list[int],
) -> None:
    """torch-pruning's group for the units at `positions` must reach exactly the anatomy's
    layers and channels (the up-projections' rows, GLU pairs included, and the down columns)."""
    block = adapter.blocks(model)[b]
    steps = removal_steps(adapter, block, kind, positions)
    wanted = {id(module): channels for module, _, channels in steps}
    first, _, rows = steps[0]
    group = graph.get_pruning_group(first, tp.prune_linear_out_channels, rows)
    _check_group(group, wanted, f"block {b} {kind}")


def _check_group(group: Any, wanted: dict[int, list[int]], where: str) -> None:
    """Refuse a group that misses one of the unit's layers, reaches beyond them, or other
    channels than the anatomy says."""
    seen: set[int] = set()
    for dep, idxs in group:
        target = dep.target.module
        if id(target) in wanted:
            if sorted(int(i) for i in idxs) != wanted[id(target)]:
                raise DitPruneError(f"{where}: torch-pruning coupled other channels of a layer "
                                    f"than the unit's; nothing was pruned")
            seen.add(id(target))
            continue
        if isinstance(target, nn.Parameter) or isinstance(target, tp.ops._OutputOp) or (
            isinstance(target, nn.Module) and any(True for _ in target.parameters())
        ):
            raise DitPruneError(f"{where}: torch-pruning coupled {type(target).__name__} outside "
                                f"the unit's layers; nothing was pruned")
    if seen != set(wanted):
        raise DitPruneError(f"{where}: torch-pruning's group misses {len(wanted) - len(seen)} of "
                            f"the unit's layers; nothing was pruned")
