"""Recovery that does not re-teach copying (issue 13, items 3 and 4): the novel filter of
generated-novel data, adversarial recovery on a planted memorizer, option checks, CLI plumbing
and the control arm of `dit-prune run`."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dit_prune.checkpoint import load_dit
from dit_prune.cli import main
from dit_prune.errors import DitPruneError
from dit_prune.metrics.copydetect import calibrate_threshold, load_copy_detector, nearest_cosine
from dit_prune.metrics.retrigger import AttackBudget, attack_success, choose_targets
from dit_prune.pruning.adversarial import AdversarialConfig, adversarial
from dit_prune.pruning.recovery import distill
from dit_prune.pruning.recovery_data import novel_filter
from dit_prune.run.config import RunConfig
from tests.conftest import CHECKPOINTS, train_tiny_checkpoint

FAST = ["--seeds", "0-19", "--steps", "4", "--scorer-option", "batches=1",
        "--scorer-option", "batch_size=16", "--device", "cpu", "--random-seeds", "0",
        "--retrigger-targets", "2", "--retrigger-steps", "1", "--retrigger-ddim-steps", "2"]


@pytest.fixture(scope="module")
def detector():
    return load_copy_detector(CHECKPOINTS / "digits-copydetect")


def test_novel_filter_keeps_only_samples_below_tau(digits, detector):
    train = digits.pool_images[:200]  # (200, 1, 8, 8)
    train_emb = detector.embed(train)  # (200, E)
    held_sims, _ = nearest_cosine(detector.embed(digits.heldout_images), train_emb)
    tau = calibrate_threshold(held_sims)
    copies = train[[3, 17, 17, 40]] + 0.01 * torch.randn(4, 1, 8, 8)  # planted near-copies
    novel = digits.heldout_images[:40]  # real digits the training set lacks
    samples = torch.cat([copies, novel]).clamp(-1, 1)  # (44, 1, 8, 8)
    labels = torch.arange(len(samples)) % 10  # (44,)
    pool = novel_filter(samples, labels, train_emb, detector, tau, seeds=range(44))
    assert not pool.kept[:4].any()  # every planted copy is dropped
    assert bool((pool.similarities[pool.kept] < tau).all())
    assert bool((pool.similarities[~pool.kept] >= tau).all())
    assert len(pool.images) == int(pool.kept.sum()) == len(pool.labels) >= 30
    assert pool.copied_positions()[0] == 17  # copied twice: first
    assert {3, 17, 40} <= set(pool.copied_positions())
    info = pool.info()
    assert info["num_drawn"] == 44 and info["num_images"] + info["num_dropped"] == 44
    assert info["seeds"] == "0-43"
    with pytest.raises(DitPruneError, match="no novel images"):
        novel_filter(copies, labels[:4], train_emb, detector, tau)


def test_train_multiset_repeats_the_duplicated_images_as_in_training(digits):
    from dit_prune.pruning.recovery_data import recovery_images

    extra = load_dit(CHECKPOINTS / "digits-duplicated").meta.extra
    once, once_labels, _ = recovery_images(extra, "train")
    multi, multi_labels, info = recovery_images(extra, "train-multiset")
    assert len(once) == 1000 and len(multi) == info["num_images"] == 1490  # the model card's
    assert info["distinct_images"] == 1000 and torch.equal(multi[:1000], once)
    flat = multi.flatten(1)  # (1490, 64)
    for position in extra["data"]["duplicated"]["train_positions"]:
        assert int((flat == once[position].flatten()).all(1).sum()) >= 50
        assert bool((multi_labels[(flat == once[position].flatten()).all(1)]
                     == once_labels[position]).all())


def _exit_code(argv: list[str]) -> int:
    """main's return code, or argparse's exit code for a refused choice."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


def _attacked_mse(model, scheduler, targets, budget, detector):
    result = attack_success(model, scheduler, targets, budget, detector, threshold=0.9)
    train = ~result.heldout
    return float(result.mse[train].mean()), float(result.success[train].float().mean())


def test_adversarial_recovery_moves_attacked_copies_away_more_than_distillation(digits,
                                                                              detector):
    """On the shipped planted memorizer (10 digits duplicated 50 times), the same number of
    steps of adversarial recovery leaves the re-trigger attack (the probe's noise seeds, which
    the recovery never saw) further from the copied images than plain distillation does."""
    loaded = load_dit(CHECKPOINTS / "digits-duplicated")
    teacher, scheduler = loaded.model.eval(), loaded.scheduler
    data = loaded.meta.extra["data"]
    positions = data["duplicated"]["train_positions"][:4]
    train = digits.pool_images[data["pool_indices"]]  # (1000, 1, 8, 8)
    train_labels = digits.pool_labels[data["pool_indices"]]
    novel = digits.heldout_images[:64]  # distillation data without the copied images
    targets = choose_targets(train, train_labels, digits.heldout_images, digits.heldout_labels,
                             4, positions=positions)
    budget = AttackBudget(targets=4, attack_steps=4, ddim_steps=4)
    steps, lr = 6, 2e-3
    distilled = distill(copy.deepcopy(teacher), teacher, novel, None, steps=steps, lr=lr,
                        batch_size=16, t_min=0, progress=False).model
    config = AdversarialConfig(steps=steps, lr=lr, batch_size=16, inner_steps=2, ddim_steps=4,
                               restart_every=3, margin=0.3)
    result = adversarial(copy.deepcopy(teacher), teacher, scheduler, novel, None,
                         train[positions], train_labels[positions], config, progress=False)
    before_mse, _ = _attacked_mse(teacher, scheduler, targets, budget, detector)
    distill_mse, distill_rate = _attacked_mse(distilled, scheduler, targets, budget, detector)
    adv_mse, adv_rate = _attacked_mse(result.model, scheduler, targets, budget, detector)
    assert adv_mse > distill_mse + 0.01 and adv_mse > before_mse + 0.01
    assert adv_rate <= distill_rate
    trace = result.trace["attacked_mse"]
    assert len(trace) == steps and trace[-1] > trace[0]  # the outer steps push the copies away
    again = adversarial(copy.deepcopy(teacher), teacher, scheduler, novel, None,
                        train[positions], train_labels[positions], config, progress=False)
    assert again.losses == result.losses  # deterministic for a seed
    assert all(torch.equal(p, q) for p, q in zip(again.model.parameters(),
                                                 result.model.parameters(), strict=True))


def test_class_embedding_search_strengthens_the_attack_and_leaves_no_hook(digits):
    from dit_prune.metrics.retrigger import label_tables

    loaded = load_dit(CHECKPOINTS / "digits-duplicated")
    model, scheduler = loaded.model.eval(), loaded.scheduler
    data = loaded.meta.extra["data"]
    train = digits.pool_images[data["pool_indices"]]
    train_labels = digits.pool_labels[data["pool_indices"]]
    targets = choose_targets(train, train_labels, digits.heldout_images, digits.heldout_labels,
                             4, positions=data["duplicated"]["train_positions"])
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def heldout_mse(embedding_lr: float) -> float:
        budget = AttackBudget(targets=4, attack_steps=5, ddim_steps=4, embedding_lr=embedding_lr)
        result = attack_success(model, scheduler, targets, budget, None, 0.9)
        return float(result.mse[result.heldout].mean())

    plain, searched = heldout_mse(0.0), heldout_mse(0.1)
    assert searched < 0.8 * plain  # more freedom: even held-out digits are fitted better
    assert not any(table._forward_hooks for table in label_tables(model))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(DitPruneError, match="embedding lr"):
        AttackBudget(embedding_lr=-1.0)


@pytest.mark.parametrize(("options", "message"), [
    ({"margin": 0}, "margin must be a finite number > 0"),
    ({"inner_steps": 0}, "inner steps must be an integer >= 1"),
    ({"weight": -1.0}, "weight must be a finite number >= 0"),
    ({"t_min": 600, "t_max": 500}, "t range [600, 500] is empty"),
    ({"lr": float("nan")}, "lr must be a finite number > 0"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"embedding_lr": float("inf")}, "embedding lr must be a finite number >= 0"),
])
def test_adversarial_config_errors_are_one_line(options, message):
    with pytest.raises(DitPruneError) as info:
        AdversarialConfig(**options)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("fields", "message"), [
    ({"recover": "distill", "recover_options": {"margin": 0.1}}, "adversarial only"),
    ({"recover": "adversarial", "recover_options": {"bogus": 1}}, "unknown adversarial"),
    ({"recover": "adversarial", "recover_options": {"steps": 3}}, "--recover-steps"),
    ({"recover": "adversarial", "recover_options": {"margin": -1}}, "margin"),
    ({"recover": "distill", "recover_t_min": 800, "recover_t_max": 700}, "is empty"),
    ({"recover": "distill", "recover_pool": 0}, "recover pool must be a positive integer"),
    ({"recover": "bogus"}, "unknown recovery"),
])
def test_run_config_refuses_bad_recovery_options(fields, message):
    with pytest.raises(DitPruneError) as info:
        RunConfig(checkpoint="x", out="y", **fields)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_run_config_resolves_the_methods_t_range():
    distill_options = RunConfig("x", "y", recover="distill").recovery_options()
    adv_options = RunConfig("x", "y", recover="adversarial",
                            recover_options={"margin": 0.2}).recovery_options()
    assert distill_options["t_min"] == 500 and adv_options["t_min"] == 0
    assert adv_options["config"].margin == 0.2 and adv_options["config"].steps == 200
    assert RunConfig("x", "y").recovery_options() == {}


@pytest.fixture(scope="module")
def dup_checkpoint(tmp_path_factory, digits):
    """The tiny run checkpoint, recording its first two training images as duplicated."""
    extra = {"duplicated": {"train_positions": [0, 1]}}
    return train_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", digits, extra)


@pytest.mark.parametrize("args", [
    ["--recover", "adversarial", "--recover-option", "margin=0"],
    ["--recover", "adversarial", "--recover-option", "nonsense=1"],
    ["--recover", "distill", "--recover-option", "margin=0.1"],
    ["--recover", "distill", "--recover-t-max", "5000"],
    ["--recover", "distill", "--recover-pool", "0"],
    ["--recover", "sideways"],
])
def test_run_cli_refuses_bad_recovery_values_with_exit_2(dup_checkpoint, tmp_path, capsys,
                                                         args):
    assert _exit_code(["run", str(dup_checkpoint), "--out", str(tmp_path / "r"), *FAST,
                       *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "r" / "report.json").exists()


def test_prune_cli_refuses_bad_recovery_values_with_exit_2(dup_checkpoint, tmp_path, capsys):
    assert _exit_code(["prune", str(dup_checkpoint), "--scores", str(tmp_path), "--budget",
                       "1", "--out", str(tmp_path / "p"), "--recover", "adversarial",
                       "--recover-option", "inner_steps=0"]) == 2
    assert "inner steps" in capsys.readouterr().err


def test_run_with_adversarial_recovery_on_generated_novel_reports_its_control(dup_checkpoint,
                                                                              tmp_path):
    out = tmp_path / "run"
    code = main(["run", str(dup_checkpoint), "--out", str(out), *FAST, "--budget", "1",
                 "--recover", "adversarial", "--recover-steps", "2", "--recover-data",
                 "generated-novel", "--recover-pool", "30", "--recover-option", "inner_steps=1",
                 "--recover-option", "ddim_steps=2", "--recover-option", "batch_size=8",
                 "--recover-option", "embedding_lr=0.05"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    recovery = report["recovery"]
    assert recovery["method"] == "adversarial" and recovery["options"]["t_min"] == 0
    assert recovery["options"]["embedding_lr"] == 0.05
    data = recovery["data"]
    assert data["source"] == "generated-novel" and data["num_drawn"] == 30
    assert data["num_images"] + data["num_dropped"] == 30 and data["num_images"] >= 1
    assert recovery["targets"] == {"source": "duplicated", "positions": [0, 1]}
    # control, scorer and random each recovered once
    assert [s["model"] for s in recovery["summaries"]] == ["control", "random_s0_1", "after_1"]
    assert all(s["steps"] == 2 for s in recovery["summaries"])
    control = report["control"]
    assert {"copy_rate", "fd", "retrigger_rate", "retrigger_floor"} <= set(control)
    assert control["params"] == report["before"]["params"]  # unpruned
    assert report["control_fd_change"]["relative"] == report["control_fd_change"]["relative"]
    text = (out / "report.md").read_text()
    assert "control: unpruned + same recovery" in text
    assert f"{data['num_images']} of 30 kept" in text
    assert "class embedding searched too (lr 0.05)" in text


def test_prune_with_adversarial_recovery_on_generated_novel(dup_checkpoint, tmp_path, capsys):
    from dit_prune.scorers import save_scores
    from dit_prune.units import enumerate_units

    loaded = load_dit(dup_checkpoint)
    units = enumerate_units(loaded.model)
    save_scores(tmp_path / "scores", units, torch.linspace(1.0, 0.0, len(units)),
                {"scorer": "handwritten"}, model={"weights_sha256": loaded.meta.weights_sha256})
    out = tmp_path / "pruned"
    code = main(["prune", str(dup_checkpoint), "--scores", str(tmp_path / "scores"),
                 "--budget", "1", "--budget-mode", "heads", "--out", str(out), "--recover",
                 "adversarial", "--recover-data", "generated-novel", "--recover-pool", "20",
                 "--recover-steps", "2", "--recover-batch-size", "4", "--recover-option",
                 "inner_steps=1", "--recover-option", "ddim_steps=2", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    recovery = json.loads((out / "prune_report.json").read_text())["recovery"]
    assert recovery["method"] == "adversarial" and recovery["steps"] == 2
    assert recovery["config"]["t_min"] == 0 and recovery["config"]["inner_steps"] == 1
    data = recovery["data"]
    assert data["source"] == "generated-novel" and data["num_drawn"] == 20
    assert data["targets"] == {"source": "duplicated", "positions": [0, 1]}
    assert f"kept {data['num_images']} of 20" in capsys.readouterr().out
