"""Selection, parameter counts and scorers on every family of docs/families.md: budgets on
Lumina2's grouped-query heads select removable sets; per-unit parameter counts add up to the
parameter drop; `magnitude` reads every site (checked against the site table of
tests/test_family_anatomy.py); pipelines default to the family's kinds; activation-contrast's
trajectory statistic handles conv and two-stream down-projections."""

from __future__ import annotations

import copy
import random
from types import SimpleNamespace

import diffusers
import pytest
import torch

from dit_prune.errors import DitPruneError
from dit_prune.hooks import ablate, capture, observe
from dit_prune.pruning import prune_units, select_units
from dit_prune.scorers.baselines import Magnitude
from dit_prune.scorers.normalize import unit_parameter_counts
from dit_prune.units import Unit, adapter_for, enumerate_units
from tests import test_families as old
from tests import test_family_anatomy as new

ALL = sorted(new.FAMILIES) + ["dit", "dit-geglu", "pixart"]


def build(family: str, seed: int) -> torch.nn.Module:
    return new.build(family, seed) if family in new.FAMILIES else old.build(family, seed)


def every_unit(model: torch.nn.Module) -> list[Unit]:
    return enumerate_units(model, adapter_for(model).kinds)


@torch.no_grad()
def forward(model: torch.nn.Module, data: dict) -> torch.Tensor:
    return model(**data).sample


def inputs(model: torch.nn.Module, family: str) -> dict:
    return new.batch_inputs(model) if family in new.FAMILIES else old.inputs(model)


# -- 1. selection on grouped-query heads -------------------------------------------------------


def removable(model: torch.nn.Module, units: list[Unit]) -> bool:
    """Every block keeps the same number of heads in each key/value group that keeps any."""
    adapter = adapter_for(model)
    for b in {u.block for u in units if u.kind == "head"}:
        block = adapter.blocks(model)[b]
        kept = adapter.kept(block, "head")
        groups = block.attn.to_k.out_features // (block.attn.inner_dim // block.attn.heads)
        n = len(kept) // groups
        gone = {kept.index(u.index) for u in units if u.kind == "head" and u.block == b}
        left = {sum(p not in gone for p in range(g * n, (g + 1) * n)) for g in range(groups)}
        if len(left - {0}) > 1 or left == {0}:
            return False
    return True


@pytest.mark.parametrize(("budget", "mode"), [(0.25, "heads"), (0.5, "heads"), (6, "heads"),
                                              (0.3, "both"), (0.1, "params")])
def test_budgets_on_lumina2_heads_select_removable_sets(budget, mode):
    """Random scores, three seeds: the selection is balanced within key/value groups, removes at
    most the budget, prunes, and the pruned forward equals ablation (prune_units checks it
    too); then a second round on the pruned model, in the original numbering."""
    for seed in range(3):
        model = new.build("lumina2", seed)
        units = enumerate_units(model)
        heads = sum(u.kind == "head" for u in units)
        gen = torch.Generator().manual_seed(seed)
        chosen = select_units(units, torch.rand(len(units), generator=gen), budget, mode=mode,
                              model=model)
        chosen_heads = [u for u in chosen if u.kind == "head"]
        assert removable(model, chosen), chosen_heads
        if mode != "params":
            target = budget if isinstance(budget, int) else round(budget * heads)
            assert 0 < len(chosen_heads) <= target
        data = new.batch_inputs(model)
        with ablate(model, chosen):
            reference = forward(model, data)
        new.prune_and_compare(model, "lumina2", chosen, data)
        torch.testing.assert_close(forward(model, data), reference, atol=1e-4, rtol=0)

        rest = enumerate_units(model)
        again = select_units(rest, torch.rand(len(rest), generator=gen), 2, mode="heads",
                             model=model)
        assert removable(model, again) and 0 < len(again) <= 2
        new.prune_and_compare(model, "lumina2", again, data)


def test_lumina2_budget_too_small_for_any_balanced_removal_is_one_line():
    model = new.build("lumina2", 0)
    units = enumerate_units(model)
    with pytest.raises(DitPruneError, match=r"removes none: .*at least 2 heads") as info:
        select_units(units, torch.rand(len(units)), 1, mode="heads", model=model)
    assert "\n" not in str(info.value)


def test_lumina2_selection_prefers_top_scores_within_groups():
    """With the scores concentrated on one block, the heads taken there are the best of each
    group (or a whole group) and ties between blocks follow the scores."""
    model = new.build("lumina2", 1)
    units = enumerate_units(model)
    scores = torch.zeros(len(units))
    top = {Unit("head", 2, 0): 9.0, Unit("head", 2, 2): 8.0, Unit("head", 2, 1): 7.0}
    for unit, value in top.items():
        scores[units.index(unit)] = value
    assert select_units(units, scores, 2, mode="heads", model=model) == [
        Unit("head", 2, 0), Unit("head", 2, 2)]  # one from each group
    assert sorted(select_units(units, scores, 3, mode="heads", model=model)) == [
        Unit("head", 2, 0), Unit("head", 2, 1), Unit("head", 2, 2)]  # group 0 whole + one


# -- 2. parameter counts and magnitude on every site ------------------------------------------


def random_removal(model: torch.nn.Module, family: str, rnd: random.Random) -> list[Unit]:
    """Random units of every kind, each block keeping one; Lumina2 heads: the same number
    (fewer than a group) from each key/value group, so no key/value head goes."""
    present = every_unit(model)
    chosen: list[Unit] = []
    for key in sorted({(u.block, u.kind) for u in present}):
        pool = [u for u in present if (u.block, u.kind) == key]
        if family == "lumina2" and key[1] == "head":
            attn = adapter_for(model).blocks(model)[key[0]].attn
            groups = attn.to_k.out_features // (attn.inner_dim // attn.heads)
            n = len(pool) // groups  # current heads per group; pool is in current order
            per = rnd.randint(0, n - 1)
            for g in range(groups):
                chosen += rnd.sample(pool[g * n : (g + 1) * n], per)
        else:
            chosen += rnd.sample(pool, rnd.randint(0, len(pool) - 1))
    return chosen


@pytest.mark.filterwarnings("ignore:.*Transformer2DModelOutput.*:FutureWarning")
@pytest.mark.parametrize("family", ALL)
def test_unit_parameter_counts_add_up_to_the_parameter_drop(family):
    model = build(family, 2)
    units = random_removal(model, family, random.Random(len(family)))
    counts = unit_parameter_counts(model, units)  # (U,)
    before = sum(p.numel() for p in model.parameters())
    prune_units(model, units)
    assert int(counts.sum()) == before - sum(p.numel() for p in model.parameters())
    every = every_unit(build(family, 2))
    assert torch.all(unit_parameter_counts(build(family, 2), every) > 0)


def test_a_whole_kv_group_adds_its_key_value_rows():
    model = new.build("lumina2", 0)
    group = [Unit("head", 3, 0), Unit("head", 3, 1)]
    attn = model.layers[0].attn
    width = attn.inner_dim // attn.heads
    kv_rows = width * (attn.to_k.in_features + attn.to_v.in_features)  # no biases
    counted = int(unit_parameter_counts(model, group).sum())
    plan = prune_units(model, group)
    assert plan.params_before - plan.params_after == counted + kv_rows


def hand_squared_norm(model: torch.nn.Module, family: str, unit: Unit) -> float:
    """Sum of squares of the unit's slices, from the site table of test_family_anatomy
    (rows of every up site, both GLU halves, with biases; columns of every down site)."""
    if family in new.FAMILIES:
        blocks, sites = new.blocks_of(model, family), new.SITES[family][1][unit.kind]
        width = new.head_dim(blocks[unit.block], family, unit.kind)
    else:
        blocks = list(model.transformer_blocks)
        prefix = {"neuron": "ff", "head": "attn1", "cross_head": "attn2"}[unit.kind]
        sites = new.ff_of(prefix) if unit.kind == "neuron" else new.heads_of(prefix)
        attn = blocks[unit.block].attn1
        width = 1 if unit.kind == "neuron" else attn.inner_dim // attn.heads
    block = blocks[unit.block]
    at = adapter_for(model).kept(block, unit.kind).index(unit.index)  # current position
    channels = list(range(at * width, (at + 1) * width))
    total = 0.0
    for path, role in sites:
        layer = new.module_at(block, path)
        if layer is None or role in ("norm", "kv"):
            continue
        weight = layer.weight.detach().double()
        if role == "down":
            offset = block.attn.to_q.out_features if unit.kind == "single_neuron" else 0
            total += weight[:, [offset + c for c in channels]].pow(2).sum().item()
            continue
        rows = list(channels)
        parent = type(new.module_at(block, path.rpartition(".")[0])).__name__
        if role == "glu" or parent in ("GEGLU", "SwiGLU"):
            rows += [weight.shape[0] // 2 + c for c in channels]
        total += weight[rows].pow(2).sum().item()
        if layer.bias is not None:
            total += layer.bias.detach().double()[rows].pow(2).sum().item()
    return total


@pytest.mark.filterwarnings("ignore:.*Transformer2DModelOutput.*:FutureWarning")
@pytest.mark.parametrize("family", ALL)
def test_magnitude_reads_every_site(family):
    """Finite scores for every unit of every kind, equal to -sqrt of the hand sum of squares
    (joint heads: both streams; GLU and GLUMBConv neurons: both halves; Flux single neurons:
    the proj_out column after the attention width); also on a pruned model."""
    model = build(family, 4)
    for round_ in range(2):
        units = every_unit(model)
        raw = Magnitude().compute(model, units, None).raw  # (U,)
        assert torch.isfinite(raw).all() and len(raw) == len(units)
        rnd = random.Random(round_)
        for unit in rnd.sample(units, min(len(units), 40)):
            expected = -hand_squared_norm(model, family, unit) ** 0.5
            assert raw[units.index(unit)].item() == pytest.approx(expected, rel=1e-9), unit
        prune_units(model, random_removal(model, family, rnd))


# -- 3. pipelines choose the family's kinds ---------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_score_and_prune_pipeline_defaults_to_the_family_kinds():
    from dit_prune.pipelines.prune import score_and_prune_pipeline

    model = new.build("flux", 0)
    cls = diffusers.FluxPipeline
    absent = {n: None for n in cls._get_signature_keys(cls)[0]
              if n not in ("transformer", "scheduler")}
    pipe = cls(transformer=model, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
               **absent)
    result = score_and_prune_pipeline(pipe, "magnitude", 1, None)
    kinds = adapter_for(model).default_kinds
    assert {u.kind for u in result.candidates} == set(kinds)
    assert sorted(u.kind for u in result.removed) == sorted(kinds)  # one of each kind
    assert result.pipeline.transformer is not model
    with pytest.raises(DitPruneError, match=r"FluxTransformer2DModel has no units of kind "
                                            r"'head'; its kinds: joint_head") as info:
        score_and_prune_pipeline(pipe, "magnitude", 1, None, kinds=("head", "neuron"))
    assert "\n" not in str(info.value)


# -- 4. activation-contrast's statistic on conv and two-stream sites ---------------------------


def contrast_statistic(model: torch.nn.Module, units: list[Unit], data: dict) -> torch.Tensor:
    """(B, U) activation-contrast's per-sample RMS contribution from one forward."""
    from dit_prune.scorers.contrast import _TrajectoryStats

    batch = next(v for v in data.values() if torch.is_tensor(v)).shape[0]
    stats = _TrajectoryStats(SimpleNamespace(model=model), units, batch, cutoff=1000)
    stats.current = (torch.arange(batch), 10)
    stats.seen.add(10)
    with observe(model, units, stats._record):
        forward(model, data)
    return stats.per_unit("all").float()


def by_hand(model: torch.nn.Module, units: list[Unit], data: dict) -> torch.Tensor:
    """(B, U): sqrt of the sum over the unit's down sites of the mean square (over tokens or
    conv positions, and output channels) of its input slice times its weight columns."""
    with capture(model, units) as record:
        forward(model, data)
    columns = []
    for unit in units:
        sites = record._find(unit)  # [(slot index, input columns)], one per down site
        total = torch.zeros(())
        for s, cols in sites:
            slot = record.slots[s]
            x = record.inputs[s][0].narrow(slot.dim, cols.start, len(cols))
            x = x.flatten(2).transpose(1, 2) if x.ndim == 4 else x  # (B, T, w)
            weight = slot.layer.weight.detach().flatten(1)[:, cols.start:cols.stop]  # (O, w)
            total = total + (x @ weight.T).pow(2).mean((1, 2))  # (B,)
        columns.append(total.sqrt())
    return torch.stack(columns, 1)  # (B, U)


@pytest.mark.parametrize("family", ["sana", "sd3.5", "flux"])
def test_contrast_statistic_on_conv_and_two_stream_sites(family):
    model = new.build(family, 3)
    kinds = adapter_for(model).kinds
    present = every_unit(model)
    units = [u for k in kinds for u in [u for u in present if u.kind == k][:2]]
    data = new.batch_inputs(model)
    torch.testing.assert_close(contrast_statistic(model, units, data),
                               by_hand(model, units, data), rtol=1e-4, atol=1e-7)


def test_contrast_refuses_a_wide_conv_down_projection():
    from dit_prune.scorers.contrast import _TrajectoryStats

    model = copy.deepcopy(new.build("sana", 0))
    ff = model.transformer_blocks[0].ff
    ff.conv_point = torch.nn.Conv2d(ff.conv_point.in_channels, ff.conv_point.out_channels, 3,
                                    padding=1, bias=False)
    with pytest.raises(DitPruneError, match="SanaTransformer2DModel neuron units write through "
                                            "a 3x3 convolution") as info:
        _TrajectoryStats(SimpleNamespace(model=model), [Unit("neuron", 0, 0)], 1, cutoff=500)
    assert "\n" not in str(info.value)


def test_a_kind_the_family_lacks_is_named_with_the_model_s_kinds() -> None:
    from dit_prune.pipelines.tiny import tiny_sd3_pipeline
    from dit_prune.pruning.structural import prune_units
    from dit_prune.units import Unit

    model = tiny_sd3_pipeline().transformer
    with pytest.raises(DitPruneError, match=r"SD3Transformer2DModel has no units of kind 'head'; "
                                            r"its kinds: joint_head, neuron, context_neuron"):
        prune_units(model, [Unit("head", 0, 0)])
