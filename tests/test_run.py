"""`dit-prune run` end to end on a tiny model: report keys, resume, and validation up front."""

from __future__ import annotations

import json

import pytest
import torch

from dit_prune.cli import main
from tests.conftest import train_tiny_checkpoint

FAST = ["--seeds", "0-39", "--steps", "4", "--scorer-option", "batches=1",
        "--scorer-option", "batch_size=32", "--device", "cpu"]
REPORT_KEYS = {"scorer", "budget", "units_removed", "feature_extractor", "num_samples", "seeds",
               "before", "after", "noise_control", "random_baseline", "verdict"}
ARM_KEYS = {"memorization_rate", "memorization_interval", "copy_rate", "copy_interval", "fd",
            "precision", "recall", "class_agreement", "params"}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, digits):
    return train_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", digits)


def _run(checkpoint, out, *extra):
    return main(["run", str(checkpoint), "--out", str(out), *FAST, *extra])


def test_run_writes_the_report_of_design_md(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(tiny_checkpoint, out, "--budget", "0.25,0.5") == 0
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report)  # docs/definitions.md#report-keys
    for arm in ("before", "after", "random_baseline"):
        assert ARM_KEYS <= set(report[arm]), arm
    assert report["units_removed"] == {"head": 4}  # 25% of 16 heads
    assert report["after"]["params"] < report["before"]["params"]
    assert report["num_samples"] == 40 and report["seeds"] == "0-39"
    assert report["feature_extractor"] == "digitsnet"
    assert [b["budget"] for b in report["budgets"]] == [0.25, 0.5]
    assert report["verdict"] == "mitigated" or report["verdict"].startswith(("not", "quality"))
    for name in ("report.md", "samples_before_after.png", "tradeoff.png", "config.resolved.json",
                 "pruned/plan.json"):
        assert (out / name).is_file(), name
    text = (out / "report.md").read_text()
    assert "Random units at the same budget" in text.splitlines()[2]
    assert "before" in capsys.readouterr().out


def test_interrupted_run_resumes_to_the_same_report(tiny_checkpoint, tmp_path, monkeypatch):
    import dit_prune.run.experiment as experiment

    reference = tmp_path / "reference"
    assert _run(tiny_checkpoint, reference) == 0
    calls = {"n": 0}
    real = experiment.sample_images

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(experiment, "sample_images", flaky)
    assert _run(tiny_checkpoint, out) == 130  # interrupted after the "before" samples
    assert not (out / "report.json").exists()
    assert len(list((out / "samples" / "before").glob("shard_*"))) == 1
    monkeypatch.setattr(experiment, "sample_images", real)
    assert _run(tiny_checkpoint, out) == 0
    a = json.loads((reference / "report.json").read_text())
    b = json.loads((out / "report.json").read_text())
    for key in ("before", "after", "random_baseline", "noise_control"):
        timing = {"latency_s"}  # wall time differs between runs; everything else must not
        assert {k: v for k, v in a[key].items() if k not in timing} == \
            {k: v for k, v in b[key].items() if k not in timing}, key
    assert a["verdict"] == b["verdict"]


def test_cached_scores_are_not_reused_after_the_scoring_code_changes(tiny_checkpoint, tmp_path,
                                                                   monkeypatch):
    import dit_prune.run.experiment as experiment

    out = tmp_path / "run"
    assert _run(tiny_checkpoint, out) == 0
    scored = []
    real = experiment.get_scorer
    monkeypatch.setattr(experiment, "get_scorer",
                        lambda name, **kw: scored.append(name) or real(name, **kw))
    assert _run(tiny_checkpoint, out) == 0  # same options: the run resumes from its caches
    assert scored == []  # same code: both cached score sets are reused
    monkeypatch.setattr(experiment, "scoring_code_fingerprint", lambda: "changed-code")
    assert _run(tiny_checkpoint, out) == 0
    assert sorted(scored) == ["random"] * 3 + ["taylor-gap"]  # three random seeds


@pytest.mark.parametrize("args, message", [
    (["--budget", "1.5"], "strictly between 0 and 1"),
    (["--budget", "0"], "strictly between 0 and 1"),
    (["--scorer", "nope"], "unknown scorer"),
    (["--seeds", "x-y"], "cannot parse seeds"),
    (["--recover", "finetune", "--recover-data", "/no/such/folder"], "/no/such/folder"),
])
def test_bad_options_fail_before_work(tiny_checkpoint, tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert _run(tiny_checkpoint, out, *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_recovery_on_unused_digits_trains_on_images_the_model_never_saw(tiny_checkpoint,
                                                                        tmp_path, monkeypatch):
    import dit_prune.run.recovery as run_recovery
    from dit_prune.data import digits_split

    seen = []
    real = run_recovery.recover

    def spy(method, model, images, labels, **kwargs):
        seen.append(images)
        return real(method, model, images, labels, **kwargs)

    monkeypatch.setattr(run_recovery, "recover", spy)
    out = tmp_path / "run"
    assert _run(tiny_checkpoint, out, "--recover", "finetune", "--recover-steps", "2",
                "--recover-data", "unused") == 0
    pool = digits_split().pool_images  # (1000, C, H, W)
    trained = set(json.loads((tiny_checkpoint / "dit_prune.json").read_text())
                  ["data"]["pool_indices"])
    assert seen and all(len(images) == len(pool) - len(trained) for images in seen)
    flat = pool.flatten(1)
    for images in seen:  # every recovery image is a pool digit outside the training subset
        match = torch.cdist(images.flatten(1), flat).argmin(dim=1).tolist()
        assert not set(match) & trained
    resolved = json.loads((out / "config.resolved.json").read_text())["resolved"]
    assert resolved["recover_data"] == "unused"


def test_fine_tuning_on_unlabelled_images_is_refused_before_work(tiny_checkpoint, tmp_path,
                                                                 capsys, digits):
    from PIL import Image

    flat = tmp_path / "flat"
    flat.mkdir()
    for i, image in enumerate(digits.heldout_images[:3]):  # (C, H, W) in [-1, 1]
        pixels = ((image[0] + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        Image.fromarray(pixels, mode="L").save(flat / f"{i}.png")
    out = tmp_path / "run"
    assert _run(tiny_checkpoint, out, "--recover", "finetune", "--recover-data", str(flat)) == 2
    err = capsys.readouterr().err.strip()
    assert "needs labelled images" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_missing_checkpoint_and_other_run_dir(tiny_checkpoint, tmp_path, capsys):
    assert _run(tmp_path / "missing", tmp_path / "run") == 2
    assert "checkpoint not found" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert _run(tiny_checkpoint, other) == 2
    assert (other / "notes.txt").read_text() == "keep me"


def test_wrong_image_size_is_refused(tiny_checkpoint, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "train"
    for cls in range(2):
        (folder / str(cls)).mkdir(parents=True)
        Image.new("L", (16, 16)).save(folder / str(cls) / "a.png")
    assert _run(tiny_checkpoint, tmp_path / "run", "--train", str(folder)) == 2
    assert "(1, 16, 16)" in capsys.readouterr().err


def test_labels_are_class_balanced():
    from dit_prune.run.config import RunConfig

    labels = RunConfig(checkpoint="x", out="y", seeds="0-999").labels()
    assert torch.equal(torch.bincount(labels), torch.full((10,), 100))


def test_two_processes_give_the_same_report_as_one(tiny_checkpoint, tmp_path):
    """Sampling shards split across 2 CPU processes under `accelerate launch`, same numbers."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    args = ["run", str(tiny_checkpoint), *FAST, "--shard-size", "10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = [sys.executable, "-m", "dit_prune.cli", *args, "--out", str(tmp_path / "one")]
    accelerate = Path(sys.executable).with_name("accelerate")
    two = [str(accelerate), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dit_prune.cli", *args,
           "--out", str(tmp_path / "two")]
    for command in (one, two):
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600,
                              check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
    a = json.loads((tmp_path / "one" / "report.json").read_text())
    b = json.loads((tmp_path / "two" / "report.json").read_text())
    for key in ("before", "after", "random_baseline", "noise_control"):
        assert {k: v for k, v in a[key].items() if k != "latency_s"} == \
            {k: v for k, v in b[key].items() if k != "latency_s"}, key
    assert len(list((tmp_path / "two" / "samples" / "before").glob("shard_*"))) == 4


def test_run_counts_copies_of_the_duplicated_images(tiny_checkpoint, tmp_path):
    import shutil

    checkpoint = tmp_path / "dup"
    shutil.copytree(tiny_checkpoint, checkpoint)
    meta = json.loads((checkpoint / "dit_prune.json").read_text())
    meta["data"]["duplicated"] = {"train_positions": [0, 7, 13], "copies": 5}
    (checkpoint / "dit_prune.json").write_text(json.dumps(meta))
    out = tmp_path / "run"
    assert _run(checkpoint, out, "--budget", "0.25", "--random-seeds", "0,1") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == "duplicated" and report["random_seeds"] == [0, 1]
    for arm in ("before", "after", "random_baseline"):
        sub = report[arm]["subsets"]["duplicated"]
        assert sub["subset_size"] == 3 and sub["copy_rate"] <= report[arm]["copy_rate"]
    eq = report["equal_quality"]
    assert eq["target"] == "duplicated" and len(eq["per_seed"]) == 2
    assert eq["beats"] == (eq["scorer_interval"][1] < eq["interval"][0])
    low, high = report["fd_change"]["interval"]
    assert low <= report["fd_change"]["relative"] <= high
    assert {(p["seed"], p["budget"]) for p in report["random_curve"]} == {(0, 0.25), (1, 0.25)}
    assert "duplicated images only" in (out / "report.md").read_text()
