"""`dit-prune run` reports say what was measured: text-run seeds and class agreement, warnings
(few samples for FD, τ on few held-out images) in report.md and report.json, intervals that one
random seed cannot give, caption folders with a BOM, and a clear message for a non-DiT folder."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from dit_prune.cli import main
from dit_prune.errors import DitPruneError
from dit_prune.run.report import fmt_random_rate, fmt_rate, fmt_ratio
from dit_prune.text_data import (
    METADATA,
    digits_text_heldout,
    digits_text_rows,
    load_caption_folder,
    write_caption_folder,
)
from tests.conftest import CHECKPOINTS, REPO_ROOT


def _no_constants(name: str) -> float:
    raise AssertionError(f"report.json holds {name}: JSON has no NaN or Infinity")


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A text-to-image run with caption folders, 20 seeds, one random seed, 30 held-out images."""
    root = tmp_path_factory.mktemp("t2i")
    checkpoint = root / "ckpt"
    assert main(["train", "--model", "text", "--subset", "20", "--duplicate", "10x3",
                 "--steps", "5", "--batch-size", "8", "--checkpoint-every", "0",
                 "--out", str(checkpoint)]) == 0
    rows, _ = digits_text_rows({"subset": "20", "duplicate": "10x3"})
    held = digits_text_heldout()
    write_caption_folder(root / "train", rows.images, rows.captions,
                         files=[int(f.split(".")[0]) for f in rows.files])
    write_caption_folder(root / "held", held.images[:30], held.captions[:30])
    out = root / "run"
    assert main(["run", str(checkpoint), "--out", str(out), "--seeds", "0-19", "--steps", "2",
                 "--budget", "1", "--random-seeds", "0", "--retrigger-targets", "0",
                 "--scorer-option", "batches=1", "--train", str(root / "train"),
                 "--heldout", str(root / "held")]) == 0
    return out, len(rows)


def test_text_run_says_what_was_measured(text_run):
    out, num_rows = text_run
    text = (out / "report.md").read_text()
    measured = text.split("## What was measured")[1].split("![")[0]
    assert "class = seed mod classes" not in measured
    assert "π(s mod R)" in measured and f"R = {num_rows} training rows" in measured
    assert "digits classifier" not in measured
    assert "class agreement not measured" in measured
    report = json.loads((out / "report.json").read_text())
    assert report["before"]["class_agreement"] is None
    assert report["text"]["num_rows"] == num_rows and not report["text"]["classes_known"]


def test_run_report_collects_warnings_once(text_run, capsys):
    out, _ = text_run
    report = json.loads((out / "report.json").read_text())
    warnings = report["warnings"]
    assert len(warnings) == len(set(warnings))
    few = [w for w in warnings if "<= feature dimension" in w]
    assert few and any(w.startswith("20 generated samples") for w in few)
    tau = [w for w in warnings if w.startswith("copy threshold τ calibrated on only 30")]
    assert len(tau) == 1 and "fewer than 100" in tau[0] and "maximum" in tau[0]
    text = (out / "report.md").read_text()
    section = text.split("## Warnings")[1]
    for warning in warnings:
        assert f"- {warning}" in section
    assert text.count("## Warnings") == 1


def test_one_random_seed_prints_no_nan(text_run):
    out, _ = text_run
    raw = (out / "report.json").read_text()
    report = json.loads(raw, parse_constant=_no_constants)
    eq = report["equal_quality"]
    assert eq["num_random_seeds"] == 1 and eq["interval"] == [None, None]
    text = (out / "report.md").read_text()
    assert "nan" not in text.lower().replace("nanmean", "")
    assert "one seed: no interval" in text
    assert "1 random seed:" in text or "1 random seed " in text


def test_regimes_script_reads_a_one_seed_report(text_run):
    out, _ = text_run
    report = json.loads((out / "report.json").read_text())
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import importlib.util

    spec = importlib.util.spec_from_file_location("_script_regimes",
                                                  REPO_ROOT / "scripts" / "regimes.py")
    regimes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(regimes)
    rows = regimes.table_rows("m", "s", [regimes.rejudge(report)])
    assert len(rows) == 1 and rows[0][2] == "1"


def test_formatting_of_missing_intervals_and_ratios():
    assert fmt_rate(0.65, [math.nan, math.nan]) == "65.0% [no interval]"
    assert fmt_rate(0.65, [None, None]) == "65.0% [no interval]"
    assert fmt_rate(0.65, [0.6, 0.7]) == "65.0% [60.0, 70.0]"
    one = {"rate": 0.65, "interval": [None, None], "per_seed": [0.65], "num_random_seeds": 1}
    assert fmt_random_rate(one) == "65.0% — (one seed: no interval)"
    assert fmt_ratio(None) == fmt_ratio(math.nan) == fmt_ratio(math.inf) == "—"
    assert fmt_ratio(2.5) == "2.50×"


def test_caption_metadata_with_a_bom_is_read(tmp_path):
    folder = write_caption_folder(tmp_path / "pairs", torch.zeros(2, 1, 8, 8), ["a cat", "a dog"])
    meta = Path(folder) / METADATA
    meta.write_bytes(b"\xef\xbb\xbf" + meta.read_bytes())
    assert load_caption_folder(folder).captions == ("a cat", "a dog")


def test_bad_caption_folder_fails_before_the_pipeline_loads(tmp_path, capsys, monkeypatch):
    import dit_prune.run.text as text_module

    def no_load(path):
        raise AssertionError("the pipeline was loaded before the caption folders were checked")

    monkeypatch.setattr(text_module, "_quiet_load", no_load)
    bad = tmp_path / "train"
    bad.mkdir()
    (bad / METADATA).write_text('{"file_name": "x.png"\n')
    code = main(["run", str(CHECKPOINTS / "digits-text"), "--out", str(tmp_path / "r"),
                 "--train", str(bad), "--heldout", str(bad), "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "invalid JSON" in err and "Loading pipeline components" not in err


def test_feature_network_folder_is_named_for_what_it_is(tmp_path, capsys):
    code = main(["run", str(CHECKPOINTS / "digits-features"), "--out", str(tmp_path / "r"),
                 "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "is not a diffusion transformer checkpoint (no _class_name in config.json)" in err
    assert "None" not in err
    with pytest.raises(DitPruneError, match="not a diffusion transformer"):
        from dit_prune.checkpoint import load_dit

        load_dit(CHECKPOINTS / "digits-features")


def test_fd_change_prints_one_percent_sign(text_run):
    """'+0.2% [+0.1, +0.3]': the interval after the change carries no second percent sign."""
    from dit_prune.run.report import _pct, _pct_interval

    assert f"{_pct(0.002)} {_pct_interval([0.001, 0.003])}" == "+0.2% [+0.1, +0.3]"
    out, _ = text_run
    row = next(line for line in (out / "report.md").read_text().splitlines()
               if "change vs before" in line)
    cells = row.split("(paired 95%)")[1]
    assert "]%" not in cells and cells.count("%") == 2  # after and random, one sign each


def test_eval_names_text_to_image_pipelines_for_what_they_are(tmp_path, capsys):
    code = main(["eval", str(CHECKPOINTS / "digits-text"), "--out", str(tmp_path / "e"),
                 "--seeds", "0-19", "--steps", "2", "--stats-cache", "none", "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "text-to-image pipelines are not supported by eval" in err and "dit-prune run" in err
    assert "latent" not in err


def _class_recovery(method: str, **extra) -> dict:
    """report.json's "recovery" of a class-conditional run recovered with `method`."""
    from dit_prune.run.config import RunConfig
    from dit_prune.run.recovery import RunRecovery

    cfg = RunConfig("ckpt", "out", recover=method, **extra)
    images = torch.zeros(2, 1, 8, 8)
    recovery = RunRecovery(method, images, torch.zeros(2, dtype=torch.long), torch.nn.Identity(),
                           None, cfg.recovery_options(), {"source": "train", "num_images": 2})
    return recovery.describe()


def test_finetune_recovery_states_no_t_range():
    """finetune draws t over the whole schedule: report.json holds no t range for it, report.md
    says so; distill keeps its range."""
    from dit_prune.run.recovery import FINETUNE_TIMESTEPS
    from dit_prune.run.report import recovery_sentence

    finetune = _class_recovery("finetune")
    assert "t_min" not in finetune["options"] and "t_max" not in finetune["options"]
    assert finetune["options"]["timesteps"] == FINETUNE_TIMESTEPS
    sentence = recovery_sentence({"recovery": finetune})
    assert "whole noise schedule" in sentence and "[500, 999]" not in sentence
    distill = _class_recovery("distill")
    assert (distill["options"]["t_min"], distill["options"]["t_max"]) == (500, 999)
    assert "t in [500, 999]" in recovery_sentence({"recovery": distill})


def test_recovery_on_the_heldout_set_is_flagged(tmp_path, monkeypatch):
    """The keyword `heldout` (while it is the run's held-out set) and a folder that resolves to
    `--heldout` are flagged as contaminating FD; other data is not."""
    from dit_prune.run.config import RunConfig
    from dit_prune.run.recovery import heldout_contamination

    (tmp_path / "held").mkdir()
    monkeypatch.chdir(tmp_path)
    same = RunConfig("c", "o", recover="distill", recover_data="./held/",
                     heldout=str(tmp_path / "held"))
    assert "contaminated" in heldout_contamination(same, text=False)
    keyword = RunConfig("c", "o", recover="distill", recover_data="heldout")
    assert "--recover-data heldout" in heldout_contamination(keyword, text=False)
    other_heldout = RunConfig("c", "o", recover="distill", recover_data="heldout",
                              heldout=str(tmp_path / "held"))  # trains on the digits held-out
    assert heldout_contamination(other_heldout, text=False) is None
    assert heldout_contamination(other_heldout, text=True) is not None  # the run's held-out rows
    assert heldout_contamination(RunConfig("c", "o", recover="distill"), text=False) is None


def test_retrigger_sentence_names_what_the_attack_conditions_on():
    from dit_prune.run.report import retrigger_sentence

    r = {"source": "duplicated", "targets": 2, "heldout_targets": 2, "lr": 0.1,
         "attack_steps": 1, "prior_weight": 1.0, "ddim_steps": 2, "seed": 0,
         "copy_threshold": 0.5, "models_attacked": 3, "seconds": 1.0}
    assert "given the target's class" in retrigger_sentence({"retrigger": r, "text": None})
    text = retrigger_sentence({"retrigger": r, "text": {"num_rows": 4}})
    assert "given the target's caption" in text and "target's class" not in text


def test_the_verdict_says_when_the_noise_control_cannot_be_passed() -> None:
    from dit_prune.run.report import noise_floor_note

    failed = {"verdict": "not beyond noise control: memorization rate, copy rate",
              "noise_control": {"memorization_interval": [0.0, 0.004],
                                "copy_interval": [0.02, 0.05]}}
    note = noise_floor_note(failed)
    assert "no memorization rate to go below" in note and "copy rate to go" not in note
    above_zero = dict(failed, noise_control={"memorization_interval": [0.001, 0.004],
                                             "copy_interval": [0.02, 0.05]})
    assert noise_floor_note(above_zero) == ""
    assert noise_floor_note(dict(failed, verdict="quality lost: FD")) == ""


def test_a_run_without_class_agreement_says_why_and_warns():
    from types import SimpleNamespace

    from dit_prune.run.report import _agreement_sentence, run_warnings

    names = {"num_heldout_images": 797, "feature_extractor": "myfeat"}
    before = SimpleNamespace(metrics={"class_agreement": None})
    warnings = run_warnings({"before": before, "warnings": []}, names)
    assert any("`myfeat` has no classifier head" in w and "guard is off" in w for w in warnings)
    measured = SimpleNamespace(metrics={"class_agreement": 0.97})
    assert run_warnings({"before": measured, "warnings": []}, names) == []
    sentence = _agreement_sentence({"before": {"class_agreement": None}, "text": None,
                                    "feature_extractor": "myfeat"})
    assert "no classifier head" in sentence and "guard is off" in sentence
