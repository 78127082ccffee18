"""Inputs `dit-prune run` and `eval` must refuse before any sampling (new-user findings): one
seed (FD needs two samples), training labels outside the model's classes, and held-out images
that duplicate training images (they would set τ to ~1 and hide every copy)."""

from __future__ import annotations

import pytest
import torch

from dit_prune.cli import main
from dit_prune.errors import DitPruneError
from dit_prune.run.config import RunConfig

from .conftest import CHECKPOINTS
from .test_bad_inputs_api import save_folder

MODEL = str(CHECKPOINTS / "digits-memorized")


def test_one_seed_is_refused_by_the_run_config():
    with pytest.raises(DitPruneError, match="gives one sample"):
        RunConfig(checkpoint=MODEL, out="runs/x", seeds="7")


def test_one_seed_is_refused_by_eval(tmp_path, capsys):
    assert main(["eval", MODEL, "--out", str(tmp_path / "e"), "--seeds", "7", "--steps",
                 "2"]) == 2
    assert "gives one sample" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def _folders(tmp_path, digits, classes: int = 10):
    images = digits.pool_images[:24]  # (24, 1, 8, 8)
    labels = torch.arange(24) % classes
    return save_folder(tmp_path / "train", images, labels), images, labels


@pytest.mark.parametrize("command", ["run", "eval"])
def test_heldout_copies_of_training_images_are_refused_before_sampling(tmp_path, digits, capsys,
                                                                       command):
    train, _, _ = _folders(tmp_path, digits)
    out = tmp_path / "out"
    code = main([command, MODEL, "--out", str(out), "--train", str(train), "--heldout",
                 str(train), "--seeds", "0-9", "--steps", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "exact duplicate of training image" in err and "sampling" not in err
    assert not out.exists()


def test_training_labels_beyond_the_models_classes_are_refused_before_sampling(tmp_path, digits,
                                                                               capsys):
    train, _, _ = _folders(tmp_path, digits, classes=12)  # class folders 00-11
    out = tmp_path / "out"
    code = main(["run", MODEL, "--out", str(out), "--train", str(train), "--seeds", "0-9",
                 "--steps", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "10 classes" in err and "sampling" not in err
    assert not out.exists()


@pytest.mark.parametrize("command,net", [("run", "digits-copydetect"),
                                         ("eval", "digits-features")])
def test_out_inside_a_default_evaluation_net_is_refused(capsys, command, net):
    out = CHECKPOINTS / net / "x"
    assert main([command, MODEL, "--out", str(out), "--seeds", "0-9", "--steps", "2",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "overlaps the input" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_budget_the_block_rule_cannot_reach_is_refused(tiny_model):
    from dit_prune.pruning.selection import select_units
    from dit_prune.units import enumerate_units

    heads = enumerate_units(tiny_model, ["head"])
    blocks = len({u.block for u in heads})
    most = len(heads) - blocks  # every block keeps one head
    assert len(select_units(heads, [0.0] * len(heads), most, "heads", tiny_model)) == most
    with pytest.raises(DitPruneError, match=f"at most {most} can go"):
        select_units(heads, [0.0] * len(heads), most + 1, "heads", tiny_model)


def test_run_refuses_an_unreachable_budget_before_sampling(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", MODEL, "--out", str(out), "--budget", "16", "--seeds", "0-9",
                 "--steps", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "at most 12 can go" in err and "sampling" not in err, err
    assert not out.exists()


def test_train_refuses_subset_with_an_image_folder(tmp_path, digits, capsys):
    train, _, _ = _folders(tmp_path, digits)
    out = tmp_path / "t"
    assert main(["train", "--out", str(out), "--data", str(train), "--subset", "10",
                 "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "--subset 10 chooses images from the embedded digits pool" in err, err
    assert not out.exists()


@pytest.mark.parametrize("command", ["run", "eval", "prune", "score", "train"])
def test_a_seed_option_beyond_torch_is_one_line(tmp_path, capsys, command):
    head = {"train": ["train"], "prune": ["prune", MODEL, "--scores", str(tmp_path)]}.get(
        command, [command, MODEL])
    with pytest.raises(SystemExit) as caught:
        main([*head, "--out", str(tmp_path / "o"), "--seed", "18446744073709551616"])
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a seed is an integer in [0, " in err, err
    assert not (tmp_path / "o").exists()


def test_the_run_config_checks_its_seed():
    with pytest.raises(DitPruneError, match="--seed -1: a seed is an integer"):
        RunConfig(checkpoint=MODEL, out="runs/x", seed=-1)


def test_recovery_labels_beyond_the_models_classes_are_refused_before_sampling(tmp_path, digits,
                                                                               capsys):
    folder, _, _ = _folders(tmp_path, digits, classes=12)
    out = tmp_path / "out"
    code = main(["run", MODEL, "--out", str(out), "--recover", "finetune", "--recover-data",
                 str(folder), "--seeds", "0-9", "--steps", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"--recover-data {folder}" in err and "10 classes" in err and "sampling" not in err
    assert not out.exists()


def test_help_shows_defaults_of_zero_and_after_the_word_default(capsys):
    for argv in (["train", "--help"], ["prune", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
    text = " ".join(capsys.readouterr().out.split())
    assert "seed choosing the --subset images from the digits pool (default: 0)" in text
    assert "moving off re-triggered copies) (default: none)" in text


def test_eval_refuses_a_stats_cache_inside_an_input(tmp_path, capsys):
    cache = CHECKPOINTS / "digits-features"
    before = sorted(p.name for p in cache.iterdir())
    assert main(["eval", MODEL, "--out", str(tmp_path / "e"), "--seeds", "0-9", "--steps", "2",
                 "--stats-cache", str(cache)]) == 2
    err = capsys.readouterr().err
    assert "--stats-cache" in err and "overlaps the input --features" in err, err
    assert sorted(p.name for p in cache.iterdir()) == before
    assert not (tmp_path / "e").exists()


def test_eval_warns_when_heldout_near_copies_set_tau_to_one(tmp_path, digits, capsys):
    import json

    train, images, labels = _folders(tmp_path, digits)
    nudged = images.clone()
    nudged[:, :, 0, 0] = (nudged[:, :, 0, 0] + 2 / 255).clamp(max=1.0)  # one pixel, one level
    nudged[:, :, 0, 0] = torch.where(images[:, :, 0, 0] >= 1.0, images[:, :, 0, 0] - 2 / 255,
                                     nudged[:, :, 0, 0])
    held = save_folder(tmp_path / "held", nudged, labels)
    out = tmp_path / "e"
    assert main(["eval", MODEL, "--out", str(out), "--train", str(train), "--heldout", str(held),
                 "--seeds", "0-9", "--steps", "2", "--device", "cpu"]) == 0, \
        capsys.readouterr().err
    warnings = json.loads((out / "metrics.json").read_text())["warnings"]
    assert any("near-copies of training images" in w for w in warnings), warnings


def test_run_takes_the_class_count_from_the_checkpoint(tmp_path, digits):
    import diffusers

    from dit_prune.checkpoint import save_checkpoint
    from dit_prune.cli import build_parser
    from dit_prune.commands.run import config_from_args
    from dit_prune.models import new_dit
    from dit_prune.run.experiment import prepare_inputs

    ck = tmp_path / "eight"  # as `dit-prune train` makes from class folders 3/ and 7/
    save_checkpoint(new_dit("tiny", 8, 8, 1).eval(), diffusers.DDPMScheduler(), ck)
    images = digits.pool_images[:24]
    labels = torch.tensor([3, 7] * 12)
    train = save_folder(tmp_path / "train", images[:12], labels[:12])
    held = save_folder(tmp_path / "held", images[12:], labels[12:])
    args = build_parser().parse_args(["run", str(ck), "--out", str(tmp_path / "r"), "--train",
                                      str(train), "--heldout", str(held), "--seeds", "0-15"])
    cfg = config_from_args(args)
    assert cfg.num_classes == 8  # it was 10 whatever the checkpoint, and the run was refused
    assert prepare_inputs(cfg).loaded.meta.num_classes == 8
    assert config_from_args(build_parser().parse_args(["run", MODEL, "--out", "x"])
                            ).num_classes == 10


def test_run_experiment_refuses_an_unreachable_budget_before_sampling(tmp_path):
    from dit_prune.run import run_experiment

    out = tmp_path / "r"  # what scripts/regimes.py passes: no command-line checks before it
    cfg = RunConfig(checkpoint=MODEL, out=str(out), budgets=(2,), random_budgets=(16,),
                    seeds="0-9", steps=2, random_seeds=(0,), retrigger_targets=0)
    with pytest.raises(DitPruneError, match="at most 12 can go"):
        run_experiment(cfg, progress=False)
    assert not (out / "samples").exists()
