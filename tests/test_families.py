"""Every supported family: prune == ablate on random unit sets, exact parameter drop, bit-exact
save/load, pruning again in the original numbering; legacy `Transformer2DModel` configs and
instances; GEGLU/SwiGLU neurons; PixArt without `caption_channels`; the forward check."""

from __future__ import annotations

import copy
import json
import random

import diffusers
import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from safetensors.torch import save_file

from dit_prune.checkpoint import load_dit
from dit_prune.cli import main
from dit_prune.errors import DitPruneError
from dit_prune.hooks import ablate, capture, gates
from dit_prune.pipelines.tiny import tiny_vae
from dit_prune.pruning import prune_units, save_pruned
from dit_prune.pruning.inputs import example_inputs
from dit_prune.structure import read_structure
from dit_prune.units import Unit, adapter_for, enumerate_units

# diffusers' own deprecation notice, raised by every Transformer2DModel forward
pytestmark = pytest.mark.filterwarnings("ignore:.*Transformer2DModelOutput.*:FutureWarning")
HEADS, HEAD_DIM, LAYERS = 3, 4, 2
DIT = dict(num_layers=LAYERS, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
           in_channels=2, out_channels=2, sample_size=4, patch_size=2, num_embeds_ada_norm=3,
           norm_num_groups=1)
PIXART = dict(num_layers=LAYERS, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
              in_channels=4, out_channels=8, sample_size=4, patch_size=2, cross_attention_dim=12,
              norm_num_groups=1)
LEGACY_DIT = dict(DIT, norm_type="ada_norm_zero", activation_fn="gelu-approximate",
                  norm_elementwise_affine=False, attention_bias=True)
LEGACY_PIXART = dict(PIXART, norm_type="ada_norm_single", caption_channels=10,
                     num_embeds_ada_norm=1000, norm_elementwise_affine=False, attention_bias=True)

FAMILIES = {
    "dit": lambda: diffusers.DiTTransformer2DModel(**DIT),
    "dit-geglu": lambda: diffusers.DiTTransformer2DModel(**DIT, activation_fn="geglu"),
    "dit-swiglu": lambda: diffusers.DiTTransformer2DModel(**DIT, activation_fn="swiglu"),
    "dit-legacy": lambda: diffusers.Transformer2DModel(**LEGACY_DIT),
    "pixart": lambda: diffusers.PixArtTransformer2DModel(**PIXART, caption_channels=10),
    "pixart-no-caption": lambda: diffusers.PixArtTransformer2DModel(**PIXART),
    "pixart-legacy": lambda: diffusers.Transformer2DModel(**LEGACY_PIXART),
}


def build(family: str, seed: int) -> torch.nn.Module:
    """A tiny model of `family`, every parameter random (scaled by 1/sqrt(fan-in))."""
    torch.manual_seed(seed)
    model = FAMILIES[family]()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = p[0].numel() ** -0.5 if p.ndim >= 2 else 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    for module in model.modules():  # label dropout off, as every DiT of ours
        if type(module).__name__ == "LabelEmbedding":
            module.dropout_prob = 0.0
    return model.eval()


def inputs(model: torch.nn.Module) -> dict:
    data = example_inputs(model, batch=3, seed=7)
    data["timestep"] = torch.tensor([1, 400, 999])  # (B,)
    if "class_labels" in data:
        data["class_labels"] = torch.tensor([0, 2, 3])  # (B,) null class included
    return data


@torch.no_grad()
def forward(model: torch.nn.Module, data: dict) -> torch.Tensor:
    return model(**data).sample  # (B, C_out, H, W)


def anatomy_drop(model: torch.nn.Module, units: list[Unit]) -> int:
    """Parameters `units` hold, read off the diffusers layers (GLU proj rows counted twice)."""
    total = 0
    for u in units:
        block = model.transformer_blocks[u.block]
        if u.kind == "neuron":
            act, down = block.ff.net[0], block.ff.net[2]
            rows = 2 if type(act).__name__ in ("GEGLU", "SwiGLU") else 1
            total += rows * (act.proj.in_features + (act.proj.bias is not None))
            total += down.out_features
        else:
            attn = block.attn1 if u.kind == "head" else block.attn2
            d = attn.inner_dim // attn.heads
            ups = (attn.to_q, attn.to_k, attn.to_v)
            total += d * sum(up.in_features + (up.bias is not None) for up in ups)
            total += d * attn.to_out[0].out_features
    return total


def random_units(model: torch.nn.Module, rnd: random.Random) -> list[Unit]:
    """A random set of present units, every block keeping at least one of each kind."""
    present = enumerate_units(model, adapter_for(model).kinds)
    chosen: list[Unit] = []
    for key in sorted({(u.block, u.kind) for u in present}):
        pool = [u for u in present if (u.block, u.kind) == key]
        chosen += rnd.sample(pool, rnd.randint(0, len(pool) - 1))
    return chosen or [present[0]]


def prune_and_compare(model: torch.nn.Module, units: list[Unit], data: dict) -> None:
    with ablate(model, units):
        reference = forward(model, data)
    before = sum(p.numel() for p in model.parameters())
    drop = anatomy_drop(model, units)
    plan = prune_units(model, units)
    assert before - sum(p.numel() for p in model.parameters()) == drop
    assert plan.params_before - plan.params_after == drop
    torch.testing.assert_close(forward(model, data), reference, atol=1e-4, rtol=0)
    return plan


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prune_equals_ablate_saves_and_prunes_again(family, seed, tmp_path):
    model = build(family, seed)
    unpruned = copy.deepcopy(model)
    data = inputs(model)
    rnd = random.Random(1000 * seed + len(family))
    first = random_units(model, rnd)
    plan = prune_and_compare(model, first, data)

    save_pruned(model, tmp_path / "pruned", plan=plan)
    loaded = load_dit(tmp_path / "pruned").model
    assert type(loaded).__name__ == plan.model_class != "Transformer2DModel"
    saved, back = model.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys()
    assert all(torch.equal(saved[k], back[k]) for k in saved)
    assert torch.equal(forward(loaded, data), forward(model, data))

    # again, on the reloaded model, in the original numbering
    second = random_units(loaded, rnd)
    assert not set(second) & set(first)
    prune_and_compare(loaded, second, data)
    assert not set(first + second) & set(enumerate_units(loaded, adapter_for(loaded).kinds))
    with ablate(unpruned, first + second):
        torch.testing.assert_close(forward(loaded, data), forward(unpruned, data), atol=1e-4,
                                   rtol=0)


@pytest.mark.parametrize("family", ["dit-geglu", "dit-swiglu"])
def test_glu_neuron_is_a_pair_of_proj_rows(family):
    """Ablating, capturing and gating neuron j act on value row j and gate row inner + j."""
    model = build(family, 0)
    data = inputs(model)
    block = model.transformer_blocks[1]
    proj, inner = block.ff.net[0].proj, block.ff.net[2].in_features
    unit = Unit("neuron", 1, 5)
    outputs: list[torch.Tensor] = []
    handle = proj.register_forward_hook(lambda _m, _a, out: outputs.append(out.detach()))
    with capture(model, [unit]) as record:
        forward(model, data)
    handle.remove()
    value, gate = outputs[0][..., 5], outputs[0][..., inner + 5]  # (B, T)
    act = F.gelu(gate) if family == "dit-geglu" else F.silu(gate)
    torch.testing.assert_close(record.activations(unit)[0][..., 0], value * act)

    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for row in (5, inner + 5):
            zeroed.transformer_blocks[1].ff.net[0].proj.weight[row] = 0
            zeroed.transformer_blocks[1].ff.net[0].proj.bias[row] = 0
    with ablate(model, [unit]):
        torch.testing.assert_close(forward(model, data), forward(zeroed, data), atol=1e-6,
                                   rtol=0)
    with gates(model, [unit, Unit("head", 0, 1)]) as g:
        loss = model(**data).sample.pow(2).mean()
        grads = torch.autograd.grad(loss, g.tensors)
    assert g.unit_sums(grads).shape == (2,)


def test_failed_forward_check_leaves_the_model_as_it_was(monkeypatch):
    """Pruning the wrong columns of the down-projection is caught by the forward check."""
    model = build("dit-geglu", 0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    structure = read_structure(model)
    data = inputs(model)
    expected = forward(model, data)
    right = tp.prune_linear_in_channels

    def wrong(layer, idxs):
        return right(layer, [(i + 1) % layer.in_features for i in idxs])

    monkeypatch.setattr(tp, "prune_linear_in_channels", wrong)
    units = [Unit("head", 0, 1), Unit("neuron", 1, 3)]
    with pytest.raises(DitPruneError, match="disagrees with ablation.*left unchanged") as info:
        prune_units(model, units)
    assert "\n" not in str(info.value)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert read_structure(model) == structure and not hasattr(
        model.transformer_blocks[0], "dit_prune_kept")
    assert model.transformer_blocks[0].attn1.heads == HEADS
    assert torch.equal(forward(model, data), expected)
    monkeypatch.undo()
    prune_and_compare(model, units, data)


def test_pixart_without_caption_channels_prunes():
    model = build("pixart-no-caption", 3)
    assert model.caption_projection is None
    units = [Unit("head", 0, 2), Unit("cross_head", 1, 0), Unit("neuron", 1, 7)]
    prune_and_compare(model, units, inputs(model))


@pytest.mark.parametrize("family", ["dit-legacy", "pixart-legacy"])
def test_legacy_config_loads_as_diffusers_maps_it(family, tmp_path):
    legacy = build(family, 0)
    legacy.save_pretrained(tmp_path / "hub", safe_serialization=True)
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["_class_name"] == "Transformer2DModel"
    ours = load_dit(tmp_path / "hub")
    theirs = diffusers.Transformer2DModel.from_pretrained(tmp_path / "hub").eval()
    assert type(ours.model) is type(theirs) and ours.meta.model_class == type(theirs).__name__
    data = inputs(legacy)
    assert torch.equal(forward(ours.model, data), forward(legacy, data))
    assert torch.equal(forward(theirs, data), forward(legacy, data))


def test_legacy_config_diffusers_does_not_map_is_refused(tmp_path):
    legacy = build("dit-legacy", 0)
    legacy.save_pretrained(tmp_path / "hub", safe_serialization=True)
    config_file = tmp_path / "hub" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "norm_type": "layer_norm"}))
    with pytest.raises(DitPruneError, match="Transformer2DModel' with norm_type 'layer_norm'"):
        load_dit(tmp_path / "hub")


def test_prune_cli_on_a_hub_layout_dit_pipeline(tmp_path, capsys):
    """A tiny pipeline in the layout of facebook/DiT-XL-2-256 (`Transformer2DModel` config,
    model_index.json, scheduler/, vae/) is pruned by `dit-prune prune` and reloads."""
    legacy = diffusers.Transformer2DModel(**{**LEGACY_DIT, "in_channels": 4, "out_channels": 8,
                                             "sample_size": 8, "num_embeds_ada_norm": 1000})
    pipe = diffusers.DiTPipeline(transformer=legacy.eval(), vae=tiny_vae(),
                                 scheduler=diffusers.DDIMScheduler())
    hub = tmp_path / "DiT-XL-2-256"
    pipe.save_pretrained(hub, safe_serialization=True)
    index = json.loads((hub / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "Transformer2DModel"]
    assert {p.name for p in hub.iterdir()} >= {"model_index.json", "transformer", "scheduler",
                                                "vae"}
    base = load_dit(hub).model
    units = enumerate_units(base)
    scores = tmp_path / "scores"
    scores.mkdir()
    values = torch.linspace(1.0, 0.0, len(units), dtype=torch.float64)  # (U,)
    save_file({"scores": values}, str(scores / "scores.safetensors"))
    (scores / "scores.json").write_text(json.dumps({"units": [u.to_json() for u in units],
                                                    "scorer": "handwritten", "model": {
                                                        "weights_sha256": load_dit(hub).meta
                                                        .weights_sha256}}))
    out = tmp_path / "pruned"
    code = main(["prune", str(hub), "--scores", str(scores), "--budget", "1",
                 "--budget-mode", "both", "--out", str(out), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    plan = json.loads((out / "plan.json").read_text())
    assert plan["model_class"] == "DiTTransformer2DModel"
    assert plan["counts"] == {"head": 1, "neuron": 1}
    pruned = load_dit(out).model
    removed = [Unit.from_json(u) for u in plan["removed"]]
    data = inputs(base)
    with ablate(base, removed):
        torch.testing.assert_close(forward(pruned, data), forward(base, data), atol=1e-4,
                                   rtol=0)


def test_legacy_transformer_in_a_pipeline_prunes_saves_and_reloads(tmp_path):
    from dit_prune.pipelines import prune_pipeline
    from dit_prune.pipelines.io import load_pruned_pipeline, save_pipeline

    legacy = build("dit-legacy", 0)
    pipe = diffusers.DiTPipeline(transformer=legacy, vae=tiny_vae(latent_channels=2),
                                 scheduler=diffusers.DDIMScheduler())
    pruned = prune_pipeline(pipe, [Unit("head", 0, 1), Unit("neuron", 1, 3)])
    assert pruned.transformer.transformer_blocks[0].attn1.heads == HEADS - 1
    assert pipe.transformer.transformer_blocks[0].attn1.heads == HEADS  # the input is untouched
    save_pipeline(pruned, tmp_path / "pipe")
    back = load_pruned_pipeline(tmp_path / "pipe")
    assert type(back.transformer).__name__ == "DiTTransformer2DModel"

    def sample(p):
        return p(class_labels=[1], num_inference_steps=2, guidance_scale=1.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images

    assert (sample(pruned) == sample(back)).all()
