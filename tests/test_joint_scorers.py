"""Joint selection: `learned-gates` and the `iterative` wrapper (issue 13, Build items 1 and 2).

Constructed case with a known answer: on checkpoints/digits-memorized, only head P = 1.1 is
fine-tuned (gradient masks on its q/k/v rows and to_out columns) to reproduce three synthetic
images (stripes x2, checkerboard) labelled 7, 8, 9, with distillation keeping the output on other
digits. Then head Q = 1.3 is made P's stand-in: Q gets P's q/k/v rows, and the to_out columns
are split 98% / 2% between P and Q (the model's output is unchanged). Removing Q alone leaves 98%
of the copy and does almost nothing; once P is gone, Q carries all that is left of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from dit_prune.checkpoint import load_dit
from dit_prune.cli import main as cli_main
from dit_prune.data import digits_split
from dit_prune.errors import DitPruneError
from dit_prune.models import new_dit
from dit_prune.pruning.selection import select_units
from dit_prune.scorers import CalibrationData, get_scorer, load_scores
from dit_prune.units import Unit, enumerate_units
from tests.conftest import CHECKPOINTS
from tests.planting import EXTRA_LABELS, extra_images, plant_head

P, Q = Unit("head", 1, 1), Unit("head", 1, 3)
SHARE_Q = 0.02  # Q's share of the planted head's output


@dataclass
class Constructed:
    model: nn.Module
    scheduler: object
    data: CalibrationData  # train = the 3 planted images, held-out = 32 held-out digits
    units: list[Unit]  # the 16 heads


@pytest.fixture(scope="module")
def constructed() -> Constructed:
    return build_constructed()


def build_constructed() -> Constructed:
    """The planted head P and its 2% stand-in Q (module docstring)."""
    base, scheduler, meta = load_dit(CHECKPOINTS / "digits-memorized")
    split = digits_split()
    used = set(meta.extra["data"]["pool_indices"])
    anchors = torch.tensor([i for i in range(len(split.pool_images)) if i not in used][:128])
    model = plant_head(base, P, split.pool_images[anchors], split.pool_labels[anchors],
                       steps=80)
    attn = model.transformer_blocks[P.block].attn1
    d = attn.to_out[0].in_features // attn.heads
    p, q = slice(P.index * d, (P.index + 1) * d), slice(Q.index * d, (Q.index + 1) * d)
    with torch.no_grad():
        for layer in (attn.to_q, attn.to_k, attn.to_v):
            layer.weight[q], layer.bias[q] = layer.weight[p], layer.bias[p]
        out = attn.to_out[0].weight  # (D, D_in)
        out[:, q] = SHARE_Q * out[:, p]
        out[:, p] *= 1 - SHARE_Q
    data = CalibrationData(extra_images(), torch.tensor(EXTRA_LABELS),
                           split.heldout_images[:32], split.heldout_labels[:32])
    return Constructed(model, scheduler, data, enumerate_units(model, ["head"]))


def order_of(units: list[Unit], scores: torch.Tensor) -> list[Unit]:
    """Units, highest score first (ties: unit order)."""
    ranked = torch.argsort(-scores, stable=True).tolist()
    return [units[i] for i in ranked]


@pytest.fixture(scope="module")
def small():
    """A fresh tiny DiT (heads and neurons) and a few digits."""
    torch.manual_seed(0)
    model = new_dit("tiny", num_classes=10, sample_size=8, channels=1).eval()
    split = digits_split()
    data = CalibrationData(split.pool_images[:6], split.pool_labels[:6],
                           split.heldout_images[:6], split.heldout_labels[:6])
    return model, data


# ---------------------------------------------------------------- known answers


def test_constructed_case_is_what_it_claims(constructed):
    """Ablation: P alone carries the copy; Q alone does (almost) nothing, but Q after P does."""
    scorer = get_scorer("ablation-gap", batches=2, progress=False)
    one_shot = scorer.compute(constructed.model, constructed.units, constructed.data)
    order = order_of(constructed.units, one_shot.raw)
    assert order[0] == P and order.index(Q) >= 3
    assert one_shot.raw[constructed.units.index(P)] > 1.0  # the copy: loss rise on the extras


def test_learned_gates_ranks_the_planted_head_first(constructed):
    scorer = get_scorer("learned-gates", steps=30, batches=2, progress=False)
    result = scorer.compute(constructed.model, constructed.units, constructed.data,
                            constructed.scheduler)
    order = order_of(constructed.units, result.scores)
    assert order[0] == P
    assert Q in order[:3]  # the stand-in is closed with it, though alone it does nothing
    assert select_units(constructed.units, result.scores, 1) == [P]


def test_iterative_picks_the_stand_in_one_shot_misses(constructed):
    model, units, data = constructed.model, constructed.units, constructed.data
    before = model(data.train_images, timestep=torch.tensor([10, 500, 900]),
                   class_labels=data.train_labels).sample
    one_shot = get_scorer("ablation-gap", batches=2, progress=False).score(model, units, data)
    scorer = get_scorer("iterative", inner="ablation-gap", group=1, rounds=2, batches=2,
                        progress=False)
    result = scorer.compute(model, units, data)
    assert order_of(units, result.scores)[:2] == [P, Q]
    assert select_units(units, result.scores, 2) == [P, Q]
    assert Q not in select_units(units, one_shot, 2)
    # scores encode the pick order; raw = the inner (normalized) score when picked
    assert result.scores.max() == len(units) and len(set(result.scores.tolist())) == len(units)
    assert result.raw[units.index(Q)] > 0
    after = model(data.train_images, timestep=torch.tensor([10, 500, 900]),
                  class_labels=data.train_labels).sample
    assert torch.equal(before, after)  # the ablations were undone


def test_iterative_one_round_is_the_one_shot_order(constructed):
    model, units, data = constructed.model, constructed.units, constructed.data
    one_shot = get_scorer("taylor-gap", batches=1, progress=False).score(model, units, data)
    result = get_scorer("iterative", inner="taylor-gap", group=3, rounds=1, batches=1,
                        progress=False).compute(model, units, data)
    assert order_of(units, result.scores) == order_of(units, one_shot)
    assert torch.equal(result.raw, one_shot)


# ---------------------------------------------------------------- alignment, determinism


@pytest.mark.parametrize("relaxation", ["hard-concrete", "sigmoid"])
def test_learned_gates_finite_aligned_deterministic(small, relaxation):
    model, data = small
    units = enumerate_units(model, ["head", "neuron"])[::7]  # heads and neurons, 4 blocks
    options = dict(steps=3, batches=1, relaxation=relaxation, progress=False)
    first = get_scorer("learned-gates", seed=1, **options).compute(model, units, data)
    again = get_scorer("learned-gates", seed=1, **options).compute(model, units, data)
    other = get_scorer("learned-gates", seed=2, **options).compute(model, units, data)
    assert first.units == units and first.scores.shape == (len(units),)
    assert torch.isfinite(first.scores).all() and torch.isfinite(first.raw).all()
    assert torch.equal(first.scores, again.scores) and torch.equal(first.raw, again.raw)
    assert not torch.equal(first.raw, other.raw)
    chunked = get_scorer("learned-gates", seed=1, batch_size=4, **options).compute(
        model, units, data)
    assert torch.allclose(chunked.raw, first.raw, atol=1e-4)  # batch size: memory only
    shuffled = list(reversed(units))
    reverse = get_scorer("learned-gates", seed=1, **options).compute(model, shuffled, data)
    assert torch.equal(reverse.raw, first.raw.flip(0))  # scores follow the units given


def test_iterative_finite_aligned_deterministic(small):
    model, data = small
    units = enumerate_units(model, ["head"])
    options = dict(inner="taylor-gap", rounds=3, batches=1, progress=False)
    first = get_scorer("iterative", **options).compute(model, units, data)
    again = get_scorer("iterative", **options).compute(model, units, data)
    assert first.units == units and torch.isfinite(first.scores).all()
    assert torch.equal(first.scores, again.scores)
    picked = order_of(units, first.scores)[:3]
    assert select_units(units, first.scores, 3) == picked


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("name, options, message", [
    ("learned-gates", {"steps": 0}, "steps must be a positive integer"),
    ("learned-gates", {"steps": 2.5}, "steps must be a positive integer"),
    ("learned-gates", {"lr": 0}, "lr must be > 0"),
    ("learned-gates", {"distill_weight": float("nan")}, "distill_weight must be a finite"),
    ("learned-gates", {"sparsity_weight": -1}, "sparsity_weight must be a finite"),
    ("learned-gates", {"init_open": 1.0}, "init_open must lie strictly between 0 and 1"),
    ("learned-gates", {"relaxation": "gumbel"}, "unknown relaxation 'gumbel'"),
    ("learned-gates", {"temperature": 1}, "unknown option(s) ['temperature']"),
    ("iterative", {"group": 0}, "group must be a positive integer"),
    ("iterative", {"rounds": True}, "rounds must be a positive integer"),
    ("iterative", {"inner": "nope"}, "inner scorer must be one of"),
    ("iterative", {"inner": "iterative"}, "inner scorer must be one of"),
    ("iterative", {"inner_options": "order=2"}, "inner_options must be a dict"),
    ("iterative", {"inner_options": {"seed": 1}}, "inner_options ['seed'] are shared options"),
    ("iterative", {"inner_options": {"bogus": 1}}, "unknown option(s) ['bogus']"),
    ("iterative", {"inner_options": {"order": 3}}, "order must be 1 or 2"),
])
def test_bad_options_one_line(name, options, message):
    with pytest.raises(DitPruneError) as info:
        get_scorer(name, **options)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_scoring_input_one_line(small):
    model, data = small
    heads = enumerate_units(model, ["head"])
    with pytest.raises(DitPruneError, match=r"rounds \* group = 20 exceeds the 16 units"):
        get_scorer("iterative", rounds=10, group=2, progress=False).compute(model, heads, data)
    with pytest.raises(DitPruneError, match="duplicates"):
        get_scorer("iterative", rounds=1, progress=False).compute(model, heads + heads[:1], data)
    with pytest.raises(DitPruneError, match="scores only head, joint_head, dual_head, single_head"):
        get_scorer("iterative", inner="ye2025", rounds=1, progress=False).compute(
            model, enumerate_units(model, ["neuron"])[:4], data)
    with pytest.raises(DitPruneError, match="does not exist"):
        get_scorer("learned-gates", steps=1, progress=False).compute(
            model, [Unit("head", 9, 0)], data)


def test_score_command_takes_inner_options(tmp_path):
    out = tmp_path / "run"
    argv = ["score", str(CHECKPOINTS / "digits-memorized"), "--out", str(out), "--scorer",
            "iterative", "--kinds", "head", "--batches", "1", "--max-images", "4",
            "--device", "cpu", "--option", "rounds=2", "--option", 'inner_options={"order": 1}']
    assert cli_main(argv) == 0
    saved = load_scores(out)
    assert saved.config["specific"] == {"inner": "taylor-gap", "group": 1, "rounds": 2,
                                        "inner_options": {"order": 1}}
    assert sorted(saved.scores.tolist())[-2:] == [15.0, 16.0]
