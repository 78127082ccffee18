"""The `given` scorer: named units pruned first in the order named, and the run's refusals of
budgets and units it cannot honour, before any sampling."""

from __future__ import annotations

import pytest
import torch

from dit_prune.cli import main
from dit_prune.errors import DitPruneError
from dit_prune.models import new_dit
from dit_prune.pruning import select_units
from dit_prune.run import RunConfig
from dit_prune.scorers import get_scorer
from dit_prune.scorers.given import parse_units
from dit_prune.units import HEAD, NEURON, Unit, enumerate_units


def test_named_heads_are_selected_in_the_order_named() -> None:
    model = new_dit("tiny", 10, 8, 1)
    units = enumerate_units(model, [HEAD])
    scores = get_scorer("given", units="3.1,head:0.2,1.0").compute(model, units, None).scores
    picked = [select_units(units, scores, k, mode="heads", model=model) for k in (1, 2, 3)]
    assert picked[0] == [Unit(HEAD, 3, 1)]
    assert sorted(picked[1]) == [Unit(HEAD, 0, 2), Unit(HEAD, 3, 1)]
    assert sorted(picked[2]) == [Unit(HEAD, 0, 2), Unit(HEAD, 1, 0), Unit(HEAD, 3, 1)]


def test_neurons_by_kind_and_unknown_units_refused() -> None:
    assert parse_units("neuron:2.17, 0.1") == (Unit(NEURON, 2, 17), Unit(HEAD, 0, 1))
    assert parse_units("2.0 head:2.1;2.3") == (Unit(HEAD, 2, 0), Unit(HEAD, 2, 1), Unit(HEAD, 2, 3))
    for bad, text in [("", "needs units="), ("2.x", "cannot read unit '2.x'"),
                      ("head:1.1,1.1", "head:1.1 is named twice"),
                      ("bogus:1.1", "unknown unit kind")]:
        with pytest.raises(DitPruneError, match=text):
            get_scorer("given", units=bad)
    model = new_dit("tiny", 10, 8, 1)
    units = enumerate_units(model, [HEAD])
    with pytest.raises(DitPruneError, match="head:9.0 is not among the units scored"):
        get_scorer("given", units="1.0,9.0").compute(model, units, None)
    raw = get_scorer("given", units="0.0").compute(model, units, None).raw
    assert torch.count_nonzero(raw) == 1


def test_run_refuses_budgets_beyond_the_list() -> None:
    base = dict(checkpoint="checkpoints/digits-duplicated", out="runs/x", scorer="given",
                scorer_options={"units": "2.2,2.3"})
    RunConfig(budgets=(1, 2), **base)
    for budgets, text in [((3,), "up to 2, got 3"), ((0.1,), "got 0.1")]:
        with pytest.raises(DitPruneError, match=text):
            RunConfig(budgets=budgets, **base)
    for mode in ("both", "params"):  # both: a budget of each kind, the rest ties at 0
        with pytest.raises(DitPruneError, match=f"not {mode}"):
            RunConfig(budgets=(1,), budget_mode=mode, **base)


def test_cli_refuses_a_missing_unit_before_sampling(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    code = main(["run", "checkpoints/digits-duplicated", "--scorer", "given", "--scorer-option",
                 "units=2.2,7.1", "--budget", "2", "--seeds", "0-3", "--steps", "2",
                 "--out", str(out)])
    assert code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "head:7.1 is not among the units scored" in err[0], err
    assert not (out / "samples").exists()  # refused before any sampling


def test_the_report_names_the_units_each_budget_removed(tmp_path) -> None:
    import json

    out = tmp_path / "run"
    code = main(["run", "checkpoints/digits-duplicated", "--scorer", "given", "--scorer-option",
                 "units=2.2 2.3", "--budget", "1,2", "--seeds", "0-19", "--steps", "2",
                 "--random-budgets", "1,2", "--random-seeds", "0", "--retrigger-targets", "0",
                 "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert [b["removed"] for b in report["budgets"]] == [[["head", 2, 2]],
                                                         [["head", 2, 2], ["head", 2, 3]]]
    assert "- budget 2: head 2.2, head 2.3" in (out / "report.md").read_text()


def test_no_ratio_is_claimed_when_random_removes_no_copies() -> None:
    from dit_prune.run.report import equal_quality_sentence

    report = {"before": {"copy_rate": 0.2, "copy_interval": [0.1, 0.3]}, "fd_name": "FD"}
    eq = {"target": "all", "beats": False, "copy_cut_ratio": None, "max_cut_ratio": None,
          "clamped": True, "rate": 0.2, "interval": [0.2, 0.2], "per_seed": [0.2],
          "scorer_rate": 0.1, "scorer_interval": [0.05, 0.15], "fd": 10.0,
          "num_random_seeds": 1}
    text = equal_quality_sentence(report, eq, {"relative": 0.0, "interval": [-0.1, 0.1]})
    assert "random pruning removes no copies at this quality, so no ratio is given" in text

