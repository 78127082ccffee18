"""Hooks on unit slices, always inside context managers that remove them (even on error).

`ablate` multiplies the named units' input channels of every down-projection site by `scale`
(`dit_prune.units.families` declares the sites of each family); `capture` records those input
channels (and, when asked, their gradients) per forward call; `gates` multiplies a ones-gate.

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
from dit_prune.units.adapters import channel_dim, in_channels, norm_width


@dataclass
class LayerSlot:
    """One down-projection site with the channels of the units hooked on it.

    A unit with several down sites (a joint head: image and text streams) appears in one slot
    per site. `dim` is the channel dimension of the layer's input (-1 for Linear, 1 for conv).
    """

    layer: nn.Module
    units: list[Unit]
    columns: list[range]  # aligned with units, in the layer's current numbering
    dim: int = -1

    @property
    def in_features(self) -> int:
        return in_channels(self.layer)


def unit_slots(model: nn.Module, units: Iterable[Unit]) -> list[LayerSlot]:
    """Group units by (block, kind, down site), with each unit's input-channel range."""
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
        for site, layer in adapter.modules(block, adapter.require(block, kind).downs):
            offset = adapter.down_offset(block, site)
            columns = [unit_columns(adapter, block, kind, position[u.index], offset)
                       for u in members]
            slots.append(LayerSlot(layer, members, columns, channel_dim(layer)))
    return slots


def _norm_rescalers(model: nn.Module, units: list[Unit]) -> list[tuple[nn.Module, torch.Tensor]]:
    """Norms spanning every head of a kind (RMSNorm across heads) with the 0/1 mask of the kept
    channels: removal slices such a norm, so exact ablation renormalises over the kept ones."""
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    found = []
    for (b, kind), positions in sorted(group_units(model, units).items()):
        block = blocks[b]
        gone = adapter.unit_channels(block, kind, positions)
        for norm in adapter.norm_modules(block, kind):
            mask = torch.ones(norm_width(norm))  # (N,)
            mask[gone] = 0.0
            found.append((norm, mask))
    return found


@contextmanager
def ablate(model: nn.Module, units: Iterable[Unit], scale: float = 0.0) -> Iterator[None]:
    """While inside, the named units' outputs are multiplied by `scale` (0 removes them).

    Every down site of a unit is scaled (a joint head's image and text streams). With
    `scale=0`, a norm that spans every head (Sana's `rms_norm_across_heads`) is computed over
    the kept heads only, as in the pruned model: its input is masked and multiplied by
    sqrt(N / N_kept) and its output divided by that factor, which is exact for RMSNorm.
    """
    units = list(units)
    handles = []
    try:
        for slot in unit_slots(model, units):
            mask = torch.ones(slot.in_features, device=slot.layer.weight.device)  # (D_in,)
            for cols in slot.columns:
                mask[cols.start : cols.stop] = scale
            handles.append(slot.layer.register_forward_pre_hook(_scale_input(mask, slot.dim)))
        if scale == 0:
            for norm, keep in _norm_rescalers(model, units):
                factor = float(keep.numel() / keep.sum()) ** 0.5
                keep = keep.to(next(norm.parameters(), keep).device)
                handles.append(norm.register_forward_pre_hook(_scale_input(keep * factor, -1)))
                handles.append(norm.register_forward_hook(_divide_output(factor)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _divide_output(factor: float):
    def hook(module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            return (out - bias) / factor + bias  # (..., N)
        return out / factor  # (..., N)

    return hook


def _scale_input(mask: torch.Tensor, dim: int = -1):
    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]  # (B, T, D_in) or (B, D_in, H, W) for conv (dim 1)
        return (x * _broadcast(mask.to(dtype=x.dtype), x, dim),) + tuple(args[1:])

    return hook


def _broadcast(scale: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    """(D_in,) or (B, D_in) scale shaped to multiply x along channel dimension `dim`."""
    axis = dim % x.ndim
    trailing = [1] * (x.ndim - axis - 1)
    if scale.ndim == 2:  # per example
        return scale.reshape(scale.shape[0], *([1] * (axis - 1)), scale.shape[1], *trailing)
    return scale.reshape(scale.shape[0], *trailing)


@dataclass
class Capture:
    """Per-layer inputs of the hooked down-projections, one entry per forward call."""

    slots: list[LayerSlot]
    inputs: list[list[torch.Tensor]] = field(default_factory=list)  # [slot][call] (B, T, D_in)
    # or (B, D_in, H, W) at a conv site (LayerSlot.dim == 1)
    grads: list[list[torch.Tensor]] = field(default_factory=list)  # same layout

    def _find(self, unit: Unit) -> list[tuple[int, range]]:
        found = [(s, slot.columns[slot.units.index(unit)])
                 for s, slot in enumerate(self.slots) if unit in slot.units]
        if not found:
            raise KeyError(f"{unit} was not captured")
        return found

    def activations(self, unit: Unit) -> list[torch.Tensor]:
        """The unit's input slice per forward call: [(B, T, width)] (conv sites: (B, width,
        H, W)); a unit with several down sites gives every call of its first site, then of
        the next."""
        return [x.narrow(self.slots[s].dim, cols.start, len(cols))
                for s, cols in self._find(unit) for x in self.inputs[s]]

    def gradients(self, unit: Unit) -> list[torch.Tensor]:
        """Gradient of the loss w.r.t. the unit's input slice per call (needs grads=True)."""
        return [g.narrow(self.slots[s].dim, cols.start, len(cols))
                for s, cols in self._find(unit) for g in self.grads[s]]


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
        x = args[0]  # (B, T, D_in), or (B, D_in, H, W) at a conv site
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
        flat = {unit: i for i, unit in enumerate(dict.fromkeys(self.units))}
        total: torch.Tensor | None = None
        for slot, values in zip(self.slots, per_slot, strict=True):
            index = slot_column_index(slot).to(values.device)  # (U_s, width)
            sums = values[..., index].sum(-1)  # (..., U_s)
            if total is None:
                total = sums.new_zeros(*sums.shape[:-1], len(flat))  # (..., U_unique)
            members = torch.tensor([flat[u] for u in slot.units], device=values.device)
            total = total.index_add(-1, members, sums)  # a unit sums over all its sites
        gather = torch.tensor([flat[unit] for unit in self.units], dtype=torch.long)  # (U,)
        return total[..., gather.to(total.device)]  # (..., U)


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
            shape = (slot.in_features,) if batch is None else (batch, slot.in_features)
            gate = torch.ones(shape, device=weight.device, dtype=weight.dtype,
                              requires_grad=True)  # (D_in,) or (B, D_in)
            record.tensors.append(gate)
            handles.append(slot.layer.register_forward_pre_hook(_scale_input(gate, slot.dim)))
        yield record
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def ablate_each(model: nn.Module, units: Sequence[Unit], scale: float = 0.0) -> Iterator[None]:
    """Batched single-unit ablation: the batch is ``len(units)`` stacked replicas of B examples,
    and replica r has only ``units[r]`` multiplied by `scale` (as `ablate` would, norms across
    heads included).

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
            mask = torch.ones(replicas, slot.in_features, device=weight.device)  # (R, D_in)
            for r, unit in enumerate(units):
                if unit in slot.units:
                    cols = slot.columns[slot.units.index(unit)]
                    mask[r, cols.start : cols.stop] = scale
            handles.append(slot.layer.register_forward_pre_hook(_scale_replicas(mask, slot.dim)))
        if scale == 0:  # norms across heads renormalise over the kept heads, per replica
            for norm, (masks, factors) in _replica_rescalers(model, units).items():
                handles.append(norm.register_forward_pre_hook(_scale_replicas(masks, -1)))
                handles.append(norm.register_forward_hook(_divide_replicas(factors)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _replica_rescalers(
    model: nn.Module, units: list[Unit]
) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Per norm spanning every head: (R, N) input masks times sqrt(N / N_kept), and (R,)
    output divisors, ones for the replicas whose unit does not touch it."""
    found: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
    for r, unit in enumerate(units):
        for norm, keep in _norm_rescalers(model, [unit]):
            if norm not in found:
                found[norm] = (torch.ones(len(units), keep.numel()), torch.ones(len(units)))
            factor = float(keep.numel() / keep.sum()) ** 0.5
            found[norm][0][r] = keep * factor
            found[norm][1][r] = factor
    return found


def _divide_replicas(factors: torch.Tensor):
    def hook(module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        shaped = out.reshape(len(factors), -1, *out.shape[1:])  # (R, B, ..., N)
        view = factors.to(out).reshape(len(factors), *([1] * (shaped.ndim - 1)))
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            return ((shaped - bias) / view + bias).reshape(out.shape)
        return (shaped / view).reshape(out.shape)

    return hook


def _scale_replicas(mask: torch.Tensor, dim: int = -1):
    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]  # (R * B, T, D_in), or (R * B, D_in, H, W) for conv
        replicas = mask.shape[0]
        if x.shape[0] % replicas:
            raise ValueError(f"batch {x.shape[0]} is not a multiple of {replicas} replicas")
        shaped = x.reshape(replicas, x.shape[0] // replicas, *x.shape[1:])  # (R, B, ...)
        axis = dim % x.ndim
        view = mask.to(dtype=x.dtype).reshape(
            replicas, *([1] * axis), mask.shape[1], *([1] * (x.ndim - axis - 1)))
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
    activations. Yields the slots (layer, units, columns) in callback order. At a conv site
    (Sana's GLUMBConv `conv_point`, `slot.dim == 1`) x is (B, D_in, H, W): callbacks must read
    channels along `slot.dim`. A unit with several down sites is seen once per site.

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
        callback(index, slot, args[0].detach())  # (B, T, D_in) or conv (B, D_in, H, W)

    return hook
