"""Smoke runs of the ablation scripts (scripts/*.py --smoke): each writes its table and plot.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_ablation_scripts.py -q
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """Import scripts/<name>.py as a module (scripts/ is not a package)."""
    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def table_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith("| ")]


def test_common_aggregation_and_formatting() -> None:
    common = load_script("ablation_common")
    mean, std, count = common.mean_std([0.2, 0.4, None, float("nan")])
    assert count == 2 and mean == pytest.approx(0.3) and std == pytest.approx(0.1414, abs=1e-3)
    assert common.fmt((0.25, 0.05, 3), "copy_rate") == "25.0 ± 5.0%"
    assert common.fmt((21.0, 0.0, 1), "fd") == "21.0"
    assert common.fmt((0.0, 0.0, 0), "fd") == "—"
    assert common.parse_list("0.1, 0.2", float) == [0.1, 0.2]


def test_ablate_budget_smoke(tmp_path: Path) -> None:
    result = load_script("ablate_budget").main(["--smoke", "--out", str(tmp_path)])
    rows = table_lines(result["table"])
    assert any("unpruned" in r for r in rows)
    for recovery in ("none", "finetune:unused"):
        assert any(f"| {recovery} | 0.25 | **magnitude**" in r for r in rows), recovery
        assert any(f"| {recovery} | 0.25 | **random**" in r for r in rows), recovery
    assert len(result["plots"]) == 2
    controls = table_lines(tmp_path / "budget_recovery_controls.md")
    assert len(controls) == 2 and controls[1].startswith("| unpruned + finetune:unused | 1 |")
    assert all(p.is_file() and p.stat().st_size > 0 for p in result["plots"])
    # cached: a second call reads the stored reports instead of recomputing
    again = load_script("ablate_budget").main(["--smoke", "--out", str(tmp_path)])
    assert table_lines(again["table"]) == rows


def test_ablate_timesteps_smoke(tmp_path: Path) -> None:
    result = load_script("ablate_timesteps").main(["--smoke", "--out", str(tmp_path)])
    rows = table_lines(result["table"])
    for dist in ("`uniform`", "`uniform:700,1000`", "`random`"):
        assert any(dist in r for r in rows)
    assert len(table_lines(result["overlap"])) == 2  # header + one pair
    assert result["plot"].is_file()


def test_transition_smoke(tmp_path: Path) -> None:
    result = load_script("transition").main(["--smoke", "--out", str(tmp_path)])
    rows = table_lines(result["table"])
    assert len(rows) == 3 and rows[1].startswith("| 10 | 20 | 2 |")  # halves A and B
    assert rows[2].startswith("| 600 | 20 | 1 |")  # the pool cannot hold two halves of 600
    assert rows[2].split("|")[7].strip() == "—"  # so no FD between halves
    pruning = table_lines(result["pruning_table"])
    assert any("unpruned" in r for r in pruning) and any("random" in r for r in pruning)
    assert result["plot"].is_file()


def test_disjoint_halves_are_balanced_and_disjoint() -> None:
    import torch

    transition = load_script("transition")
    labels = torch.arange(200) % 10
    a, b = transition.disjoint_halves(labels, 20, seed=3)
    assert len(a) == len(b) == 20 and not set(a) & set(b)
    assert torch.bincount(labels[a]).tolist() == [2] * 10
    assert torch.bincount(labels[b]).tolist() == [2] * 10
    (only,) = transition.disjoint_halves(labels, 150, seed=3)
    assert len(only) == 150
    uneven = torch.cat([torch.arange(100) % 10, torch.zeros(5, dtype=torch.long)])  # 15 zeros
    (whole,) = transition.disjoint_halves(uneven, 105, seed=0)
    assert whole.tolist() == list(range(105))
    assert len(transition.disjoint_halves(uneven, 60, seed=0)) == 1  # 2 x 6 of class 9 > 10


def test_robustness_smoke(tmp_path: Path) -> None:
    result = load_script("robustness").main(["--smoke", "--out", str(tmp_path)])
    rows = table_lines(result["table"])
    assert len(rows) == 1 + 6  # header + 3 models x (train, held-out)
    assert any("unpruned" in r and "held-out" in r for r in rows)
    assert result["plot"].is_file()


def test_scorer_specs_carry_typed_options() -> None:
    common = load_script("ablation_common")
    assert common.parse_scorer_spec("taylor-gap") == ("taylor-gap", {})
    assert common.parse_scorer_spec("taylor-gap+quality_weight=0.5+batches=2+timesteps=beta:1,2") \
        == ("taylor-gap", {"quality_weight": 0.5, "batches": 2, "timesteps": "beta:1,2"})
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        common.parse_scorer_spec("taylor-gap+oops")


def test_head_effects_smoke(tmp_path: Path) -> None:
    result = load_script("head_effects").main(["--smoke", "--out", str(tmp_path)])
    rows = table_lines(result["table"])
    assert len(rows) == 1 + 4  # header + the 4 heads measured in smoke mode
    oracles = table_lines(result["oracles"])
    assert any("oracle: copy, FD-feasible" in r for r in oracles)
    assert all(("mitigated" in r) or ("not beyond" in r) or ("quality" in r) for r in oracles[1:])
    assert result["plot"].is_file()


def test_regimes_smoke(tmp_path: Path) -> None:
    result = load_script("regimes").main(["--smoke", "--out", str(tmp_path), "--checkpoints",
                                          "checkpoints/digits-memorized", "--scorers",
                                          "taylor-gap"])
    assert result == 0
    table = (tmp_path / "regimes.md").read_text()
    assert "| digits-memorized | taylor-gap | 2 |" in table
    data = json.loads((tmp_path / "regimes.json").read_text())
    entry = data[0]["reports"][0]["budgets"][0]
    assert len(entry["equal_quality"]["per_seed"]) == 2  # the smoke run's two random seeds
    # --from-reports tabulates the stored reports again without running anything
    (tmp_path / "regimes.md").unlink()
    again = load_script("regimes").main(["--smoke", "--out", str(tmp_path), "--checkpoints",
                                         "checkpoints/digits-memorized", "--scorers",
                                         "taylor-gap", "--from-reports"])
    assert again == 0 and (tmp_path / "regimes.md").read_text().startswith(table.rstrip("\n")[:200])
    with pytest.raises(SystemExit, match="no stored report"):
        load_script("regimes").main(["--smoke", "--out", str(tmp_path), "--checkpoints",
                                     "checkpoints/digits-memorized", "--scorers", "cond-gap",
                                     "--from-reports"])


def test_head_subsets_smoke_resumes_to_the_same_rows(tmp_path: Path) -> None:
    script = load_script("head_subsets")
    result = script.main(["--smoke", "--out", str(tmp_path)])
    log = tmp_path / "subsets.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 17 and rows[0]["subset"] == []  # the unpruned model and 16 single heads
    assert (tmp_path / "head_subsets.png").is_file()
    assert "| 1 | all subsets (random) | 16 subsets |" in result["table"].read_text()
    log.write_text("\n".join(log.read_text().splitlines()[:5]) + "\n")  # interrupted
    script.main(["--smoke", "--out", str(tmp_path)])
    again = [json.loads(line) for line in log.read_text().splitlines()]
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in again] == strip


def test_head_subsets_refuses_what_it_cannot_measure(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    script = load_script("head_subsets")
    with pytest.raises(SystemExit, match="another steps"):  # resumed with other options
        script.main(["--smoke", "--out", str(tmp_path / "a")])
        script.main(["--max-size", "1", "--seeds", "1000-1029", "--steps", "4",
                     "--out", str(tmp_path / "a")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:  # refused while parsing, in one line
        script.main(["--smoke", "--checkpoint", str(tmp_path / "nope"),
                     "--out", str(tmp_path / "b")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().endswith("nope: no such checkpoint directory")
    assert not (tmp_path / "b").exists()
    with pytest.raises(SystemExit, match="is not below the model's 16 heads"):
        script.main(["--max-size", "16", "--out", str(tmp_path / "c")])
    with pytest.raises(SystemExit):  # argparse: --max-size must be at least 1
        script.main(["--max-size", "0", "--out", str(tmp_path / "d")])
