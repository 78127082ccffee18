"""`dit-prune eval` end to end on a tiny random DiT, and evaluate_samples' contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dit_prune.checkpoint import save_checkpoint
from dit_prune.cli import main
from dit_prune.data import balanced_subset, digits_split
from dit_prune.errors import DitPruneError
from dit_prune.evaluate import (
    METRIC_KEYS,
    NOISE_CONTROL_KEYS,
    digits_context,
    evaluate_noise_control,
    evaluate_samples,
)
from dit_prune.models import new_dit


@pytest.fixture(scope="module")
def context():
    split = digits_split()
    train = split.pool_images[balanced_subset(split.pool_labels, 64, seed=0)]
    return digits_context(train_images=train)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = new_dit("tiny", 10, 8, 1).eval()
    import diffusers

    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    indices = balanced_subset(digits_split().pool_labels, 20, seed=0).tolist()
    save_checkpoint(model, scheduler, path, extra={"data": {"source": "digits",
                                                            "pool_indices": indices}})
    bare = tmp_path_factory.mktemp("ckpt") / "bare"
    save_checkpoint(model, scheduler, bare)
    return path, bare


@pytest.mark.filterwarnings("ignore:20 generated samples")
def test_eval_writes_the_run_directory(checkpoint, tmp_path, capsys) -> None:
    path, _ = checkpoint
    out = tmp_path / "run"
    argv = ["eval", str(path), "--out", str(out), "--per-class", "2", "--steps", "2",
            "--device", "cpu", "--stats-cache", str(tmp_path / "cache")]
    assert main(argv) == 0
    names = {p.name for p in out.iterdir()}
    assert {"metrics.json", "report.md", "nearest.png", "ratios.png", "per_sample.npz",
            "config.resolved.json"} <= names
    doc = json.loads((out / "metrics.json").read_text())
    assert set(METRIC_KEYS) <= set(doc)
    assert doc["num_samples"] == 20 and doc["seeds"] == "0-19"
    assert doc["feature_extractor"] == "digitsnet" and doc["fd_name"] == "FD_digitsnet"
    assert doc["num_train_images"] == 20
    assert any("feature dimension 64" in w for w in doc["warnings"])  # 20 samples < 64 dims
    assert 0 <= doc["memorization_rate"] <= 1 and doc["class_agreement"] is not None
    report = (out / "report.md").read_text()
    assert "memorization rate" in report and "Warnings" in report and "tau" in report
    arrays = np.load(out / "per_sample.npz")
    assert arrays["ratios"].shape == (20,) and arrays["seeds"].tolist() == list(range(20))
    assert arrays["samples_uint8"].shape == (20, 1, 8, 8)
    config = json.loads((out / "config.resolved.json").read_text())
    assert config["seeds_resolved"] == "0-19" and config["evaluator"]["copy_threshold"] > 0
    # the same run directory again needs --overwrite
    assert main(argv) == 2
    assert "not empty" in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "message"), [
    (["--seeds", "0-9", "--per-class", "2"], "needs 20"),
    (["--seeds", "0-6"], "evenly"),
    (["--features", "/nowhere/inception-2015-12-05.pt"], "inception-2015-12-05.pt"),
    (["--train", "/nowhere/folder"], "image folder not found"),
])
def test_eval_bad_input_is_one_line(checkpoint, tmp_path, capsys, extra, message) -> None:
    path, _ = checkpoint
    argv = ["eval", str(path), "--out", str(tmp_path / "r"), "--steps", "1",
            "--stats-cache", "none", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_eval_needs_recorded_training_indices(checkpoint, tmp_path, capsys) -> None:
    _, bare = checkpoint
    assert main(["eval", str(bare), "--out", str(tmp_path / "r"), "--stats-cache", "none"]) == 2
    assert "pool_indices" in capsys.readouterr().err


def test_evaluate_samples_contract_and_controls(context) -> None:
    split = digits_split()
    train01 = (context.train_images + 1) / 2  # the training images as "samples" in [0, 1]
    labels = torch.as_tensor(split.pool_labels[balanced_subset(split.pool_labels, 64, seed=0)])
    with pytest.warns(UserWarning, match="64 generated samples <= feature dimension 64"):
        result = evaluate_samples(train01, labels, context, fd_resamples=20)
    assert any("feature dimension" in w for w in result.warnings)
    assert tuple(result.metrics) == METRIC_KEYS
    assert result.metrics["memorization_rate"] == 1.0 and result.metrics["copy_rate"] == 1.0
    assert result.metrics["class_agreement"] == 1.0
    json.dumps(result.metrics)  # JSON-ready
    assert result.arrays["ratios"].shape == (64,)
    held = evaluate_samples((split.heldout_images + 1) / 2, None, context, fd_resamples=20)
    assert held.metrics["memorization_rate"] <= 0.02 and held.metrics["copy_rate"] <= 0.011
    assert held.metrics["class_agreement"] is None and held.metrics["fd"] < 1e-6
    assert context.heldout_false_copy_rate <= 0.01


def test_noise_control(context) -> None:
    before = (context.train_images[:32] + 1) / 2
    same = evaluate_noise_control(before, before, context)
    assert tuple(same)[:4] == NOISE_CONTROL_KEYS
    assert same["memorization_rate"] == 1.0 and same["noise_rms"] == 0.0
    after = (before + 0.3 * torch.randn(before.shape, generator=torch.Generator().manual_seed(0))
             ).clamp(0, 1)
    noisy = evaluate_noise_control(before, after, context)
    assert noisy["memorization_rate"] < 1.0 and noisy["target_rms"] > 0.1


def test_evaluate_samples_rejects_bad_samples(context) -> None:
    with pytest.raises(DitPruneError, match=r"\[0, 1\]"):
        evaluate_samples(torch.full((4, 1, 8, 8), -0.5), None, context)
    with pytest.raises(DitPruneError, match="NaN"):
        evaluate_samples(torch.full((4, 1, 8, 8), float("nan")), None, context)
    with pytest.raises(DitPruneError, match="expected"):
        evaluate_samples(torch.rand(4, 1, 16, 16), None, context)
    with pytest.raises(DitPruneError, match="labels"):
        evaluate_samples(torch.rand(4, 1, 8, 8), torch.zeros(3), context)


def test_eval_labels_follow_the_seed_rule_of_run() -> None:
    from dit_prune.commands.eval import resolve_seeds_and_labels
    from dit_prune.run.config import RunConfig

    seeds, labels = resolve_seeds_and_labels("0-19", None, 10)
    assert labels.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert torch.equal(labels, RunConfig(checkpoint="x", out="y", seeds="0-19").labels())


@pytest.mark.filterwarnings("ignore:20 generated samples")
def test_eval_reports_the_duplicated_images_of_a_duplicated_checkpoint(checkpoint,
                                                                       tmp_path) -> None:
    import shutil

    path, _ = checkpoint
    dup = tmp_path / "dup"
    shutil.copytree(path, dup)
    meta = json.loads((dup / "dit_prune.json").read_text())
    meta["data"]["duplicated"] = {"train_positions": [0, 5, 9], "copies": 50}
    (dup / "dit_prune.json").write_text(json.dumps(meta))
    out = tmp_path / "run"
    assert main(["eval", str(dup), "--out", str(out), "--per-class", "2", "--steps", "2",
                 "--device", "cpu", "--stats-cache", str(tmp_path / "cache")]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    sub = doc["subsets"]["duplicated"]
    assert sub["subset_size"] == 3 and 0 <= sub["copy_rate"] <= doc["copy_rate"]
    assert "duplicated images only" in (out / "report.md").read_text()
