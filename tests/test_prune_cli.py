"""`dit-prune prune`: one-line errors with exit status 2, and a full run on a tiny model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import diffusers
import pytest
import torch
from diffusers import DiTTransformer2DModel
from safetensors.torch import save_file

from dit_prune.checkpoint import load_dit, save_checkpoint
from dit_prune.cli import main
from dit_prune.models import disable_block_label_dropout
from dit_prune.units import Unit, enumerate_units


def tiny_digits_dit() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_layers=2, num_attention_heads=4, attention_head_dim=8,
                                  in_channels=1, out_channels=1, sample_size=8, patch_size=2,
                                  num_embeds_ada_norm=10, norm_num_groups=1)
    disable_block_label_dropout(model)
    return model.eval()


@pytest.fixture()
def setup(tmp_path):
    model = tiny_digits_dit()
    checkpoint = save_checkpoint(
        model, diffusers.DDPMScheduler(num_train_timesteps=1000), tmp_path / "base",
        extra={"data": {"source": "digits", "pool_indices": list(range(0, 40))}},
    )
    units = enumerate_units(model)
    scores = tmp_path / "scores"
    scores.mkdir()
    values = torch.linspace(1.0, 0.0, len(units), dtype=torch.float64)  # (U,) first units first
    save_file({"scores": values}, str(scores / "scores.safetensors"))
    sidecar = {"units": [u.to_json() for u in units], "scorer": "handwritten",
               "model": {"weights_sha256": load_dit(checkpoint).meta.weights_sha256}}
    (scores / "scores.json").write_text(json.dumps(sidecar))
    return checkpoint, scores, tmp_path


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(root)).encode() + file.read_bytes())
    return digest.hexdigest()


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["prune", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and fragment in lines[0], err


def test_budget_out_of_range(setup, capsys):
    checkpoint, scores, tmp = setup
    code, _, err = run_cli(capsys, str(checkpoint), "--scores", str(scores), "--budget", "1.5",
                           "--out", str(tmp / "out"))
    assert_one_line_error(code, err, "budget")
    assert not (tmp / "out").exists()


def test_missing_checkpoint(setup, capsys):
    _, scores, tmp = setup
    code, _, err = run_cli(capsys, str(tmp / "nope"), "--scores", str(scores), "--budget", "0.2",
                           "--out", str(tmp / "out"))
    assert_one_line_error(code, err, "checkpoint not found")


def test_existing_output_without_overwrite(setup, capsys):
    checkpoint, scores, tmp = setup
    out = tmp / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, str(checkpoint), "--scores", str(scores), "--budget", "0.2",
                           "--out", str(out))
    assert_one_line_error(code, err, "not empty")
    assert (out / "keep.txt").read_text() == "mine"


def test_output_overlapping_the_checkpoint_is_refused(setup, capsys):
    checkpoint, scores, _ = setup
    code, _, err = run_cli(capsys, str(checkpoint), "--scores", str(scores), "--budget", "0.2",
                           "--out", str(checkpoint), "--overwrite")
    assert_one_line_error(code, err, "overlaps")


def test_prune_run(setup, capsys):
    checkpoint, scores, tmp = setup
    digest = tree_digest(checkpoint)
    out = tmp / "out"
    code, stdout, _ = run_cli(
        capsys, str(checkpoint), "--scores", str(scores / "scores.safetensors"), "--budget",
        "0.25", "--budget-mode", "both", "--out", str(out), "--recover", "distill",
        "--recover-steps", "2", "--recover-batch-size", "4",
    )
    assert code == 0, stdout
    assert tree_digest(checkpoint) == digest  # input untouched
    report = json.loads((out / "prune_report.json").read_text())
    assert report["units_removed"] == {"head": 2, "neuron": 64}
    assert report["params"]["after"] < report["params"]["before"]
    assert report["macs"]["after"] < report["macs"]["before"]
    assert report["recovery"]["method"] == "distill" and report["recovery"]["steps"] == 2
    assert report["scorer"] == "handwritten"
    assert json.loads((out / "config.resolved.json").read_text())["budget"] == 0.25
    plan = json.loads((out / "plan.json").read_text())
    assert plan["base_sha256"] == load_dit(checkpoint).meta.weights_sha256
    # the first units scored highest: heads 0 of blocks 0 and... block 0 keeps one head
    assert ["head", 0, 0] in plan["removed"] and ["head", 0, 1] in plan["removed"]
    pruned = load_dit(out)
    assert pruned.meta.extra["data"]["pool_indices"] == list(range(40))
    assert Unit("head", 0, 0) not in enumerate_units(pruned.model)

    again = tmp / "again"
    code, _, _ = run_cli(capsys, str(out), "--scores", str(scores), "--budget", "0.2",
                         "--budget-mode", "heads", "--out", str(again))
    assert code == 0
    assert json.loads((again / "prune_report.json").read_text())[
        "scored_units_already_pruned"] == 66
    second = json.loads((again / "plan.json").read_text())
    assert second["base_sha256"] == plan["base_sha256"] and len(second["plans"]) == 2
    assert second["counts"]["head"] > plan["counts"]["head"]


def test_scores_for_another_architecture(setup, capsys):
    checkpoint, scores, tmp = setup
    sidecar = json.loads((scores / "scores.json").read_text())
    sidecar["units"][0] = ["head", 9, 0]
    (scores / "scores.json").write_text(json.dumps(sidecar))
    code, _, err = run_cli(capsys, str(checkpoint), "--scores", str(scores), "--budget", "0.2",
                           "--out", str(tmp / "out"))
    assert_one_line_error(code, err, "architecture lacks")
