"""Budget modes by the unit categories the family anatomies declare: `heads` is every self-/
joint-attention head kind of the model and `neurons` every MLP-neuron kind (SD3: joint_head +
dual_head, neuron + context_neuron; Flux: joint_head + single_head, neuron + context_neuron +
single_neuron), pooled across kinds; `cross_heads` stays the cross-attention heads; DiT, PixArt
and Lumina2 selections are those of the per-kind code before (golden lists); a mode that finds
no kind is one line naming the kinds and the modes that would work; `dit-prune prune` with its
default mode prunes tiny SD3 and Flux pipeline directories."""

from __future__ import annotations

import json
from collections import Counter

import diffusers
import pytest
import torch

from dit_prune.checkpoint import load_dit
from dit_prune.errors import DitPruneError
from dit_prune.hooks import ablate
from dit_prune.models import new_dit
from dit_prune.pruning import select_units
from dit_prune.pruning.selection import check_budget_for, mode_kinds, model_mode_kinds
from dit_prune.units import UNIT_KINDS, Unit, adapter_for, enumerate_units
from dit_prune.units.anatomy import Site, UnitKind
from dit_prune.units.families import ANATOMIES, kind_category
from tests import test_families as classic
from tests import test_family_anatomy as families

HEAD_KINDS = {"sd3.5": {"joint_head", "dual_head"}, "flux": {"joint_head", "single_head"}}
NEURON_KINDS = {"sd3.5": {"neuron", "context_neuron"},
                "flux": {"neuron", "context_neuron", "single_neuron"}}
# the kinds of each mode, per family, as docs/families.md states them
MODE_TABLE = {
    "DiTTransformer2DModel": ("head", "neuron", None),
    "PixArtTransformer2DModel": ("head", "neuron", "cross_head"),
    "SD3Transformer2DModel": ("joint_head dual_head", "neuron context_neuron", None),
    "FluxTransformer2DModel": ("joint_head single_head",
                               "neuron context_neuron single_neuron", None),
    "QwenImageTransformer2DModel": ("joint_head", "neuron context_neuron", None),
    "SanaTransformer2DModel": ("head", "neuron", "cross_head"),
    "HunyuanDiT2DModel": ("head", "neuron", "cross_head"),
    "CogView3PlusTransformer2DModel": ("head", "neuron", None),
    "CogView4Transformer2DModel": ("head", "neuron", None),
    "Lumina2Transformer2DModel": ("head", "neuron", None),
}


def scored(family: str, seed: int = 0) -> tuple[torch.nn.Module, list[Unit], torch.Tensor]:
    """A tiny model of `family`, all its units and distinct random scores (U,)."""
    model = families.build(family, 0)
    units = enumerate_units(model)
    scores = torch.randperm(len(units), generator=torch.Generator().manual_seed(seed)).double()
    return model, units, scores


def greedy(model: torch.nn.Module, units: list[Unit], scores: torch.Tensor, kinds: set[str],
           count: int) -> list[Unit]:
    """Reference: the best `count` units of `kinds`, best first, skipping any that would leave
    its block without a unit of its kind."""
    adapter, blocks = adapter_for(model), adapter_for(model).blocks(model)
    removed: Counter = Counter()
    taken: list[Unit] = []
    for i in torch.argsort(scores, descending=True).tolist():
        unit = units[i]
        if unit.kind not in kinds or len(taken) == count:
            continue
        if removed[unit.block, unit.kind] + 1 < adapter.count(blocks[unit.block], unit.kind):
            removed[unit.block, unit.kind] += 1
            taken.append(unit)
    return taken


# -- the categories the anatomies declare --------------------------------------------------


def test_every_family_declares_what_each_mode_selects():
    for family, (heads, neurons, cross) in MODE_TABLE.items():
        anatomy = ANATOMIES[family]
        assert anatomy.kinds_of("head") == tuple(heads.split()), family
        assert anatomy.kinds_of("neuron") == tuple(neurons.split()), family
        assert anatomy.kinds_of("cross_head") == (tuple(cross.split()) if cross else ()), family
    assert set(MODE_TABLE) == set(ANATOMIES)
    for kind in UNIT_KINDS:  # a kind name means one category in every family
        assert kind_category(kind) == ("neuron" if kind.endswith("neuron") else
                                       "cross_head" if kind == "cross_head" else "head")


def test_a_kind_without_a_valid_category_is_refused():
    with pytest.raises(DitPruneError, match="needs a category") as info:
        UnitKind("neuron", ups=(Site("ff.net.0.proj"),), downs=(Site("ff.net.2"),))
    assert "\n" not in str(info.value)
    with pytest.raises(DitPruneError, match="does not fit"):
        UnitKind("head", ups=(Site("attn.to_q"),), downs=(Site("attn.to_out.0"),),
                 category="neuron", attention="attn")
    with pytest.raises(DitPruneError, match="no single category"):
        kind_category("layer")


# -- heads and neurons on SD3 and Flux -----------------------------------------------------


@pytest.mark.parametrize("family", ["sd3.5", "flux"])
def test_heads_and_neurons_pool_the_family_kinds(family):
    model, units, scores = scored(family)
    for mode, kinds in (("heads", HEAD_KINDS[family]), ("neurons", NEURON_KINDS[family])):
        assert set(model_mode_kinds(mode, model)) == kinds
        total = sum(u.kind in kinds for u in units)
        for budget, count in ((0.2, round(0.2 * total)), (3, 3)):
            chosen = select_units(units, scores, budget, mode=mode, model=model)
            assert len(chosen) == count, (mode, budget)
            assert {u.kind for u in chosen} <= kinds
            assert chosen == greedy(model, units, scores, kinds, count)  # best first
        # a fraction large enough reaches every kind of the mode
        assert {u.kind for u in select_units(units, scores, 0.5, mode=mode, model=model)} == kinds
    # a whole number counts units across the kinds; `both` takes it of each kind
    assert len(select_units(units, scores, 2, mode="both", model=model)) == \
        2 * len(adapter_for(model).kinds)


def test_pooled_heads_take_the_best_score_across_kinds_and_keep_one_per_block():
    """SD3: the dual heads score highest; with 3 heads per attention and one kept, 4 of the
    6 dual heads can go, and the 5th unit is the best joint head."""
    model, units, _ = scored("sd3.5")
    scores = torch.tensor([10_000.0 + i if u.kind == "dual_head" else float(i)
                           for i, u in enumerate(units)])  # (U,)
    chosen = select_units(units, scores, 5, mode="heads", model=model)
    assert Counter(u.kind for u in chosen) == {"dual_head": 4, "joint_head": 1}
    best_joint = max((u for u in units if u.kind == "joint_head"), key=units.index)
    assert chosen[-1] == best_joint
    assert all(Counter((u.block, u.kind) for u in chosen)[b, k] <= 2 for b, k in
               {(u.block, u.kind) for u in chosen})


def test_scores_without_the_model_use_the_declared_categories():
    model, units, scores = scored("flux")
    for mode in ("heads", "neurons"):
        with_model = select_units(units, scores, 0.1, mode=mode, model=model)
        assert select_units(units, scores, 0.1, mode=mode) == with_model


def test_budgets_are_checked_against_the_pooled_count():
    model, units, _ = scored("sd3.5")
    counts = Counter(u.kind for u in units)
    heads = counts["joint_head"] + counts["dual_head"]  # 9 + 6
    check_budget_for(heads, "heads", counts, model)
    with pytest.raises(DitPruneError, match=f"exceeds the {heads} joint_head \\+ dual_head"):
        check_budget_for(heads + 1, "heads", counts, model)
    with pytest.raises(DitPruneError, match="removes none; the smallest fraction") as info:
        check_budget_for(0.02, "heads", counts, model)
    assert "\n" not in str(info.value)
    with pytest.raises(DitPruneError, match="exceeds"):
        select_units(units, torch.rand(len(units)), heads + 1, mode="heads", model=model)


def test_a_mode_without_kinds_names_the_kinds_and_the_modes_that_work():
    model, units, scores = scored("sd3.5")
    with pytest.raises(DitPruneError) as info:
        model_mode_kinds("cross_heads", model)
    message = str(info.value)
    assert "\n" not in message
    assert message == ("budget mode 'cross_heads' finds no cross_head units in "
                       "SD3Transformer2DModel (its kinds: joint_head, dual_head, neuron, "
                       "context_neuron); modes that would work: heads, neurons, both, params")
    neurons_only = [u for u in units if u.kind.endswith("neuron")]
    with pytest.raises(DitPruneError, match=r"finds no head units in the scored units of "
                                            r"SD3Transformer2DModel \(its kinds: neuron, "
                                            r"context_neuron\); modes that would work: neurons,"):
        select_units(neurons_only, scores[:len(neurons_only)], 2, mode="heads", model=model)
    with pytest.raises(DitPruneError, match="finds no head units"):
        check_budget_for(2, "heads", Counter(u.kind for u in neurons_only), model)
    assert mode_kinds("both", ["joint_head", "neuron"]) == ("joint_head", "neuron")


def test_both_and_params_enumerate_heads_and_neurons_but_not_cross_heads():
    pixart = classic.build("pixart", 0)
    assert model_mode_kinds("both", pixart) == ("head", "neuron")  # as before
    assert model_mode_kinds("params", pixart) == ("head", "neuron")
    assert model_mode_kinds("cross_heads", pixart) == ("cross_head",)
    assert model_mode_kinds("both", families.build("sd3.5", 0)) == (
        "joint_head", "dual_head", "neuron", "context_neuron")
    plain_sd3 = diffusers.SD3Transformer2DModel(  # no dual attention: no dual_head kind
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4,
        num_attention_heads=2, joint_attention_dim=8, caption_projection_dim=8,
        pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16)
    assert model_mode_kinds("heads", plain_sd3) == ("joint_head",)


# -- DiT, PixArt and Lumina2: the selections of the per-kind code (golden lists) ----------


def test_dit_selection_is_unchanged():
    model = new_dit("tiny", 10, 8, 1)
    units = enumerate_units(model)
    scores = torch.randn(len(units), generator=torch.Generator().manual_seed(0))  # (U,)

    def picked(budget, mode):
        return [(u.kind[0], u.block, u.index)
                for u in select_units(units, scores, budget, mode=mode, model=model)]

    assert picked(0.25, "heads") == [("h", 3, 0), ("h", 1, 2), ("h", 3, 2), ("h", 2, 0)]
    assert picked(3, "heads") == [("h", 3, 0), ("h", 1, 2), ("h", 3, 2)]
    assert picked(0.005, "neurons") == [
        ("n", 0, 389), ("n", 0, 333), ("n", 2, 436), ("n", 0, 55), ("n", 0, 448), ("n", 1, 18),
        ("n", 1, 344), ("n", 1, 389), ("n", 2, 352), ("n", 2, 171)]
    assert picked(2, "both") == [("n", 0, 389), ("n", 0, 333), ("h", 3, 0), ("h", 1, 2)]
    assert picked(0.01, "params")[:4] == [("n", 0, 389), ("n", 0, 333), ("n", 2, 436),
                                          ("n", 0, 55)]
    assert len(picked(0.01, "params")) == 30


def test_pixart_and_lumina2_selection_is_unchanged():
    pixart = classic.build("pixart", 0)
    units = enumerate_units(pixart, ["head", "neuron", "cross_head"])
    scores = torch.randn(len(units), generator=torch.Generator().manual_seed(2))  # (U,)

    def picked(model, units, scores, budget, mode):
        return [(u.kind, u.block, u.index)
                for u in select_units(units, scores, budget, mode=mode, model=model)]

    assert picked(pixart, units, scores, 2, "heads") == [("head", 1, 1), ("head", 0, 1)]
    assert picked(pixart, units, scores, 0.5, "cross_heads") == [
        ("cross_head", 0, 0), ("cross_head", 0, 2), ("cross_head", 1, 1)]
    assert picked(pixart, units, scores, 3, "neurons") == [
        ("neuron", 0, 24), ("neuron", 1, 22), ("neuron", 1, 15)]
    lumina = families.build("lumina2", 0)  # grouped-query heads: balanced removals
    units = enumerate_units(lumina)
    scores = torch.randn(len(units), generator=torch.Generator().manual_seed(1))  # (U,)
    assert picked(lumina, units, scores, 4, "heads") == [
        ("head", 1, 0), ("head", 3, 1), ("head", 1, 3), ("head", 3, 0)]
    assert picked(lumina, units, scores, 0.5, "heads") == [
        ("head", 1, 0), ("head", 3, 1), ("head", 1, 3), ("head", 2, 1), ("head", 3, 0),
        ("head", 2, 3), ("head", 3, 3), ("head", 2, 0)]


# -- `dit-prune prune` with the default mode on SD3 and Flux directories -------------------


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("family", ["sd3.5", "flux"])
def test_prune_cli_default_mode_on_sd3_and_flux_directories(family, tmp_path, capsys):
    from safetensors.torch import save_file

    from dit_prune.cli import main

    cls = getattr(diffusers, families.PIPELINES[family])
    absent = {n: None for n in cls._get_signature_keys(cls)[0]
              if n not in ("transformer", "scheduler")}
    model, units, scores = scored(family, seed=3)
    cls(transformer=model, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        **absent).save_pretrained(tmp_path / "model", safe_serialization=True)
    score_dir = tmp_path / "scores"
    score_dir.mkdir()
    save_file({"scores": scores}, str(score_dir / "scores.safetensors"))
    (score_dir / "scores.json").write_text(json.dumps(
        {"units": [u.to_json() for u in units], "scorer": "handwritten",
         "model": {"weights_sha256": load_dit(tmp_path / "model").meta.weights_sha256}}))
    out = tmp_path / "pruned"
    code = main(["prune", str(tmp_path / "model"), "--scores", str(score_dir), "--budget", "3",
                 "--out", str(out), "--device", "cpu"])  # no --budget-mode: heads
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    report = json.loads((out / "prune_report.json").read_text())
    assert report["budget_mode"] == "heads"
    removed = [Unit.from_json(u) for u in json.loads((out / "plan.json").read_text())["removed"]]
    assert sorted(removed) == sorted(greedy(model, units, scores, HEAD_KINDS[family], 3))
    data = families.batch_inputs(model)
    with ablate(model, removed):
        torch.testing.assert_close(families.forward(load_dit(out).model, data),
                                   families.forward(model, data), atol=1e-4, rtol=0)
    code = main(["prune", str(tmp_path / "model"), "--scores", str(score_dir), "--budget", "0.1",
                 "--budget-mode", "neurons", "--out", str(tmp_path / "neurons"),
                 "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    plan = json.loads((tmp_path / "neurons" / "plan.json").read_text())
    assert set(plan["counts"]) <= NEURON_KINDS[family]
    total = sum(u.kind in NEURON_KINDS[family] for u in units)
    assert sum(plan["counts"].values()) == round(0.1 * total)
