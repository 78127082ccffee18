"""Selection: top scores first, budgets per mode, one unit kept per block, stable ties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dit_prune.errors import DitPruneError
from dit_prune.models import new_dit
from dit_prune.pruning import prune_units, select_units, unit_cost
from dit_prune.units import Unit, adapter_for, enumerate_units


def grid(blocks=2, heads=4, neurons=8) -> list[Unit]:
    units = []
    for b in range(blocks):
        units += [Unit("head", b, i) for i in range(heads)]
        units += [Unit("neuron", b, i) for i in range(neurons)]
    return units


def test_heads_mode_takes_top_scores():
    units = grid()
    scores = torch.zeros(len(units))
    scores[units.index(Unit("head", 1, 2))] = 5.0
    scores[units.index(Unit("head", 0, 3))] = 4.0
    assert select_units(units, scores, 0.25, mode="heads") == [Unit("head", 1, 2),
                                                               Unit("head", 0, 3)]


def test_both_mode_applies_the_fraction_to_each_kind():
    units = grid()
    chosen = select_units(units, torch.rand(len(units)), 0.25, mode="both")
    kinds = [u.kind for u in chosen]
    assert kinds.count("head") == 2 and kinds.count("neuron") == 4


def test_neurons_mode_ignores_heads():
    units = grid()
    chosen = select_units(units, torch.arange(len(units), dtype=torch.float), 0.5, mode="neurons")
    assert {u.kind for u in chosen} == {"neuron"} and len(chosen) == 8


def test_keeps_one_head_and_one_neuron_per_block():
    units = grid(blocks=2, heads=2, neurons=2)
    scores = torch.tensor([9.0, 8.0, 7.0, 6.0, 0.0, 0.0, 0.0, 0.0])  # block 0 scores highest
    chosen = select_units(units, scores, 0.5, mode="both")
    assert Unit("head", 0, 0) in chosen and Unit("head", 0, 1) not in chosen
    assert Unit("neuron", 0, 0) in chosen and Unit("neuron", 0, 1) not in chosen
    assert len([u for u in chosen if u.kind == "head"]) == 2  # the next best came from block 1


def test_ties_are_broken_by_unit_order():
    units = grid()
    chosen = select_units(units, torch.ones(len(units)), 0.25, mode="heads")
    assert chosen == [Unit("head", 0, 0), Unit("head", 0, 1)]
    reordered = list(reversed(units))
    assert select_units(reordered, torch.ones(len(units)), 0.25, mode="heads") == [
        Unit("head", 1, 3), Unit("head", 1, 2)]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=24, max_size=24),
       st.floats(0.07, 0.99), st.sampled_from(["heads", "neurons", "both"]))  # >= 1 of 8 heads
def test_deterministic_and_within_budget(raw, budget, mode):
    units = grid()
    scores = torch.tensor(raw, dtype=torch.float)
    heads, neurons = round(budget * 8), round(budget * 16)  # 2 blocks of 4 heads, 8 neurons
    too_many = {"heads": heads > 6, "neurons": neurons > 14, "both": heads > 6 or neurons > 14}
    if too_many[mode]:  # every block keeps one unit of each kind: refused, not cut silently
        with pytest.raises(DitPruneError, match="can go: every block keeps at least one"):
            select_units(units, scores, budget, mode=mode)
        return
    first = select_units(units, scores, budget, mode=mode)
    assert first == select_units(units, scores.clone(), budget, mode=mode)
    assert len(set(first)) == len(first)
    for b in range(2):
        assert sum(u.block == b and u.kind == "head" for u in first) <= 3
        assert sum(u.block == b and u.kind == "neuron" for u in first) <= 7
    values = {u: float(s) for u, s in zip(units, scores, strict=True)}
    assert [values[u] for u in first] == sorted((values[u] for u in first), reverse=True)


def test_params_mode_stays_within_the_parameter_budget():
    model = new_dit("tiny", 10, 8, 1)
    units = enumerate_units(model)
    scores = torch.rand(len(units), generator=torch.Generator().manual_seed(0))
    chosen = select_units(units, scores, 0.2, mode="params", model=model)
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    total = sum(unit_cost(adapter, blocks[u.block], u.kind) for u in units)
    removed = sum(unit_cost(adapter, blocks[u.block], u.kind) for u in chosen)
    assert 0.19 * total < removed <= 0.2 * total
    plan = prune_units(model, chosen)
    assert plan.params_before - plan.params_after == removed


@pytest.mark.parametrize("budget", [0.0, 1.0, 1.5, -0.1, float("nan"), "abc"])
def test_budget_outside_unit_interval_is_one_line_error(budget):
    with pytest.raises(DitPruneError) as info:
        select_units(grid(), torch.rand(24), budget)
    assert "\n" not in str(info.value)


def test_bad_inputs():
    units = grid()
    with pytest.raises(DitPruneError, match="aligned"):
        select_units(units, torch.rand(3), 0.2)
    with pytest.raises(DitPruneError, match="NaN"):
        select_units(units, torch.full((24,), float("nan")), 0.2)
    with pytest.raises(DitPruneError, match="budget mode"):
        select_units(units, torch.rand(24), 0.2, mode="layers")
    with pytest.raises(DitPruneError, match="needs the model"):
        select_units(units, torch.rand(24), 0.2, mode="params")
    with pytest.raises(DitPruneError, match="duplicates"):
        select_units(units + units[:1], torch.rand(25), 0.2)
    with pytest.raises(DitPruneError, match="no head"):
        select_units([Unit("neuron", 0, i) for i in range(4)], torch.rand(4), 0.5, mode="heads")


def test_block_sizes_come_from_the_model_when_given():
    model = new_dit("tiny", 10, 8, 1)
    partial = [Unit("head", 0, 0), Unit("head", 0, 1)]  # a subset of block 0's four heads
    with pytest.raises(DitPruneError, match="at most 1 can go"):  # block 0 seen as 2 heads
        select_units(partial, torch.tensor([1.0, 2.0]), 0.99, mode="heads")
    assert len(select_units(partial, torch.tensor([1.0, 2.0]), 0.99, mode="heads",
                            model=model)) == 2


def test_a_budget_that_removes_no_unit_names_the_smallest_that_does():
    with pytest.raises(DitPruneError, match="removes none; the smallest fraction that removes one "
                                            "is 0.063") as info:
        select_units(grid(), torch.rand(24), 0.001, mode="heads")  # 8 heads: 0.063 x 8 > 0.5
    assert "\n" not in str(info.value)
    assert len(select_units(grid(), torch.rand(24), 0.063, mode="heads")) == 1


def test_whole_numbers_are_unit_counts():
    from dit_prune.pruning.selection import check_budget_for, parse_budgets

    assert parse_budgets("0.25, 3") == (0.25, 3)
    assert len(select_units(grid(), torch.rand(24), 3, mode="heads")) == 3
    assert len(select_units(grid(), torch.rand(24), 2, mode="both")) == 4  # 2 of each kind
    with pytest.raises(DitPruneError, match="exceeds the 8 head units"):
        select_units(grid(), torch.rand(24), 9, mode="heads")
    with pytest.raises(DitPruneError, match="takes a fraction"):
        check_budget_for(2, "params", {"head": 8})
    for bad in ("1.0", "0", "-2", "2.5", "x", ""):
        with pytest.raises(DitPruneError):
            parse_budgets(bad)
