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

from collections.abc import Callable, Iterable, Iterator, Sequence
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
        scale = mask.to(dtype=x.dtype)  # (D_in,), or (B, D_in) per example
        if scale.ndim == 2:
            scale = scale.reshape(scale.shape[0], *([1] * (x.ndim - 2)), scale.shape[1])
        return (x * scale,) + tuple(args[1:])

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


@dataclass
class Gates:
    """One ones-vector per hooked down-projection, multiplied into its input, with requires_grad.

    After one backward, ``gate.grad[c] = <a_c, dL/da_c>`` summed over batch and tokens, so
    ``-unit_sums(grads)`` is the first-order change of L when each unit is removed.
    """

    slots: list[LayerSlot]
    tensors: list[torch.Tensor]  # per slot (D_in,), requires_grad
    units: list[Unit]  # the units asked for, in the caller's order (duplicates allowed)

    def unit_sums(self, per_slot: Sequence[torch.Tensor]) -> torch.Tensor:
        """Sum per-channel values (one (..., D_in) tensor per slot) over each unit's channels.

        Returns (..., U) aligned with `self.units`.
        """
        sums, flat = [], {}
        for slot, values in zip(self.slots, per_slot, strict=True):
            index = slot_column_index(slot).to(values.device)  # (U_s, width)
            sums.append(values[..., index].sum(-1))  # (..., U_s)
            flat.update((unit, len(flat)) for unit in slot.units)
        gather = torch.tensor([flat[unit] for unit in self.units], dtype=torch.long)  # (U,)
        return torch.cat(sums, -1)[..., gather.to(sums[0].device)]  # (..., U)


def slot_column_index(slot: LayerSlot) -> torch.Tensor:
    """(U_s, width) input-channel indices of each unit of `slot` (all units share one width)."""
    return torch.tensor([list(cols) for cols in slot.columns], dtype=torch.long)


@contextmanager
def gates(model: nn.Module, units: Sequence[Unit], batch: int | None = None) -> Iterator[Gates]:
    """Multiply a ones-gate (requires_grad) into the down-projection input of the units' layers.

    With `batch` = B each example gets its own gate row, (B, D_in), so one backward gives
    per-example values ``<a_b, dL/da_b>`` (every forward must then have batch size B).

    Example:
        >>> import torch
        >>> from dit_prune.models import new_dit
        >>> model = new_dit("tiny", 10, 8, 1).eval()
        >>> x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
        >>> units = [Unit("head", 0, 1), Unit("neuron", 2, 5)]
        >>> with gates(model, units) as g:
        ...     loss = model(x, timestep=t, class_labels=y).sample.pow(2).mean()
        ...     grads = torch.autograd.grad(loss, g.tensors)
        >>> g.unit_sums(grads).shape  # (U,) = sum over each unit's channels of <a, dL/da>
        torch.Size([2])
    """
    units = list(units)
    record = Gates(unit_slots(model, units), [], units)
    handles = []
    try:
        for slot in record.slots:
            weight = slot.layer.weight
            shape = (slot.layer.in_features,) if batch is None else (batch, slot.layer.in_features)
            gate = torch.ones(shape, device=weight.device, dtype=weight.dtype,
                              requires_grad=True)  # (D_in,) or (B, D_in)
            record.tensors.append(gate)
            handles.append(slot.layer.register_forward_pre_hook(_scale_input(gate)))
        yield record
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def ablate_each(model: nn.Module, units: Sequence[Unit], scale: float = 0.0) -> Iterator[None]:
    """Batched single-unit ablation: the batch is ``len(units)`` stacked replicas of B examples,
    and replica r has only ``units[r]`` multiplied by `scale`.

    Example:
        >>> import torch
        >>> from dit_prune.models import new_dit
        >>> model = new_dit("tiny", 10, 8, 1).eval()
        >>> x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
        >>> units = [Unit("head", 0, 1), Unit("neuron", 2, 5)]
        >>> with ablate_each(model, units):
        ...     out = model(x.repeat(2, 1, 1, 1), timestep=t.repeat(2),
        ...                 class_labels=y.repeat(2)).sample  # (R * B, C, H, W)
        >>> with ablate(model, units[1:]):
        ...     ref = model(x, timestep=t, class_labels=y).sample
        >>> torch.allclose(out[2:], ref, atol=1e-5)
        True
    """
    units = list(units)
    replicas = len(units)
    handles = []
    try:
        for slot in unit_slots(model, units):
            weight = slot.layer.weight
            mask = torch.ones(replicas, slot.layer.in_features, device=weight.device)  # (R, D_in)
            for r, unit in enumerate(units):
                if unit in slot.units:
                    cols = slot.columns[slot.units.index(unit)]
                    mask[r, cols.start : cols.stop] = scale
            handles.append(slot.layer.register_forward_pre_hook(_scale_replicas(mask)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _scale_replicas(mask: torch.Tensor):
    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]  # (R * B, T, D_in)
        replicas = mask.shape[0]
        if x.shape[0] % replicas:
            raise ValueError(f"batch {x.shape[0]} is not a multiple of {replicas} replicas")
        shaped = x.reshape(replicas, x.shape[0] // replicas, *x.shape[1:])  # (R, B, T, D_in)
        view = mask.to(dtype=x.dtype).reshape(replicas, 1, *([1] * (x.ndim - 2)), -1)
        return ((shaped * view).reshape(x.shape),) + tuple(args[1:])

    return hook


@contextmanager
def observe(
    model: nn.Module,
    units: Sequence[Unit],
    callback: Callable[[int, LayerSlot, torch.Tensor], None],
) -> Iterator[list[LayerSlot]]:
    """Call ``callback(slot_index, slot, x)`` with each hooked down-projection's input
    x (B, T, D_in) on every forward, so statistics can be reduced on the fly without storing
    activations. Yields the slots (layer, units, columns) in callback order.

    Example:
        >>> import torch
        >>> from dit_prune.models import new_dit
        >>> model = new_dit("tiny", 10, 8, 1).eval()
        >>> seen = []
        >>> with observe(model, [Unit("neuron", 1, 3)], lambda s, slot, x: seen.append(x.shape)):
        ...     _ = model(torch.randn(2, 1, 8, 8), timestep=torch.tensor([1, 2]),
        ...               class_labels=torch.tensor([0, 1]))
        >>> seen
        [torch.Size([2, 16, 512])]
    """
    slots = unit_slots(model, units)
    handles = []
    try:
        for s, slot in enumerate(slots):
            handles.append(slot.layer.register_forward_pre_hook(_observer(s, slot, callback)))
        yield slots
    finally:
        for handle in handles:
            handle.remove()


def _observer(index: int, slot: LayerSlot, callback: Callable):
    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        callback(index, slot, args[0].detach())  # (B, T, D_in)

    return hook
