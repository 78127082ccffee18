"""Hooks on unit slices, always inside context managers that remove them (even on error).

`ablate` multiplies the named units' input channels of their down-projection by `scale`;
`capture` records those input channels (and, when asked, their gradients) per forward call.

Example:
    >>> import torch
    >>> from dit_prune.models import new_dit
    >>> from dit_prune.units import Unit
    >>> model = new_dit("tiny", 10, 8, 1).eval()
    >>> x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    >>> with ablate(model, [Unit("head", 0, 1)]):
    ...     out = model(x, timestep=t, class_labels=y).sample
    >>> with capture(model, [Unit("neuron", 3, 7)]) as record:
    ...     _ = model(x, timestep=t, class_labels=y)
    >>> record.activations(Unit("neuron", 3, 7))[0].shape  # (B, T, width) per forward call
    torch.Size([2, 16, 1])
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from dit_prune.units import Unit, adapter_for, enumerate_units, group_units, unit_columns


@dataclass
class LayerSlot:
    """One down-projection with the channels of the units hooked on it."""

    layer: nn.Linear
    units: list[Unit]
    columns: list[range]  # aligned with units, in the layer's current numbering


def unit_slots(model: nn.Module, units: Iterable[Unit]) -> list[LayerSlot]:
    """Group units by their down-projection layer, with each unit's input-channel range."""
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    units = list(units)
    grouped = group_units(model, units)
    slots: list[LayerSlot] = []
    for (b, kind), _ in sorted(grouped.items()):
        block = blocks[b]
        kept = adapter.kept(block, kind)
        position = {orig: pos for pos, orig in enumerate(kept)}
        members = sorted({u for u in units if u.block == b and u.kind == kind})
        columns = [unit_columns(adapter, block, kind, position[u.index]) for u in members]
        slots.append(LayerSlot(adapter.down_proj(block, kind), members, columns))
    return slots


@contextmanager
def ablate(model: nn.Module, units: Iterable[Unit], scale: float = 0.0) -> Iterator[None]:
    """While inside, the named units' outputs are multiplied by `scale` (0 removes them)."""
    handles = []
    try:
        for slot in unit_slots(model, units):
            mask = torch.ones(slot.layer.in_features, device=slot.layer.weight.device)  # (D_in,)
            for cols in slot.columns:
                mask[cols.start : cols.stop] = scale
            handles.append(slot.layer.register_forward_pre_hook(_scale_input(mask)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _scale_input(mask: torch.Tensor):
    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]  # (B, T, D_in)
        return (x * mask.to(dtype=x.dtype),) + tuple(args[1:])

    return hook


@dataclass
class Capture:
    """Per-layer inputs of the hooked down-projections, one entry per forward call."""

    slots: list[LayerSlot]
    inputs: list[list[torch.Tensor]] = field(default_factory=list)  # [slot][call] (B, T, D_in)
    grads: list[list[torch.Tensor]] = field(default_factory=list)  # same layout

    def _find(self, unit: Unit) -> tuple[int, range]:
        for s, slot in enumerate(self.slots):
            if unit in slot.units:
                return s, slot.columns[slot.units.index(unit)]
        raise KeyError(f"{unit} was not captured")

    def activations(self, unit: Unit) -> list[torch.Tensor]:
        """The unit's input slice per forward call: [(B, T, width)]."""
        s, cols = self._find(unit)
        return [x[..., cols.start : cols.stop] for x in self.inputs[s]]

    def gradients(self, unit: Unit) -> list[torch.Tensor]:
        """Gradient of the loss w.r.t. the unit's input slice per call (needs grads=True)."""
        s, cols = self._find(unit)
        return [g[..., cols.start : cols.stop] for g in self.grads[s]]


@contextmanager
def capture(
    model: nn.Module,
    units: Sequence[Unit] | None = None,
    grads: bool = False,
    detach: bool = True,
) -> Iterator[Capture]:
    """Record the input channels of the named units (all units when None) on every forward.

    With `grads=True` the gradient reaching those inputs is recorded as well during backward
    (in reverse call order, re-ordered here to match forward calls).
    """
    units = enumerate_units(model, adapter_for(model).kinds) if units is None else list(units)
    record = Capture(unit_slots(model, units))
    record.inputs = [[] for _ in record.slots]
    pending: list[list[torch.Tensor | None]] = [[] for _ in record.slots]
    handles = []
    try:
        for s, slot in enumerate(record.slots):
            handles.append(slot.layer.register_forward_pre_hook(
                _recorder(record.inputs[s], pending[s] if grads else None, detach)))
        yield record
    finally:
        for handle in handles:
            handle.remove()
        record.grads = [[g for g in calls if g is not None] for calls in pending]


def _recorder(store: list[torch.Tensor], grad_store: list | None, detach: bool):
    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0]  # (B, T, D_in)
        store.append(x.detach() if detach else x)
        if grad_store is not None and x.requires_grad:
            slot_index = len(grad_store)
            grad_store.append(None)

            def save_grad(g: torch.Tensor) -> None:
                grad_store[slot_index] = g.detach()

            x.register_hook(save_grad)

    return hook
