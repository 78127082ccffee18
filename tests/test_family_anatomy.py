"""Every diffusers transformer family of docs/families.md, as a tiny instance (configs in the
spirit of diffusers' own model tests): enumerate, ablate, prune == ablate on random unit sets,
exact parameter drop (from a site table written here, independent of the anatomy code),
ablation == zeroing the unit's value rows by hand, bit-exact save/load, pruning again in the
original numbering; grouped-query refusals; gates and capture on every site of a unit."""

from __future__ import annotations

import copy
import json
import random
import re

import diffusers
import pytest
import torch
import torch_pruning as tp

from dit_prune.checkpoint import load_dit
from dit_prune.errors import DitPruneError
from dit_prune.hooks import ablate, capture, gates
from dit_prune.pruning import prune_units, save_pruned
from dit_prune.pruning.inputs import example_inputs
from dit_prune.structure import read_structure
from dit_prune.units import Unit, adapter_for, enumerate_units

FAMILIES = {
    "sd3.5": lambda: diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=4,
        num_attention_heads=3, joint_attention_dim=12, caption_projection_dim=12,
        pooled_projection_dim=10, out_channels=4, pos_embed_max_size=16,
        dual_attention_layers=(0, 1), qk_norm="rms_norm"),
    "flux": lambda: diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=3, joint_attention_dim=12, pooled_projection_dim=10,
        guidance_embeds=True, axes_dims_rope=(2, 2, 4)),
    "qwenimage": lambda: diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=3, joint_attention_dim=16, axes_dims_rope=(4, 2, 2)),
    "sana": lambda: diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=3, attention_head_dim=4, num_layers=2,
        num_cross_attention_heads=3, cross_attention_head_dim=4, cross_attention_dim=12,
        caption_channels=8, sample_size=8, patch_size=1, qk_norm="rms_norm_across_heads"),
    "hunyuan": lambda: diffusers.HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8,
        hidden_size=16, num_layers=4, cross_attention_dim=8, cross_attention_dim_t5=16,
        pooled_projection_dim=8, text_len=5, text_len_t5=6),
    "cogview4": lambda: diffusers.CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=4,
        num_attention_heads=4, text_embed_dim=8, time_embed_dim=8, condition_dim=4,
        pos_embed_max_size=16, sample_size=8, rope_axes_dim=(2, 2)),
    "cogview3plus": lambda: diffusers.CogView3PlusTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=4,
        num_attention_heads=4, text_embed_dim=8, time_embed_dim=8, condition_dim=4,
        pos_embed_max_size=16, sample_size=8),
    "lumina2": lambda: diffusers.Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=24, num_layers=2,
        num_refiner_layers=1, num_attention_heads=4, num_kv_heads=2, multiple_of=16,
        axes_dim_rope=(2, 2, 2), axes_lens=(20, 20, 20), cap_feat_dim=8),
}

# Written out here, independently of dit_prune.units.families: (block lists, and per kind the
# sites as (path, role)); roles: v = a head's value rows, q = its other up rows, up = a neuron's
# up rows, glu = [value; gate] up rows, down = columns, norm = 1-D across heads, kv = GQA k/v.
JOINT = [("attn.to_q", "q"), ("attn.to_k", "q"), ("attn.to_v", "v"), ("attn.add_q_proj", "q"),
         ("attn.add_k_proj", "q"), ("attn.add_v_proj", "v"), ("attn.to_out.0", "down"),
         ("attn.to_add_out", "down")]


def heads_of(attn: str) -> list[tuple[str, str]]:
    return [(f"{attn}.to_q", "q"), (f"{attn}.to_k", "q"), (f"{attn}.to_v", "v"),
            (f"{attn}.to_out.0", "down")]


def ff_of(ff: str) -> list[tuple[str, str]]:
    return [(f"{ff}.net.0.proj", "up"), (f"{ff}.net.2", "down")]


SITES = {
    "sd3.5": (["transformer_blocks"], {
        "joint_head": JOINT, "dual_head": heads_of("attn2"), "neuron": ff_of("ff"),
        "context_neuron": ff_of("ff_context")}),
    "flux": (["transformer_blocks", "single_transformer_blocks"], {
        "joint_head": JOINT, "neuron": ff_of("ff"), "context_neuron": ff_of("ff_context"),
        "single_head": heads_of("attn")[:3] + [("proj_out", "down")],
        "single_neuron": [("proj_mlp", "up"), ("proj_out", "down")]}),
    "qwenimage": (["transformer_blocks"], {
        "joint_head": JOINT, "neuron": ff_of("img_mlp"), "context_neuron": ff_of("txt_mlp")}),
    "sana": (["transformer_blocks"], {
        "head": heads_of("attn1") + [("attn1.norm_q", "norm"), ("attn1.norm_k", "norm")],
        "cross_head": heads_of("attn2") + [("attn2.norm_q", "norm"), ("attn2.norm_k", "norm")],
        "neuron": [("ff.conv_inverted", "glu"), ("ff.conv_depth", "glu"),
                   ("ff.conv_point", "down")]}),
    "hunyuan": (["blocks"], {"head": heads_of("attn1"), "cross_head": heads_of("attn2"),
                             "neuron": ff_of("ff")}),
    "cogview4": (["transformer_blocks"], {"head": heads_of("attn1"), "neuron": ff_of("ff")}),
    "cogview3plus": (["transformer_blocks"], {"head": heads_of("attn1"),
                                              "neuron": ff_of("ff")}),
    "lumina2": (["noise_refiner", "context_refiner", "layers"], {
        "head": [("attn.to_q", "q"), ("attn.to_out.0", "down"), ("attn.to_k", "kv"),
                 ("attn.to_v", "kv")],
        "neuron": [("feed_forward.linear_1", "up"), ("feed_forward.linear_3", "up"),
                   ("feed_forward.linear_2", "down")]}),
}


def build(family: str, seed: int) -> torch.nn.Module:
    """A tiny model of `family`, every parameter random (scaled by 1/sqrt(fan-in))."""
    torch.manual_seed(seed)
    model = FAMILIES[family]()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = p[0].numel() ** -0.5 if p.ndim >= 2 else 0.1
            centre = 1.0 if "norm" in name and name.endswith("weight") and p.ndim == 1 else 0.0
            p.copy_(torch.randn(p.shape, generator=gen) * std + centre)
    return model.eval()


def blocks_of(model: torch.nn.Module, family: str) -> list[torch.nn.Module]:
    return [b for name in SITES[family][0] for b in getattr(model, name)]


def module_at(block: torch.nn.Module, path: str) -> torch.nn.Module | None:
    module = block
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part, None)
        if module is None:
            return None
    return module


@torch.no_grad()
def forward(model: torch.nn.Module, data: dict) -> torch.Tensor:
    return model(**data).sample  # (B, C, H, W) or (B, T, C)


def head_dim(block: torch.nn.Module, family: str, kind: str) -> int:
    sites = SITES[family][1][kind]
    if kind.endswith("neuron"):
        return 1
    attn = module_at(block, sites[0][0].rpartition(".")[0])
    return attn.inner_dim // attn.heads


def expected_drop(model: torch.nn.Module, family: str, units: list[Unit]) -> int:
    """Parameters `units` hold, from the site table above (GQA k/v rows for whole groups)."""
    blocks = blocks_of(model, family)
    total = 0
    for u in units:
        block = blocks[u.block]
        w = head_dim(block, family, u.kind)
        for path, role in SITES[family][1][u.kind]:
            layer = module_at(block, path)
            if layer is None or role == "kv":
                continue
            bias = getattr(layer, "bias", None) is not None
            if role in ("q", "v", "up", "glu"):
                total += w * (2 if role == "glu" else 1) * (layer.weight[0].numel() + bias)
            elif role == "down":
                total += w * layer.weight[:, 0].numel()
            elif role == "norm" and layer.weight.shape[0] > w:
                total += w * (1 + bias)
    if family == "lumina2":
        for (b, _), gone in _gqa_groups_gone(model, units).items():
            attn = blocks[b].attn
            w = attn.inner_dim // attn.heads
            total += gone * w * (attn.to_k.weight.shape[1] + attn.to_v.weight.shape[1])
    return total


def _gqa_groups_gone(model: torch.nn.Module, units: list[Unit]) -> dict[tuple[int, str], int]:
    """Lumina2: (block, 'head') -> number of key/value groups all of whose present heads go."""
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    found = {}
    for b in sorted({u.block for u in units if u.kind == "head"}):
        attn = blocks[b].attn
        kept = adapter.kept(blocks[b], "head")
        rep = model.config.num_attention_heads // model.config.num_kv_heads
        gone = {u.index for u in units if u.kind == "head" and u.block == b}
        groups = {i // rep for i in kept}
        found[(b, "head")] = sum(1 for g in groups
                                 if all(i in gone for i in kept if i // rep == g))
        assert attn.to_k.out_features // (attn.inner_dim // attn.heads) == len(groups)
    return found


def random_units(model: torch.nn.Module, family: str, rnd: random.Random) -> list[Unit]:
    """A random set of present units, every block keeping at least one of each kind; for
    Lumina2's grouped-query heads a balanced set (same count left in every kept group)."""
    adapter = adapter_for(model)
    present = enumerate_units(model, adapter.kinds)
    chosen: list[Unit] = []
    for key in sorted({(u.block, u.kind) for u in present}):
        pool = [u for u in present if (u.block, u.kind) == key]
        if family == "lumina2" and key[1] == "head":
            chosen += _balanced(model, pool, rnd)
        else:
            chosen += rnd.sample(pool, rnd.randint(0, len(pool) - 1))
    return chosen or [present[0]]


def _balanced(model: torch.nn.Module, pool: list[Unit], rnd: random.Random) -> list[Unit]:
    rep = model.config.num_attention_heads // model.config.num_kv_heads
    groups: dict[int, list[Unit]] = {}
    for u in pool:
        groups.setdefault(u.index // rep, []).append(u)
    keys = sorted(groups)
    whole = rnd.sample(keys, rnd.randint(0, len(keys) - 1))
    per = rnd.randint(0, len(groups[keys[0]]) - 1)
    chosen = [u for g in whole for u in groups[g]]
    for g in keys:
        if g not in whole:
            chosen += rnd.sample(groups[g], per)
    return chosen


def prune_and_compare(model: torch.nn.Module, family: str, units: list[Unit], data: dict):
    with ablate(model, units):
        reference = forward(model, data)
    before = sum(p.numel() for p in model.parameters())
    drop = expected_drop(model, family, units)
    plan = prune_units(model, units)
    assert before - sum(p.numel() for p in model.parameters()) == drop
    assert plan.params_before - plan.params_after == drop
    torch.testing.assert_close(forward(model, data), reference, atol=1e-4, rtol=0)
    return plan


def batch_inputs(model: torch.nn.Module) -> dict:
    return example_inputs(model, batch=2, seed=7)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prune_equals_ablate_saves_and_prunes_again(family, seed, tmp_path):
    model = build(family, seed)
    unpruned = copy.deepcopy(model)
    data = batch_inputs(model)
    rnd = random.Random(1000 * seed + len(family))
    first = random_units(model, family, rnd)
    plan = prune_and_compare(model, family, first, data)

    save_pruned(model, tmp_path / "pruned", plan=plan)
    loaded = load_dit(tmp_path / "pruned").model
    assert type(loaded) is type(model)
    saved, back = model.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys()
    assert all(torch.equal(saved[k], back[k]) for k in saved)
    assert torch.equal(forward(loaded, data), forward(model, data))

    second = random_units(loaded, family, rnd)  # original numbering, on the reloaded model
    assert not set(second) & set(first)
    prune_and_compare(loaded, family, second, data)
    assert not set(first + second) & set(enumerate_units(loaded, adapter_for(loaded).kinds))
    with ablate(unpruned, first + second):
        torch.testing.assert_close(forward(loaded, data), forward(unpruned, data), atol=1e-4,
                                   rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ablation_is_zeroing_the_value_rows(family):
    """Ablating one unit of every kind equals zeroing its value rows (and biases) by hand:
    a head's v rows in both streams, a neuron's up rows (value half of a GLU; GLUMBConv's
    depthwise channel too). Skipped where a head shares its value rows (GQA) or where a norm
    across heads couples it to the others (Sana)."""
    model = build(family, 3)
    data = batch_inputs(model)
    blocks = blocks_of(model, family)
    present = enumerate_units(model, adapter_for(model).kinds)
    for kind, sites in SITES[family][1].items():
        if kind.endswith("head") and (family == "lumina2" or family == "sana"):
            continue
        unit = max((u for u in present if u.kind == kind), key=lambda u: (u.block, u.index))
        zeroed = copy.deepcopy(model)
        block = blocks_of(zeroed, family)[unit.block]
        w = head_dim(blocks[unit.block], family, kind)
        rows = list(range(unit.index * w, (unit.index + 1) * w))
        with torch.no_grad():
            for path, role in sites:
                layer = module_at(block, path)
                if layer is not None and role in ("v", "up", "glu"):
                    layer.weight[rows] = 0
                    if layer.bias is not None:
                        layer.bias[rows] = 0
        with ablate(model, [unit]):
            torch.testing.assert_close(forward(model, data), forward(zeroed, data), atol=1e-5,
                                       rtol=0, msg=f"{family} {unit}")


@pytest.mark.parametrize("family", ["flux", "sana"])
def test_gates_and_capture_cover_every_site(family):
    """A gate's unit sum is the derivative of the loss with respect to the unit's scale
    (finite differences of `ablate(scale)`), so it acts on every site; capture returns one
    entry per site and call."""
    model = build(family, 5).double()
    data = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in batch_inputs(model).items()}
    kinds = adapter_for(model).kinds
    units = [next(u for u in enumerate_units(model, kinds) if u.kind == k) for k in kinds]
    with gates(model, units) as g:
        loss = model(**data).sample.pow(2).mean()
        grads = torch.autograd.grad(loss, g.tensors)
    first_order = g.unit_sums(grads)  # (U,)
    eps = 1e-3  # some diffusers ops run in float32 (RoPE, RMSNorm variance): 1e-2 relative
    for u, value in zip(units, first_order, strict=True):
        with ablate(model, [u], scale=1 + eps):
            up = forward(model, data).pow(2).mean()
        with ablate(model, [u], scale=1 - eps):
            down = forward(model, data).pow(2).mean()
        torch.testing.assert_close(value, (up - down) / (2 * eps), rtol=1e-2, atol=1e-7)
    with capture(model, units) as record:
        forward(model, data)
    joint = [u for u in units if u.kind == "joint_head"]
    for u in joint:
        assert len(record.activations(u)) == 2  # image stream and text stream
        assert record.activations(u)[0].shape[-1] == model.config.attention_head_dim


def test_gqa_unbalanced_removal_is_refused_and_changes_nothing():
    model = build("lumina2", 0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    structure = read_structure(model)
    with pytest.raises(DitPruneError, match="unbalanced removal of heads") as info:
        prune_units(model, [Unit("head", 3, 0)])  # group 0 keeps 1 head, group 1 keeps 2
    assert "\n" not in str(info.value)
    after = model.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert read_structure(model) == structure
    data = batch_inputs(model)
    whole_group = [Unit("head", 3, 0), Unit("head", 3, 1)]  # key/value head 0 goes too
    prune_and_compare(model, "lumina2", whole_group, data)
    assert model.layers[0].attn.to_k.out_features == model.layers[0].attn.to_q.out_features // 2
    prune_and_compare(model, "lumina2", [Unit("head", 0, 1), Unit("head", 0, 3)], data)


def test_failed_forward_check_leaves_a_joint_model_as_it_was(monkeypatch):
    """Wrong columns of a down-projection (the text stream's too) are caught by the check."""
    model = build("flux", 0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    structure = read_structure(model)
    data = batch_inputs(model)
    expected = forward(model, data)
    right = tp.prune_linear_in_channels

    def wrong(layer, idxs):
        return right(layer, [(i + 1) % layer.in_features for i in idxs])

    monkeypatch.setattr(tp, "prune_linear_in_channels", wrong)
    units = [Unit("joint_head", 0, 1), Unit("single_neuron", 2, 3)]
    with pytest.raises(DitPruneError, match="disagrees with ablation.*left unchanged") as info:
        prune_units(model, units)
    assert "\n" not in str(info.value)
    after = model.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert read_structure(model) == structure
    assert model.single_transformer_blocks[0].mlp_hidden_dim == 4 * 24
    assert torch.equal(forward(model, data), expected)
    monkeypatch.undo()
    prune_and_compare(model, "flux", units, data)
    assert model.single_transformer_blocks[0].mlp_hidden_dim == 4 * 24 - 1


def test_save_and_load_are_bit_exact_in_bfloat16(tmp_path):
    model = build("sd3.5", 1)
    prune_units(model, [Unit("joint_head", 2, 1), Unit("dual_head", 0, 0),
                        Unit("context_neuron", 0, 5)])
    model = model.to(torch.bfloat16)
    save_pruned(model, tmp_path / "bf16")
    loaded = load_dit(tmp_path / "bf16").model
    saved, back = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(back[k].to(torch.bfloat16), saved[k]) for k in saved)


PIPELINES = {"sd3.5": "StableDiffusion3Pipeline", "flux": "FluxPipeline",
             "qwenimage": "QwenImagePipeline", "sana": "SanaPipeline",
             "hunyuan": "HunyuanDiTPipeline", "cogview4": "CogView4Pipeline",
             "cogview3plus": "CogView3PlusPipeline",
             "lumina2": "Lumina2Pipeline"}


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("family", sorted(PIPELINES))
def test_single_model_and_pipeline_directories_load(family, tmp_path):
    """`load_dit` reads a `save_pretrained` transformer directory and a pipeline directory;
    a pruned pipeline (transformer + scheduler here: text encoders and VAE need downloaded
    tokenizers) saved by `save_pipeline` reloads through `load_pruned_pipeline`."""
    from dit_prune.pipelines import prune_pipeline
    from dit_prune.pipelines.io import load_pruned_pipeline, save_pipeline

    model = build(family, 2)
    data = batch_inputs(model)
    model.save_pretrained(tmp_path / "single", safe_serialization=True)
    single = load_dit(tmp_path / "single")
    assert single.meta.model_class == type(model).__name__ and single.meta.pipeline_dir is None
    assert torch.equal(forward(single.model, data), forward(model, data))

    cls = getattr(diffusers, PIPELINES[family])
    absent = {name: None for name in cls._get_signature_keys(cls)[0]
              if name not in ("transformer", "scheduler")}
    scheduler = (diffusers.DDPMScheduler() if family == "hunyuan"
                 else diffusers.FlowMatchEulerDiscreteScheduler())
    pipe = cls(transformer=model, scheduler=scheduler, **absent)
    units = random_units(model, family, random.Random(5))
    pruned = prune_pipeline(pipe, units)
    save_pipeline(pruned, tmp_path / "pipe")
    back = load_pruned_pipeline(tmp_path / "pipe", **absent)
    assert type(back) is cls and type(back.scheduler) is type(scheduler)
    saved, loaded = pruned.transformer.state_dict(), back.transformer.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    via_dit = load_dit(tmp_path / "pipe")
    assert via_dit.meta.pipeline_dir == str(tmp_path / "pipe")
    with ablate(model, units):
        torch.testing.assert_close(forward(via_dit.model, data), forward(model, data),
                                   atol=1e-4, rtol=0)


def test_balance_kv_groups_gives_the_largest_removable_subset():
    """Any head selection shrinks to a removable subset of itself; no larger subset is
    removable (checked by brute force over the block's subsets)."""
    from itertools import combinations

    from dit_prune.units.gqa import balance_kv_groups

    model = build("lumina2", 4)
    adapter = adapter_for(model)
    block = adapter.blocks(model)[3]
    heads = [Unit("head", 3, i) for i in range(4)]

    def removable(subset):
        try:
            adapter.kv_positions(block, "head", [u.index for u in subset])
        except DitPruneError:
            return False
        return len(subset) < len(heads)

    rnd = random.Random(0)
    for size in range(1, 4):
        for chosen in combinations(heads, size):
            chosen = rnd.sample(list(chosen), len(chosen))
            kept = balance_kv_groups(model, chosen)
            assert set(kept) <= set(chosen) and removable(kept)
            assert kept == [u for u in chosen if u in kept]  # the caller's order
            best = max(len(s) for n in range(size + 1) for s in combinations(chosen, n)
                       if removable(list(s)))
            assert len(kept) == best
    data = batch_inputs(model)
    prune_and_compare(model, "lumina2", balance_kv_groups(model, heads[:1] + heads[2:]), data)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_prune_cli_on_a_flux_pipeline_directory(tmp_path, capsys):
    """`dit-prune prune` on a Flux pipeline directory (model_index.json + transformer/ +
    scheduler/) removes the top-scored units of every kind; Lumina2's head selections
    are kept balanced by selection, and a budget too small for any balanced removal exits 2
    with one line."""
    from safetensors.torch import save_file

    from dit_prune.cli import main

    def pipeline_dir(family, name):
        cls = getattr(diffusers, PIPELINES[family])
        absent = {n: None for n in cls._get_signature_keys(cls)[0]
                  if n not in ("transformer", "scheduler")}
        model = build(family, 0)
        cls(transformer=model, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
            **absent).save_pretrained(tmp_path / name, safe_serialization=True)
        units = enumerate_units(model)
        scores = tmp_path / f"{name}-scores"
        scores.mkdir()
        values = torch.linspace(1.0, 0.0, len(units), dtype=torch.float64)  # (U,)
        save_file({"scores": values}, str(scores / "scores.safetensors"))
        (scores / "scores.json").write_text(json.dumps(
            {"units": [u.to_json() for u in units], "scorer": "handwritten",
             "model": {"weights_sha256": load_dit(tmp_path / name).meta.weights_sha256}}))
        return model, scores

    base, scores = pipeline_dir("flux", "flux")
    out = tmp_path / "flux-pruned"
    code = main(["prune", str(tmp_path / "flux"), "--scores", str(scores), "--budget", "1",
                 "--budget-mode", "both", "--out", str(out), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    plan = json.loads((out / "plan.json").read_text())
    assert plan["model_class"] == "FluxTransformer2DModel"
    assert plan["counts"] == {k: 1 for k in adapter_for(base).kinds}
    removed = [Unit.from_json(u) for u in plan["removed"]]
    data = batch_inputs(base)
    with ablate(base, removed):
        torch.testing.assert_close(forward(load_dit(out).model, data), forward(base, data),
                                   atol=1e-4, rtol=0)

    lumina, scores = pipeline_dir("lumina2", "lumina2")
    code = main(["prune", str(tmp_path / "lumina2"), "--scores", str(scores), "--budget", "4",
                 "--budget-mode", "heads", "--out", str(tmp_path / "l-out"), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err  # selection keeps key/value groups balanced
    capsys.readouterr()
    removed = [Unit.from_json(u) for u in
               json.loads((tmp_path / "l-out" / "plan.json").read_text())["removed"]]
    assert 0 < len(removed) <= 4 and {u.kind for u in removed} == {"head"}
    data = batch_inputs(lumina)
    with ablate(lumina, removed):
        torch.testing.assert_close(forward(load_dit(tmp_path / "l-out").model, data),
                                   forward(lumina, data), atol=1e-4, rtol=0)
    code = main(["prune", str(tmp_path / "lumina2"), "--scores", str(scores), "--budget", "1",
                 "--budget-mode", "heads", "--out", str(tmp_path / "l-one"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and re.match(r"dit-prune prune: error: .*removes none: Lumina2", err[-1])
    assert "at least 2 heads" in err[-1] and not any("Traceback" in line for line in err)


@pytest.mark.parametrize("family", ["sana", "flux"])
def test_ablate_each_is_ablate_per_replica(family):
    """Batched single-unit ablation equals `ablate` of each unit alone, on every kind (conv
    sites, two down sites, norms across heads included)."""
    from dit_prune.hooks import ablate_each

    model = build(family, 6)
    kinds = adapter_for(model).kinds
    units = [next(u for u in enumerate_units(model, kinds) if u.kind == k) for k in kinds]
    data = example_inputs(model, batch=1, seed=3)
    replicas = len(units)
    stacked = {k: v.repeat(replicas, *([1] * (v.ndim - 1))) if torch.is_tensor(v)
               and v.ndim and v.shape[0] == 1 else v for k, v in data.items()}
    if "img_shapes" in stacked:
        stacked["img_shapes"] = data["img_shapes"] * replicas
    with ablate_each(model, units):
        together = forward(model, stacked)  # (R, ...)
    for r, unit in enumerate(units):
        with ablate(model, [unit]):
            torch.testing.assert_close(together[r : r + 1], forward(model, data), atol=1e-5,
                                       rtol=0, msg=str(unit))
