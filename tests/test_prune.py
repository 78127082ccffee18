"""Structural pruning equals ablation; the pruned-model format round-trips bit-exactly."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel
from hypothesis import given, settings
from hypothesis import strategies as st

from dit_prune.checkpoint import load_dit
from dit_prune.errors import DitPruneError
from dit_prune.hooks import ablate
from dit_prune.models import disable_block_label_dropout
from dit_prune.pruning import PrunePlan, distill, finetune, load_pruned, prune_units, save_pruned
from dit_prune.pruning.inputs import example_inputs
from dit_prune.units import Unit, adapter_for, enumerate_units


def small_dit(layers=2, heads=4, head_dim=8, patch=2, size=4, channels=1, sigma=False,
              classes=3, seed=0) -> DiTTransformer2DModel:
    """A small class-conditional DiT with every weight random (no adaLN-zero init)."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_layers=layers, num_attention_heads=heads, attention_head_dim=head_dim,
        in_channels=channels, out_channels=2 * channels if sigma else channels,
        sample_size=size, patch_size=patch, num_embeds_ada_norm=classes, norm_num_groups=1,
    )
    disable_block_label_dropout(model)
    return randomize(model, seed)


def tiny_pixart(seed=0) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
        num_layers=2, cross_attention_dim=16, sample_size=8, caption_channels=12,
        norm_num_groups=1,
    )
    return randomize(model, seed)


def randomize(model, seed):
    """Every parameter random (the zero-initialised adaLN and output layers made live), scaled
    by 1/sqrt(fan-in) so that activations stay O(1) and float32 rounding stays far below 1e-5."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = p[0].numel() ** -0.5 if p.ndim >= 2 else 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def inputs(model, batch=3, seed=1):
    data = example_inputs(model, batch=batch, seed=seed)
    data["timestep"] = torch.tensor([1, 400, 999][:batch])  # (B,)
    if "class_labels" in data:
        classes = int(model.config.num_embeds_ada_norm)
        data["class_labels"] = torch.arange(batch) % (classes + 1)  # (B,) null class included
    return data


@torch.no_grad()
def forward(model, data):
    return model(**data).sample  # (B, C_out, H, W)


def expected_drop(model, units) -> int:
    """Parameters removed by `units`, from the layer widths (weights and biases)."""
    adapter = adapter_for(model)
    total = 0
    for u in units:
        block = adapter.blocks(model)[u.block]
        if u.kind == "neuron":
            up, down = block.ff.net[0].proj, block.ff.net[2]
            total += up.in_features + (up.bias is not None) + down.out_features
        else:
            attn = block.attn1 if u.kind == "head" else block.attn2
            d = attn.inner_dim // attn.heads
            ups = (attn.to_q, attn.to_k, attn.to_v)
            total += d * (sum(layer.in_features for layer in ups) + attn.to_out[0].out_features)
            total += d * sum(layer.bias is not None for layer in ups)
    return total


def check_prune_equals_ablate(model, units, atol=1e-5):
    data = inputs(model)
    with ablate(model, units):
        reference = forward(model, data)
    before = sum(p.numel() for p in model.parameters())
    drop = expected_drop(model, units)
    plan = prune_units(model, units)
    after = sum(p.numel() for p in model.parameters())
    assert before - after == drop == plan.params_before - plan.params_after
    torch.testing.assert_close(forward(model, data), reference, atol=atol, rtol=1e-5)
    return plan


@st.composite
def configs_and_units(draw):
    heads = draw(st.integers(1, 4))
    patch = draw(st.sampled_from([1, 2]))
    config = dict(
        layers=draw(st.integers(1, 3)), heads=heads, head_dim=draw(st.sampled_from([4, 8, 12, 16])),
        patch=patch, size=patch * draw(st.integers(1, 3)), channels=draw(st.integers(1, 3)),
        sigma=draw(st.booleans()), classes=draw(st.integers(1, 12)), seed=draw(st.integers(0, 99)),
    )
    rnd = random.Random(draw(st.integers(0, 2**16)))
    ff = 4 * heads * config["head_dim"]
    units = []
    for b in range(config["layers"]):
        units += [Unit("head", b, i) for i in rnd.sample(range(heads), rnd.randint(0, heads - 1))]
        share = rnd.choice([0.0, 0.1, 0.5, 0.97])
        units += [Unit("neuron", b, i) for i in rnd.sample(range(ff), int(share * (ff - 1)))]
    return config, units


@settings(max_examples=int(os.environ.get("PRUNE_EXAMPLES", 25)), deadline=None)
@given(configs_and_units())
def test_pruned_output_equals_ablation(case):
    config, units = case
    model = small_dit(**config)
    plan = check_prune_equals_ablate(model, units)
    assert list(plan.removed) == sorted(units)
    survivors = set(enumerate_units(model))
    assert not survivors & set(units)
    assert len(survivors) + len(units) == len(enumerate_units(small_dit(**config)))


def test_ablation_is_not_trivial():
    model = small_dit()
    data = inputs(model)
    with ablate(model, [Unit("head", 0, 1)]):
        ablated = forward(model, data)
    assert (ablated - forward(model, data)).abs().max() > 1e-3


def test_pixart_heads_neurons_and_cross_heads():
    model = tiny_pixart()
    units = [Unit("head", 0, 1), Unit("cross_head", 0, 0), Unit("cross_head", 1, 1),
             Unit("neuron", 1, 3), Unit("neuron", 1, 40)]
    plan = check_prune_equals_ablate(model, units)
    assert plan.counts == {"cross_head": 2, "head": 1, "neuron": 2}
    assert model.transformer_blocks[0].attn2.heads == 1
    assert model.transformer_blocks[0].attn2.inner_kv_dim == 8


def test_residual_stream_is_untouched():
    model = small_dit(layers=2)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    prune_units(model, [Unit("head", 0, 0), Unit("neuron", 1, 5)])
    unit_layers = ("attn1.to_", "ff.net.")
    for name, p in model.named_parameters():
        if not any(part in name for part in unit_layers):
            assert p.shape == shapes[name], name


def test_iterative_pruning_keeps_original_numbering():
    model, reference_model = small_dit(layers=2), small_dit(layers=2)
    first = [Unit("head", 0, 1), Unit("neuron", 1, 3)]
    second = [Unit("head", 0, 3), Unit("neuron", 1, 7), Unit("head", 1, 0)]
    data = inputs(model)
    with ablate(reference_model, first + second):
        reference = forward(reference_model, data)
    prune_units(model, first)
    plan = prune_units(model, second)
    torch.testing.assert_close(forward(model, data), reference, atol=1e-5, rtol=1e-5)
    assert plan.kept["head"][0] == [0, 2]
    assert Unit("head", 0, 2) in enumerate_units(model)
    with pytest.raises(DitPruneError, match="does not exist"):
        prune_units(model, [Unit("head", 0, 1)])


def test_refuses_to_empty_a_block():
    model = small_dit(layers=2, heads=2)
    with pytest.raises(DitPruneError, match="every head of block 1") as info:
        prune_units(model, [Unit("head", 1, 0), Unit("head", 1, 1)])
    assert "\n" not in str(info.value)
    with pytest.raises(DitPruneError, match="every neuron of block 0"):
        prune_units(model, [Unit("neuron", 0, i) for i in range(64)])
    assert model.transformer_blocks[1].attn1.heads == 2  # nothing was changed


def test_nonexistent_unit_is_one_line_error():
    model = small_dit(layers=2)
    for unit in (Unit("head", 5, 0), Unit("head", 0, 9), Unit("cross_head", 0, 0)):
        with pytest.raises(DitPruneError) as info:
            prune_units(model, [unit])
        assert "\n" not in str(info.value)


def test_training_mode_and_grad_flags_are_kept():
    model = small_dit().train()
    model.pos_embed.requires_grad_(False)
    prune_units(model, [Unit("head", 0, 0)])
    assert model.training
    assert not model.pos_embed.proj.weight.requires_grad
    assert model.transformer_blocks[0].attn1.to_q.weight.requires_grad


def test_empty_plan_changes_nothing():
    model = small_dit()
    plan = prune_units(model, [])
    assert plan.removed == () and plan.params_before == plan.params_after


def test_plan_json_round_trip():
    plan = prune_units(small_dit(), [Unit("head", 0, 2), Unit("neuron", 1, 0)])
    assert PrunePlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    with pytest.raises(DitPruneError):
        PrunePlan.from_json({"removed": [["head", 0]]})


# ---- the pruned-model format -------------------------------------------------------------


@pytest.fixture()
def pruned_dir(tmp_path):
    model = small_dit(layers=2, sigma=True, channels=2)
    plan = prune_units(model, [Unit("head", 0, 1), Unit("head", 1, 3), Unit("neuron", 0, 9)])
    out = save_pruned(model, tmp_path / "pruned", plan=plan, base_hash="abc")
    return model, out


def test_round_trip_is_bit_exact_without_the_base(pruned_dir):
    model, out = pruned_dir
    (loaded, info) = load_pruned(out)
    reloaded = loaded.model
    saved, restored = model.state_dict(), reloaded.state_dict()
    assert saved.keys() == restored.keys()
    for key in saved:
        assert torch.equal(saved[key], restored[key]), key
    data = inputs(model)
    assert torch.equal(forward(model, data), forward(reloaded, data))
    assert info["base_sha256"] == "abc"
    assert info["removed"] == [["head", 0, 1], ["head", 1, 3], ["neuron", 0, 9]]
    assert enumerate_units(reloaded) == enumerate_units(model)
    assert (out / "plan.json").is_file() and not list(out.parent.glob(".pruned*"))


def test_refuses_non_empty_target(pruned_dir):
    model, out = pruned_dir
    with pytest.raises(DitPruneError, match="not empty"):
        save_pruned(model, out)
    save_pruned(model, out, overwrite=True)


def test_truncated_weights_is_one_line_error(pruned_dir):
    _, out = pruned_dir
    weights = out / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(DitPruneError, match="truncated") as info:
        load_dit(out)
    assert "\n" not in str(info.value)


def test_config_disagreeing_with_weights_is_one_line_error(pruned_dir):
    _, out = pruned_dir
    config_file = out / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config["dit_prune_structure"]["kept"]["head"][0] = [0, 1, 2, 3]  # weights have 3 heads
    config_file.write_text(json.dumps(config))
    with pytest.raises(DitPruneError, match="does not match") as info:
        load_dit(out)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad_unit", [["head", 0, 99], ["head", 7, 0], ["head", 0, 0]])
def test_plan_naming_a_nonexistent_unit_is_one_line_error(pruned_dir, bad_unit):
    _, out = pruned_dir
    plan_file = out / "plan.json"
    plan = json.loads(plan_file.read_text())
    plan["removed"].append(bad_unit)
    plan_file.write_text(json.dumps(plan))
    with pytest.raises(DitPruneError) as info:
        load_pruned(out)
    assert "\n" not in str(info.value)


# ---- recovery -----------------------------------------------------------------------------


def test_recovery_trains_the_pruned_model():
    model = small_dit(layers=1, heads=2, head_dim=4, classes=3)
    teacher = small_dit(layers=1, heads=2, head_dim=4, classes=3)
    prune_units(model, [Unit("head", 0, 0)])
    images = torch.rand(8, 1, 4, 4) * 2 - 1  # (N, C, H, W)
    labels = torch.arange(8) % 3  # (N,)
    before = model.transformer_blocks[0].attn1.to_q.weight.clone()
    tuned = finetune(model, images, labels, steps=2, batch_size=4, progress=False)
    assert len(tuned.losses) == 2 and tuned.model.transformer_blocks[0].attn1.heads == 1
    teacher.train()
    result = distill(tuned.model, teacher, images, None, steps=2, batch_size=4, progress=False)
    assert teacher.training and teacher.pos_embed.proj.weight.requires_grad  # left as it was
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert not torch.equal(before, result.model.transformer_blocks[0].attn1.to_q.weight)
    with pytest.raises(DitPruneError, match="empty"):
        distill(model, teacher, images, labels, t_min=800, t_max=700, progress=False)
