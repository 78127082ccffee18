"""Units: addressing, enumeration, validation (docs/definitions.md#units)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from dit_prune.errors import DitPruneError
from dit_prune.models import new_dit
from dit_prune.structure import read_structure, resize_to_structure
from dit_prune.units import Unit, adapter_for, enumerate_units, group_units, locate


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return new_dit("tiny", 10, 8, 1).eval()


def test_enumerate_counts_and_order(tiny):
    units = enumerate_units(tiny)
    assert len(units) == 4 * (4 + 512)
    assert units[:4] == [Unit("head", 0, i) for i in range(4)]
    assert units[4] == Unit("neuron", 0, 0)
    assert units == sorted(units, key=lambda u: (u.block, u.kind != "head", u.index))
    assert len(enumerate_units(tiny, ["head"])) == 16


def test_locate_head_and_neuron_columns(tiny):
    layer, cols = locate(tiny, Unit("head", 1, 2))
    assert layer is tiny.transformer_blocks[1].attn1.to_out[0]
    assert cols == range(64, 96)
    layer, cols = locate(tiny, Unit("neuron", 3, 7))
    assert layer is tiny.transformer_blocks[3].ff.net[2]
    assert cols == range(7, 8)


def test_unsupported_model_and_missing_units(tiny):
    with pytest.raises(DitPruneError, match="unsupported model: Linear"):
        enumerate_units(nn.Linear(2, 2))
    with pytest.raises(DitPruneError, match="does not exist"):
        group_units(tiny, [Unit("head", 9, 0)])
    with pytest.raises(DitPruneError, match="does not exist"):
        group_units(tiny, [Unit("head", 0, 4)])
    with pytest.raises(DitPruneError, match="no units of kind 'cross_head'"):
        enumerate_units(tiny, ["cross_head"])
    with pytest.raises(DitPruneError, match="unknown unit kind"):
        Unit("channel", 0, 0)


def test_pruned_model_keeps_original_numbering():
    model = new_dit("tiny", 10, 8, 1)
    kept = read_structure(model)["kept"]
    kept["head"][0] = [0, 2, 3]
    kept["neuron"][1] = list(range(1, 512))
    resize_to_structure(model, {"kept": kept})
    units = enumerate_units(model)
    assert Unit("head", 0, 1) not in units and Unit("neuron", 1, 0) not in units
    assert locate(model, Unit("head", 0, 2))[1] == range(32, 64)  # current position 1
    assert locate(model, Unit("neuron", 1, 5))[1] == range(4, 5)
    with pytest.raises(DitPruneError, match="does not exist"):
        locate(model, Unit("head", 0, 1))


def test_adapter_kinds(tiny):
    assert adapter_for(tiny).kinds == ("head", "neuron")


@given(st.sampled_from(["head", "neuron", "cross_head"]), st.integers(0, 50), st.integers(0, 5000))
def test_unit_json_roundtrip_and_hash(kind, block, index):
    unit = Unit(kind, block, index)
    assert Unit.from_json(unit.to_json()) == unit
    assert Unit.from_json({"kind": kind, "block": block, "index": index}) == unit
    assert hash(unit) == hash(Unit(kind, block, index))
    with pytest.raises(AttributeError):
        unit.index = 1  # type: ignore[misc]
