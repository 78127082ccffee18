"""`dit-prune run PIPELINE_DIR --train FOLDER --heldout FOLDER` on a latent text-to-image
pipeline: a tiny SD3 (flow matching, CLIP text encoders, an AutoencoderKL with a latent shift and
scale) saved with `save_pretrained`, caption folders of 16×16 RGB images, and small local
TorchScript copy-detection and feature networks. Samples are decoded by the pipeline's VAE;
copies, FD, the verdict, the random and noise controls and the re-trigger attack all run."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from dit_prune.cli import main
from dit_prune.pipelines import load_pruned_pipeline
from dit_prune.pipelines.io import save_pipeline
from dit_prune.pipelines.tiny import tiny_sd3_pipeline
from dit_prune.pipelines.vae import decode_latents, encode_images
from dit_prune.text_data import write_caption_folder

torch.set_num_threads(1)
CAPTIONS = ["a red cat", "a blue dog", "a green cat", "a small dog", "a large cat",
            "a red dog"]


class _Pooled(torch.nn.Module):
    """A toy TorchScript network: the image averaged over `side`×`side` cells, flattened."""

    def __init__(self, side: int) -> None:
        super().__init__()
        self.side = side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, self.side).flatten(1)  # (B, 3·side²)


def _script(module: torch.nn.Module, path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(module).save(str(path))
    return str(path)


def test_decode_latents_inverts_the_latent_scaling():
    pipe = tiny_sd3_pipeline()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = encode_images(pipe, images)  # (2, 4, 8, 8)
    with torch.no_grad():
        direct = pipe.vae.decode(latents / 1.5 + 0.1).sample  # the SD3 pipeline's decode
    torch.testing.assert_close(decode_latents(pipe, latents), direct)


def _run_inputs(root, pipe) -> tuple:
    """`pipe` saved under `root`, caption folders of 16×16 RGB images (6 training images on 8
    rows, 8 held-out) and the toy networks: (pipeline dir, the run's arguments after
    `run PIPELINE --out OUT`)."""
    save_pipeline(pipe, root / "pipe")
    gen = torch.Generator().manual_seed(0)
    train = torch.rand(6, 3, 16, 16, generator=gen) * 2 - 1  # (6, 3, 16, 16)
    held = torch.rand(8, 3, 16, 16, generator=gen) * 2 - 1  # (8, 3, 16, 16)
    rows = [0, 1, 2, 3, 4, 5, 0, 1]  # two images listed twice (one training image each)
    write_caption_folder(root / "train", train[rows], [CAPTIONS[r] for r in rows], files=rows)
    write_caption_folder(root / "held", held, [CAPTIONS[i % 6] for i in range(8)])
    return root / "pipe", [
        "--seeds", "0-11", "--steps", "2", "--budget", "2", "--budget-mode", "neurons",
        "--random-seeds", "1", "--retrigger-targets", "1", "--retrigger-steps", "1",
        "--retrigger-ddim-steps", "2", "--scorer-option", "batches=1",
        "--train", str(root / "train"), "--heldout", str(root / "held"),
        "--copy-detector", _script(_Pooled(4), root / "copy.pt"),
        "--features", _script(_Pooled(2), root / "feat.pt")]


@pytest.fixture(scope="module")
def sd3_inputs(tmp_path_factory):
    return _run_inputs(tmp_path_factory.mktemp("sd3-run"), tiny_sd3_pipeline())


def test_run_on_a_latent_sd3_pipeline_with_caption_folders(sd3_inputs, tmp_path):
    pipe_dir, args = sd3_inputs
    pipe = tiny_sd3_pipeline()
    out = tmp_path / "run"
    assert main(["run", str(pipe_dir), "--out", str(out), *args]) == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("verdict", "before", "after", "random_baseline", "noise_control",
                "equal_quality", "prompts"):
        assert key in report, key
    removed = report["units_removed"]  # `neurons`: the image- and text-stream MLP neurons
    assert sum(removed.values()) == 2 and set(removed) <= {"neuron", "context_neuron"}
    for arm in ("before", "after", "random_baseline"):
        metrics = report[arm]
        assert 0 <= metrics["copy_rate"] <= 1, arm
        assert metrics["fd"] == metrics["fd"] and metrics["fd"] >= 0, arm  # finite FD
        assert 0 <= metrics["retrigger_rate"] <= 1, arm
    assert report["before"]["class_agreement"] is None
    assert report["prediction"] == "flow"
    markdown = (out / "report.md").read_text()
    assert "flow-matching Euler 2 steps" in markdown and "DDIM" not in markdown
    assert "latents decoded by the pipeline's VAE" in markdown
    assert report["prompts"]["groups"]["other"]["num_samples"] == 12
    again = load_pruned_pipeline(out / "pruned")
    assert type(again).__name__ == "StableDiffusion3Pipeline"
    assert sum(p.numel() for p in again.transformer.parameters()) < \
        sum(p.numel() for p in pipe.transformer.parameters())
    assert (out / "samples_before_after.png").is_file()


def _caption_setup():
    """A tiny SD3, 4 encoded 16×16 images with caption labels, and its prediction type."""
    from dit_prune.pipelines.caption_labels import CaptionLabels, caption_conditioning
    from dit_prune.prediction import Prediction

    pipe = tiny_sd3_pipeline()
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    labels = CaptionLabels.build(pipe, CAPTIONS[:4])
    latents = encode_images(pipe, images)  # (4, 4, 8, 8)
    return (pipe, latents, labels.of(CAPTIONS[:4]), Prediction.from_scheduler(pipe.scheduler),
            lambda model: caption_conditioning(model, labels))


def test_caption_recovery_through_flow_matching():
    """distill: an unpruned student already equals its teacher (loss 0, weights unchanged);
    finetune: the flow-matching loss falls, and the same seed gives the same weights."""
    import copy

    from dit_prune.pruning.caption_recovery import caption_recover

    pipe, latents, y, prediction, condition = _caption_setup()
    teacher = pipe.transformer
    student = copy.deepcopy(teacher)
    result = caption_recover("distill", student, latents, y, teacher, prediction, condition,
                             steps=2, batch_size=4, progress=False)
    assert result.losses == [0.0, 0.0]
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), teacher.parameters(),
                                                 strict=True))
    tuned = []
    for _ in range(2):
        model = copy.deepcopy(teacher)
        result = caption_recover("finetune", model, latents, y, teacher, prediction, condition,
                                 steps=30, batch_size=4, lr=3e-3, progress=False)
        tuned.append(model)
    losses = result.losses
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    assert result.config["prediction"] == "flow"
    assert all(torch.equal(a, b) for a, b in zip(tuned[0].parameters(), tuned[1].parameters(),
                                                 strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(tuned[0].parameters(),
                                                     teacher.parameters(), strict=True))


def test_run_recovers_a_latent_text_model_and_its_control(sd3_inputs, tmp_path):
    pipe_dir, args = sd3_inputs
    out = tmp_path / "run"
    assert main(["run", str(pipe_dir), "--out", str(out), *args, "--recover", "distill",
                 "--recover-steps", "2", "--recover-data", "heldout"]) == 0
    report = json.loads((out / "report.json").read_text())
    recovery = report["recovery"]
    assert recovery["method"] == "distill" and recovery["data"] == {"source": "heldout",
                                                                    "num_images": 8}
    assert [s["model"] for s in recovery["summaries"]] == ["control", "random_s1_2", "after_2"]
    assert recovery["summaries"][0]["loss_first_20"] == 0.0  # the control is its own teacher
    assert report["control"] is not None and 0 <= report["control"]["copy_rate"] <= 1


@pytest.mark.parametrize("extra, message", [
    (["--recover", "adversarial"], "--recover adversarial is not supported on text-to-image"),
    (["--recover", "finetune", "--recover-data", "unused"],
     "--recover-data unused is not available on text-to-image runs"),
])
def test_text_recovery_refusals_are_one_line_before_work(sd3_inputs, tmp_path, capsys, extra,
                                                         message):
    pipe_dir, args = sd3_inputs
    out = tmp_path / "run"
    assert main(["run", str(pipe_dir), "--out", str(out), *args, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_run_on_flux_samples_its_packed_latents(tmp_path):
    """Flux has no sample size: the run samples its 2×2-packed latents at the folders' size,
    unpacks and decodes them; fine-tuning recovery runs through flow matching."""
    from dit_prune.pipelines.tiny import tiny_flux_pipeline

    pipe_dir, args = _run_inputs(tmp_path, tiny_flux_pipeline())
    out = tmp_path / "run"
    assert main(["run", str(pipe_dir), "--out", str(out), *args, "--recover", "finetune",
                 "--recover-steps", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    removed = report["units_removed"]  # `neurons`: every MLP neuron kind of Flux
    assert report["prediction"] == "flow" and sum(removed.values()) == 2
    assert set(removed) <= {"neuron", "context_neuron", "single_neuron"}
    assert [s["model"] for s in report["recovery"]["summaries"]] == \
        ["control", "random_s1_2", "after_2"]
    assert report["num_train_images"] == 6
    assert type(load_pruned_pipeline(out / "pruned")).__name__ == "FluxPipeline"


def test_text_run_reports_its_store_finetune_range_and_heldout_recovery(sd3_inputs, tmp_path,
                                                                         capsys):
    """A text run with `--train-store` and `--recover finetune` on the held-out folder: report.json
    records the store (absolute path, content hash) and no t range for finetune; report.md says
    the store was searched, that finetune's t spans the whole schedule and warns that the
    recovery data is the held-out set; the re-trigger conditions on the target's caption."""
    from dit_prune.run.recovery import FINETUNE_TIMESTEPS

    pipe_dir, args = sd3_inputs
    train = args[args.index("--train") + 1]
    held = args[args.index("--heldout") + 1]
    detector = args[args.index("--copy-detector") + 1]
    assert main(["index", "--images", train, "--out", str(tmp_path / "store"),
                 "--copy-detector", detector, "--no-progress"]) == 0
    capsys.readouterr()
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    out = tmp_path / "run"
    assert main(["run", str(pipe_dir), "--out", str(out), *args, "--recover", "finetune",
                 "--recover-steps", "1", "--recover-data", held + "/",
                 "--train-store", str(tmp_path / "store")]) == 0
    err = capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["train_store"] == {"path": str((tmp_path / "store").resolve()),
                                     "content_hash": manifest["content_hash"]}
    options = report["recovery"]["options"]
    assert "t_min" not in options and "t_max" not in options
    assert options["timesteps"] == FINETUNE_TIMESTEPS
    contamination = [w for w in report["warnings"] if "held-out images" in w and "FD" in w]
    assert len(contamination) == 1 and f"warning: {contamination[0]}" in err
    markdown = (out / "report.md").read_text()
    measured = markdown.split("## What was measured")[1]
    assert "searched the reference store" in measured
    assert str((tmp_path / "store").resolve()) in measured and manifest["content_hash"] in measured
    assert "whole noise schedule" in measured and "[500, 999]" not in markdown
    assert f"- {contamination[0]}" in markdown.split("## Warnings")[1]
    assert "given the target's caption" in markdown and "target's class" not in markdown
    assert "]%" not in markdown  # FD change: one percent sign


def test_text_run_names_the_folder_of_wrongly_sized_images(sd3_inputs, tmp_path, capsys):
    pipe_dir, args = sd3_inputs
    big = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    write_caption_folder(tmp_path / "big", big, CAPTIONS)
    args = list(args)
    args[args.index("--train") + 1] = str(tmp_path / "big")
    assert main(["run", str(pipe_dir), "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert f"training images (--train {tmp_path / 'big'}) are (3, 32, 32)" in err
    assert len(err.strip().splitlines()) == 1


def test_quiet_libraries_silences_and_restores():
    """Pipeline loading hides transformers' warnings and log messages only inside the block."""
    from transformers.utils import logging as transformers_logging

    from dit_prune.run.text import quiet_libraries

    before = transformers_logging.get_verbosity()
    with quiet_libraries(), warnings.catch_warnings(record=True) as caught:
        assert transformers_logging.get_verbosity() == transformers_logging.ERROR
        warnings.warn("`CLIPImageProcessor` requires torchvision", UserWarning, stacklevel=1)
    assert transformers_logging.get_verbosity() == before
    assert caught == []
