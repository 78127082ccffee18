"""Option rules a new user ran into: `prune` with scores of another model, recovery options
the chosen method would ignore (`prune` and `run`), a generated-novel pool that keeps fewer
images than one batch, the adversarial progress line, and `eval --guidance-scale` below 1."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import torch

from dit_prune.checkpoint import load_dit, save_checkpoint
from dit_prune.cli import main
from dit_prune.errors import DitPruneError
from dit_prune.models import new_dit
from dit_prune.pruning.recovery import RECOVERY_FLAGS, RECOVERY_METHODS, check_recovery_flags
from dit_prune.pruning.recovery_data import NovelPool, check_enough_novel
from dit_prune.run.config import RunConfig
from dit_prune.scorers import save_scores
from dit_prune.units import enumerate_units

FAST_RUN = ["--seeds", "0-19", "--steps", "4", "--device", "cpu", "--random-seeds", "0",
            "--retrigger-targets", "0"]


def _checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = new_dit("tiny", 10, 8, 1).eval()
    return save_checkpoint(model, diffusers.DDPMScheduler(num_train_timesteps=1000), path,
                           extra={"data": {"source": "digits",
                                           "pool_indices": list(range(40))}})


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Two tiny digits checkpoints (same architecture, other weights) and scores of the first."""
    root = tmp_path_factory.mktemp("rules")
    first, second = _checkpoint(root / "first", 0), _checkpoint(root / "second", 1)
    loaded = load_dit(first)
    units = enumerate_units(loaded.model)
    save_scores(root / "scores", units, torch.linspace(1.0, 0.0, len(units)),
                {"scorer": "handwritten"},
                model={"weights_sha256": loaded.meta.weights_sha256, "checkpoint": str(first)})
    return first, second, root / "scores"


def _cli(capsys, *argv: str) -> tuple[int, list[str]]:
    """main's exit code and its stderr lines (progress bars left out)."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own refusals
        code = int(exc.code)
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip() and "%|" not in line]


def _one_line_error(code: int, lines: list[str], *fragments: str) -> None:
    assert code == 2 and len(lines) == 1, lines
    assert all(fragment in lines[0] for fragment in fragments), lines
    assert "Traceback" not in lines[0]


# ---- 1. scores of another model ------------------------------------------------------------

def test_prune_refuses_scores_computed_on_another_checkpoint(pair, tmp_path, capsys):
    first, second, scores = pair
    code, err = _cli(capsys, "prune", str(second), "--scores", str(scores), "--budget", "2",
                     "--out", str(tmp_path / "p"), "--device", "cpu")
    _one_line_error(code, err, "were computed on", str(first), str(second))
    assert not (tmp_path / "p").exists()


def test_prune_refuses_scores_that_do_not_record_their_model(pair, tmp_path, capsys):
    first, _, _ = pair
    units = enumerate_units(load_dit(first).model)
    save_scores(tmp_path / "old", units, torch.linspace(1.0, 0.0, len(units)),
                {"scorer": "handwritten"})
    assert "model" not in json.loads((tmp_path / "old" / "scores.json").read_text())
    code, err = _cli(capsys, "prune", str(first), "--scores", str(tmp_path / "old"),
                     "--budget", "2", "--out", str(tmp_path / "p"), "--device", "cpu")
    _one_line_error(code, err, "do not record which model", "re-score")
    assert not (tmp_path / "p").exists()


def test_scores_recording_their_model_in_extra_are_checked_too(pair, tmp_path, capsys):
    """`dit-prune score` outputs written before the "model" field keep the hash in "extra"."""
    first, second, _ = pair
    loaded = load_dit(first)
    units = enumerate_units(loaded.model)
    save_scores(tmp_path / "s", units, torch.linspace(1.0, 0.0, len(units)),
                {"scorer": "handwritten"},
                extra={"checkpoint": str(first), "weights_sha256": loaded.meta.weights_sha256})
    code, err = _cli(capsys, "prune", str(second), "--scores", str(tmp_path / "s"),
                     "--budget", "2", "--out", str(tmp_path / "p"), "--device", "cpu")
    _one_line_error(code, err, str(first), str(second))
    code, _ = _cli(capsys, "prune", str(first), "--scores", str(tmp_path / "s"), "--budget",
                   "2", "--out", str(tmp_path / "ok"), "--device", "cpu")
    assert code == 0


def test_scores_of_an_ancestor_prune_its_pruned_descendants(pair, tmp_path, capsys):
    first, second, scores = pair
    one, two = tmp_path / "one", tmp_path / "two"
    assert _cli(capsys, "prune", str(first), "--scores", str(scores), "--budget", "1",
                "--budget-mode", "heads", "--out", str(one), "--device", "cpu")[0] == 0
    assert _cli(capsys, "prune", str(one), "--scores", str(scores), "--budget", "2",
                "--budget-mode", "heads", "--out", str(two), "--device", "cpu")[0] == 0
    hashes = [load_dit(p).meta.weights_sha256 for p in (first, one, two)]
    assert load_dit(two).meta.extra["pruning"]["ancestors_sha256"] == hashes[:2]
    # scores of the middle model prune its child; the base's scores prune the grandchild
    loaded = load_dit(one)
    units = enumerate_units(loaded.model)
    save_scores(tmp_path / "s1", units, torch.linspace(1.0, 0.0, len(units)),
                {"scorer": "handwritten"}, model={"weights_sha256": hashes[1]})
    assert _cli(capsys, "prune", str(two), "--scores", str(tmp_path / "s1"), "--budget", "1",
                "--budget-mode", "heads", "--out", str(tmp_path / "three"),
                "--device", "cpu")[0] == 0
    assert _cli(capsys, "prune", str(two), "--scores", str(scores), "--budget", "1",
                "--budget-mode", "heads", "--out", str(tmp_path / "four"),
                "--device", "cpu")[0] == 0
    # but the child's scores do not prune its parent, nor another model's descendant
    code, err = _cli(capsys, "prune", str(first), "--scores", str(tmp_path / "s1"),
                     "--budget", "1", "--out", str(tmp_path / "no"), "--device", "cpu")
    _one_line_error(code, err, "were computed on")
    code, err = _cli(capsys, "prune", str(second), "--scores", str(tmp_path / "s1"),
                     "--budget", "1", "--out", str(tmp_path / "no"), "--device", "cpu")
    _one_line_error(code, err, "were computed on")


def test_dit_prune_score_records_the_scored_model(pair, tmp_path, capsys):
    first, _, _ = pair
    assert _cli(capsys, "score", str(first), "--out", str(tmp_path / "s"), "--scorer",
                "random", "--device", "cpu")[0] == 0
    model = json.loads((tmp_path / "s" / "scores.json").read_text())["model"]
    assert model == {"weights_sha256": load_dit(first).meta.weights_sha256,
                     "checkpoint": str(first)}


# ---- 2. recovery options the method would ignore ---------------------------------------------

PRUNE_IGNORED = [
    (["--recover", "finetune", "--recover-pool", "7"],
     "--recover-pool applies to --recover-data generated-novel only"),
    (["--recover", "finetune", "--recover-t-min", "100"],
     "--recover-t-min applies to --recover distill or adversarial only"),
    (["--recover", "finetune", "--recover-t-max", "900"],
     "--recover-t-max applies to --recover distill or adversarial only"),
    (["--recover", "distill", "--recover-ema", "0.9"], "--recover-ema applies to --recover "
                                                       "finetune only"),
    (["--recover", "adversarial", "--recover-ema", "0.9"], "--recover-ema applies"),
    (["--recover", "distill", "--copy-detector", "checkpoints/digits-copydetect"],
     "--copy-detector applies to --recover-data generated-novel only"),
    (["--recover", "finetune", "--recover-option", "margin=0.1"],
     "--recover-option applies to --recover adversarial only"),
    (["--recover-steps", "50"], "--recover-steps is a recovery option, but no recovery"),
    (["--recover-steps", "200"], "--recover-steps is a recovery option"),  # the default, given
    (["--recover-lr", "1e-3"], "--recover-lr is a recovery option"),
    (["--recover-data", "heldout"], "--recover-data is a recovery option"),
    (["--recover-pool", "50"], "--recover-pool is a recovery option"),
    (["--copy-detector", "checkpoints/digits-copydetect"], "--copy-detector is a recovery"),
]


@pytest.mark.parametrize(("args", "message"), PRUNE_IGNORED)
def test_prune_refuses_recovery_options_the_method_ignores(pair, tmp_path, capsys, args,
                                                           message):
    first, _, scores = pair
    code, err = _cli(capsys, "prune", str(first), "--scores", str(scores), "--budget", "2",
                     "--out", str(tmp_path / "p"), "--device", "cpu", *args)
    _one_line_error(code, err, message)
    assert not (tmp_path / "p").exists()


def test_prune_checks_recovery_options_before_any_work(tmp_path, capsys):
    """Refused before the checkpoint is even looked at."""
    code, err = _cli(capsys, "prune", str(tmp_path / "missing"), "--scores", str(tmp_path),
                     "--budget", "2", "--out", str(tmp_path / "p"), "--recover", "finetune",
                     "--recover-t-min", "100")
    _one_line_error(code, err, "--recover-t-min applies")


def test_prune_accepts_each_methods_own_options(pair, tmp_path, capsys):
    first, _, scores = pair
    code, err = _cli(capsys, "prune", str(first), "--scores", str(scores), "--budget", "1",
                     "--out", str(tmp_path / "f"), "--device", "cpu", "--recover", "finetune",
                     "--recover-steps", "1", "--recover-batch-size", "4", "--recover-ema", "0.5",
                     "--recover-lr", "1e-3", "--recover-data", "train")
    assert code == 0, err
    recovery = json.loads((tmp_path / "f" / "prune_report.json").read_text())["recovery"]
    assert recovery["method"] == "finetune" and recovery["config"]["ema_decay"] == 0.5
    code, err = _cli(capsys, "prune", str(first), "--scores", str(scores), "--budget", "1",
                     "--out", str(tmp_path / "d"), "--device", "cpu", "--recover", "distill",
                     "--recover-steps", "1", "--recover-batch-size", "4", "--recover-t-min",
                     "100", "--recover-t-max", "900")
    assert code == 0, err
    recovery = json.loads((tmp_path / "d" / "prune_report.json").read_text())["recovery"]
    assert (recovery["config"]["t_min"], recovery["config"]["t_max"]) == (100, 900)


RUN_IGNORED = [
    (["--recover", "finetune", "--recover-t-min", "100"], "--recover-t-min applies"),
    (["--recover", "finetune", "--recover-t-max", "900"], "--recover-t-max applies"),
    (["--recover", "distill", "--recover-pool", "7"],
     "--recover-pool applies to --recover-data generated-novel only"),
    (["--recover-steps", "50"], "--recover-steps is a recovery option"),
    (["--recover-data", "unused"], "--recover-data is a recovery option"),
    (["--recover-t-min", "0"], "--recover-t-min is a recovery option"),
]


@pytest.mark.parametrize(("args", "message"), RUN_IGNORED)
def test_run_refuses_recovery_options_the_method_ignores(pair, tmp_path, capsys, args,
                                                         message):
    first, _, _ = pair
    code, err = _cli(capsys, "run", str(first), "--out", str(tmp_path / "r"), *FAST_RUN, *args)
    _one_line_error(code, err, message)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(("fields", "message"), [
    ({"recover": "finetune", "recover_t_min": 100}, "--recover-t-min applies"),
    ({"recover": "distill", "recover_pool": 7}, "--recover-pool applies"),
    ({"recover_steps": 50}, "--recover-steps is a recovery option"),
    ({"recover_data": "heldout"}, "--recover-data is a recovery option"),
    ({"recover": "finetune", "recover_options": {"margin": 0.1}}, "adversarial only"),
])
def test_run_config_refuses_recovery_options_the_method_ignores(fields, message):
    with pytest.raises(DitPruneError, match=message) as info:
        RunConfig(checkpoint="x", out="y", **fields)
    assert "\n" not in str(info.value)


def test_run_config_accepts_each_methods_own_options():
    RunConfig("x", "y", recover="adversarial", recover_data="generated-novel", recover_pool=7,
              recover_t_min=10, recover_options={"margin": 0.1})
    RunConfig("x", "y", recover="finetune", recover_steps=5, recover_data="unused")
    RunConfig("x", "y", recover="distill", recover_t_min=0, recover_t_max=900)


def test_every_flag_applies_to_some_method_and_none_to_no_recovery():
    for flag, methods in RECOVERY_FLAGS.items():
        assert methods and "none" not in methods and set(methods) <= set(RECOVERY_METHODS)
        for method in methods:
            data = "generated-novel" if flag == "--recover-pool" else None
            check_recovery_flags(method, [flag], data=data)
        with pytest.raises(DitPruneError, match="no recovery was chosen"):
            check_recovery_flags("none", [flag])
    check_recovery_flags("none", [])


# ---- 3. generated-novel pools and the adversarial progress line ------------------------------

def _pool(kept: int, drawn: int) -> NovelPool:
    mask = torch.arange(drawn) < kept  # (N,)
    return NovelPool(torch.zeros(kept, 1, 8, 8), torch.zeros(kept, dtype=torch.long),
                     torch.zeros(drawn), torch.zeros(drawn, dtype=torch.long), mask, 0.9)


def test_a_pool_keeping_fewer_images_than_a_batch_is_refused():
    with pytest.raises(DitPruneError) as info:
        check_enough_novel(_pool(1, 50), 64)
    message = str(info.value)
    assert "kept 1 of 50 samples" in message and "--recover-pool" in message
    assert "one recovery batch of 64" in message and "\n" not in message
    check_enough_novel(_pool(64, 100), 64)  # one batch: fine


def test_prune_refuses_a_generated_novel_pool_smaller_than_a_batch(pair, tmp_path, capsys):
    first, _, scores = pair
    code, err = _cli(capsys, "prune", str(first), "--scores", str(scores), "--budget", "1",
                     "--out", str(tmp_path / "p"), "--device", "cpu", "--recover", "distill",
                     "--recover-data", "generated-novel", "--recover-pool", "3",
                     "--recover-batch-size", "8")
    _one_line_error(code, err, "of 3 samples", "fewer than one recovery batch of 8",
                    "--recover-pool")
    assert not (tmp_path / "p").exists()


def test_adversarial_progress_line_shows_every_steps_values(monkeypatch):
    from dit_prune.pruning import adversarial as adversarial_module

    postfixes: list[dict] = []

    class Bar:
        def __init__(self, iterable, **_):
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable)

        def set_postfix(self, **values):
            postfixes.append({k: v for k, v in values.items() if k != "refresh"})

        def close(self):
            pass

    monkeypatch.setattr(adversarial_module, "tqdm", Bar)
    torch.manual_seed(0)
    teacher, student = new_dit("tiny", 10, 8, 1), new_dit("tiny", 10, 8, 1)
    config = adversarial_module.AdversarialConfig(steps=3, batch_size=4, inner_steps=1,
                                                  ddim_steps=2)
    result = adversarial_module.adversarial(
        student, teacher, diffusers.DDPMScheduler(), torch.rand(8, 1, 8, 8) * 2 - 1, None,
        torch.rand(2, 1, 8, 8) * 2 - 1, torch.tensor([3, 7]), config)
    assert len(postfixes) == 3
    assert [p["distill"] for p in postfixes] == [f"{v:.4f}"
                                                 for v in result.trace["distill_loss"]]
    assert [p["attacked_mse"] for p in postfixes] == [f"{v:.3f}"
                                                      for v in result.trace["attacked_mse"]]


# ---- 4. eval's guidance scale ----------------------------------------------------------------

@pytest.mark.parametrize("value", ["-1", "0.5", "nan", "inf"])
def test_eval_refuses_a_guidance_scale_below_one_as_run_does(pair, tmp_path, capsys, value):
    first, _, _ = pair
    code, err = _cli(capsys, "eval", str(first), "--out", str(tmp_path / "e"),
                     "--guidance-scale", value)
    _one_line_error(code, err, "--guidance-scale must be a finite number >= 1")
    assert not (tmp_path / "e").exists()
    with pytest.raises(DitPruneError, match="guidance scale must be a finite number >= 1"):
        RunConfig("x", "y", guidance_scale=float(value))
