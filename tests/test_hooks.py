"""Hooks: ablate / capture / gates / ablate_each / observe (docs/definitions.md#units)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dit_prune.hooks import ablate, ablate_each, capture, gates, observe
from dit_prune.models import new_dit
from dit_prune.units import Unit


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    model = new_dit("tiny", 10, 8, 1).eval()
    with torch.no_grad():  # fresh DiTs zero their adaLN gates; make every unit matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 8, 8, generator=gen)  # (B, C, H, W)
    return x, torch.tensor([5, 300, 900]), torch.tensor([1, 4, 10])


def _run(model: nn.Module, batch) -> torch.Tensor:
    x, t, y = batch
    return model(x, timestep=t, class_labels=y).sample


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_ablate_head_equals_zeroed_columns(tiny, batch):
    unit = Unit("head", 2, 1)
    with torch.no_grad(), ablate(tiny, [unit]):
        hooked = _run(tiny, batch)
    layer = tiny.transformer_blocks[2].attn1.to_out[0]
    saved = layer.weight.detach().clone()
    try:
        with torch.no_grad():
            layer.weight[:, 32:64] = 0
            manual = _run(tiny, batch)
    finally:
        with torch.no_grad():
            layer.weight.copy_(saved)
    assert torch.allclose(hooked, manual, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(hooked, _run(tiny, batch), atol=1e-4)


def test_ablate_neuron_with_scale_equals_scaled_column(tiny, batch):
    unit = Unit("neuron", 1, 17)
    with torch.no_grad(), ablate(tiny, [unit], scale=0.5):
        hooked = _run(tiny, batch)
    layer = tiny.transformer_blocks[1].ff.net[2]
    saved = layer.weight.detach().clone()
    try:
        with torch.no_grad():
            layer.weight[:, 17] *= 0.5
            manual = _run(tiny, batch)
    finally:
        with torch.no_grad():
            layer.weight.copy_(saved)
    assert torch.allclose(hooked, manual, atol=1e-6)


@pytest.mark.parametrize("manager", ["ablate", "capture", "gates", "ablate_each", "observe"])
def test_hooks_removed_even_on_error(tiny, manager):
    units = [Unit("head", 0, 0), Unit("neuron", 3, 1)]
    contexts = {
        "ablate": lambda: ablate(tiny, units),
        "capture": lambda: capture(tiny, units, grads=True),
        "gates": lambda: gates(tiny, units),
        "ablate_each": lambda: ablate_each(tiny, units),
        "observe": lambda: observe(tiny, units, lambda *a: None),
    }
    before = _hook_count(tiny)
    with pytest.raises(RuntimeError, match="boom"), contexts[manager]():
        assert _hook_count(tiny) > before
        raise RuntimeError("boom")
    assert _hook_count(tiny) == before


def test_capture_shapes_and_grads(tiny, batch):
    units = [Unit("head", 1, 3), Unit("neuron", 0, 9)]
    x, t, y = batch
    x = x.clone().requires_grad_(True)
    with capture(tiny, units, grads=True) as record:
        out = tiny(x, timestep=t, class_labels=y).sample
        out.pow(2).sum().backward()
    head, = record.activations(units[0])
    neuron, = record.activations(units[1])
    assert head.shape == (3, 16, 32) and neuron.shape == (3, 16, 1)
    head_grad, = record.gradients(units[0])
    assert head_grad.shape == head.shape and head_grad.abs().sum() > 0
    with pytest.raises(KeyError):
        record.activations(Unit("head", 0, 0))


def test_gates_give_activation_times_gradient(tiny, batch):
    units = [Unit("head", 1, 3), Unit("neuron", 0, 9), Unit("head", 1, 0)]
    x, t, y = batch
    with gates(tiny, units) as g:
        out = tiny(x, timestep=t, class_labels=y).sample
        grads = torch.autograd.grad(out.pow(2).sum(), g.tensors)
    per_unit = g.unit_sums(grads)  # (U,)
    with torch.no_grad():
        assert torch.allclose(out, _run(tiny, batch), atol=1e-6)  # gates at 1 change nothing
    x_req = x.clone().requires_grad_(True)
    with capture(tiny, units, grads=True) as record:
        tiny(x_req, timestep=t, class_labels=y).sample.pow(2).sum().backward()
    for i, unit in enumerate(units):
        expected = (record.activations(unit)[0] * record.gradients(unit)[0]).sum()
        assert torch.allclose(per_unit[i], expected, rtol=1e-4, atol=1e-6)


def test_ablate_each_matches_ablate(tiny, batch):
    units = [Unit("head", 0, 2), Unit("neuron", 2, 100), Unit("head", 3, 0)]
    x, t, y = batch
    with torch.no_grad(), ablate_each(tiny, units):
        out = tiny(x.repeat(3, 1, 1, 1), timestep=t.repeat(3), class_labels=y.repeat(3)).sample
    for r, unit in enumerate(units):
        with torch.no_grad(), ablate(tiny, [unit]):
            ref = _run(tiny, batch)
        assert torch.allclose(out[3 * r : 3 * r + 3], ref, atol=1e-5)


def test_observe_sees_every_forward(tiny, batch):
    seen: list[tuple[int, tuple[int, ...]]] = []
    units = [Unit("neuron", 2, 0), Unit("head", 0, 1)]
    with torch.no_grad(), observe(tiny, units, lambda s, slot, x: seen.append((s, x.shape))):
        _run(tiny, batch)
        _run(tiny, batch)
    assert sorted(seen) == [(0, (3, 16, 128))] * 2 + [(1, (3, 16, 512))] * 2


def test_per_example_gates_sum_to_shared_gates(tiny, batch):
    units = [Unit("head", 2, 0), Unit("neuron", 1, 3)]
    x, t, y = batch
    with gates(tiny, units) as shared:
        grads = torch.autograd.grad(_run(tiny, batch).pow(2).sum(), shared.tensors)
    with gates(tiny, units, batch=len(x)) as each:
        per_example = torch.autograd.grad(_run(tiny, batch).pow(2).sum(), each.tensors)
    rows = each.unit_sums(per_example)  # (B, U)
    assert rows.shape == (3, 2)
    assert torch.allclose(rows.sum(0), shared.unit_sums(grads), rtol=1e-4, atol=1e-6)
