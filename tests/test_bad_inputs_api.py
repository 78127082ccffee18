"""Bad inputs where images, weights and numbers enter (issue 11), table-driven.

Each case either asserts the one-line DitPruneError (its message names the input) or, where the
old code returned a silently wrong value, asserts the right value. Cases the command line reaches
are also run through `dit_prune.cli.main`: exit 2, one stderr line, no traceback, nothing
written to --out, inputs byte-identical.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dit_prune.checkpoint import load_dit
from dit_prune.data import digits_split, load_image_folder
from dit_prune.errors import DitPruneError
from dit_prune.metrics.copydetect import copy_report, load_copy_detector
from dit_prune.metrics.features import TorchScriptFeatureExtractor, load_feature_extractor
from dit_prune.metrics.memorization import memorization_report
from dit_prune.models import new_dit
from dit_prune.pipelines import (
    IdentityVAE,
    measure_memorization,
    pixel_dit_pipeline,
    prune_pipeline,
    score_and_prune_pipeline,
)
from dit_prune.pruning.recovery import distill, finetune
from dit_prune.sampling import sample_images
from dit_prune.scorers import CalibrationData, get_scorer
from dit_prune.units import Unit, enumerate_units

REPO = Path(__file__).resolve().parents[1]
MEMORIZED = REPO / "checkpoints" / "digits-memorized"
COPYDETECT = REPO / "checkpoints" / "digits-copydetect"
FEATURES = REPO / "checkpoints" / "digits-features"
NAN = float("nan")


# ---------------------------------------------------------------- shared inputs


@pytest.fixture(scope="module")
def memorized() -> Any:
    """digits-memorized, its scheduler and its 64 training digits (64, 1, 8, 8) in [-1, 1]."""
    loaded = load_dit(MEMORIZED)
    split = digits_split()
    index = torch.as_tensor(loaded.meta.extra["data"]["pool_indices"])
    return loaded, split.pool_images[index], split.pool_labels[index], split


@pytest.fixture(scope="module")
def detector() -> Any:
    return load_copy_detector(COPYDETECT)


@pytest.fixture(scope="module")
def features() -> Any:
    return load_feature_extractor(FEATURES)


def _to_8bit(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W[, C]) uint8."""
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    array = pixels.permute(0, 2, 3, 1).numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def save_folder(root: Path, images: torch.Tensor, labels: torch.Tensor | None,
                mode: str = "L") -> Path:
    """Write images (N, C, H, W) in [-1, 1] as PNGs of `mode` (one subfolder per label)."""
    root.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(_to_8bit(images)):
        folder = root / f"{int(labels[i]):02d}" if labels is not None else root
        folder.mkdir(exist_ok=True)
        grey = Image.fromarray(array)
        if mode == "P":  # an adaptive palette: indices are not grey levels
            img = grey.convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
        elif mode == "1":
            img = grey.point(lambda v: 255 if v >= 128 else 0).convert("1")
        elif mode == "I;16":
            img = Image.fromarray(array.astype(np.uint16) * 257)  # 8 bits -> 16 bits exactly
        elif mode == "RGB":
            img = grey.convert("RGB")
        else:
            img = grey
        img.save(folder / f"{i:03d}.png")
    return root


def tree_hash(path: Path) -> str:
    """SHA-256 over every file's relative path and bytes under `path`."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def broken_checkpoint(tmp_path: Path, how: str) -> Path:
    """A copy of digits-memorized broken in one way (see CHECKPOINT_CASES)."""
    root = tmp_path / f"ck-{how}"
    shutil.copytree(MEMORIZED, root)
    config = root / "transformer" / "config.json"
    scheduler = root / "scheduler" / "scheduler_config.json"

    def edit(path: Path, change: Callable[[dict], None]) -> None:
        value = json.loads(path.read_text())
        change(value)
        path.write_text(json.dumps(value))

    if how == "config-list":
        config.write_text("[1, 2]")
    elif how == "nan-weights":
        weights = root / "transformer" / "diffusion_pytorch_model.safetensors"
        state = load_file(str(weights))
        name = sorted(state)[0]
        state[name] = state[name].clone()
        state[name].view(-1)[0] = NAN
        save_file(state, str(weights))
    elif how == "inf-weights":
        weights = root / "transformer" / "diffusion_pytorch_model.safetensors"
        state = load_file(str(weights))
        name = sorted(state)[-1]
        state[name] = state[name].clone()
        state[name].view(-1)[-1] = math.inf
        save_file(state, str(weights))
    elif how == "meta-list":
        (root / "dit_prune.json").write_text("[1]")
    elif how == "meta-not-json":
        (root / "dit_prune.json").write_text("{nope")
    elif how == "meta-data-list":
        (root / "dit_prune.json").write_text(json.dumps({"data": [1, 2]}))
    elif how == "meta-bad-indices":
        (root / "dit_prune.json").write_text(json.dumps({"data": {"source": "digits",
                                                                  "pool_indices": "0-63"}}))
    elif how == "structure-string":
        edit(config, lambda c: c.update(dit_prune_structure="x"))
    elif how == "structure-ints":
        edit(config, lambda c: c.update(dit_prune_structure={"kept": {"head": [1, 2, 3, 4]}}))
    elif how == "structure-strings":
        edit(config, lambda c: c.update(
            dit_prune_structure={"kept": {"head": [["a"], [0], [0], [0]]}}))
    elif how == "beta-schedule":
        edit(scheduler, lambda c: c.update(beta_schedule="cosine-ish"))
    elif how == "scheduler-class":
        edit(scheduler, lambda c: c.update(_class_name="DiTTransformer2DModel"))
    elif how == "scheduler-list":
        scheduler.write_text("[]")
    elif how == "no-sample-size":
        edit(config, lambda c: c.pop("sample_size"))
    else:
        raise AssertionError(how)
    return root


# (how the checkpoint is broken, the file the message names, a phrase of the message)
CHECKPOINT_CASES = [
    ("config-list", "config.json", "must hold a JSON object, not a list"),
    ("nan-weights", "diffusion_pytorch_model.safetensors", "NaN or infinite"),
    ("inf-weights", "diffusion_pytorch_model.safetensors", "NaN or infinite"),
    ("meta-list", "dit_prune.json", "must hold a JSON object"),
    ("meta-not-json", "dit_prune.json", "not valid JSON"),
    ("meta-data-list", "dit_prune.json", "'data' must be an object"),
    ("meta-bad-indices", "dit_prune.json", "pool_indices must be a list"),
    ("structure-string", "config.json", "malformed dit_prune_structure"),
    ("structure-ints", "config.json", "malformed dit_prune_structure"),
    ("structure-strings", "config.json", "malformed dit_prune_structure"),
    ("beta-schedule", "scheduler_config.json", "cosine-ish"),
    ("scheduler-class", "scheduler_config.json", "unknown scheduler class"),
    ("scheduler-list", "scheduler_config.json", "must hold a JSON object"),
    ("no-sample-size", "config.json", "sample_size must be a positive integer"),
]


def run_cli(argv: list[str], capsys: Any, inputs: list[Path], out: Path) -> str:
    """Run the CLI on a bad input: exit 2, one stderr line, no traceback, no --out, inputs kept."""
    from dit_prune.cli import main

    before = {p: tree_hash(p) for p in inputs}
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())
    assert {p: tree_hash(p) for p in inputs} == before
    return lines[0]


# ---------------------------------------------------------------- image folders: right values


def test_palette_and_grey_folders_of_the_training_digits_give_the_same_rate(
        tmp_path, memorized) -> None:
    loaded, train, labels, _ = memorized
    grey = load_image_folder(save_folder(tmp_path / "grey", train, labels, "L"))
    palette = load_image_folder(save_folder(tmp_path / "palette", train, labels, "P"))
    assert grey.images.shape == palette.images.shape == (64, 1, 8, 8)
    assert torch.equal(palette.images, grey.images)  # palette colours, not palette indices
    assert torch.equal(palette.labels, labels.sort().values)  # folders in class order
    samples = sample_images(loaded.model, loaded.scheduler, torch.arange(20) % 10, range(20),
                            steps=10, progress=False) * 2 - 1
    by_grey = memorization_report(samples, grey.images).rate
    assert memorization_report(samples, palette.images).rate == by_grey
    assert memorization_report(samples, train).rate == by_grey
    assert by_grey >= 0.5  # the memorized model copies its training digits
    assert memorization_report(grey.images, palette.images).rate == 1.0


@pytest.mark.parametrize("mode", ["1", "I;16", "RGB", "L"])
def test_image_modes_are_read_by_what_their_pixels_mean(tmp_path, memorized, mode) -> None:
    _, train, _, _ = memorized
    folder = load_image_folder(save_folder(tmp_path / mode, train[:10], None, mode))
    eight_bit = torch.from_numpy(_to_8bit(train[:10]).astype(np.float32)).unsqueeze(1)
    if mode == "1":  # black and white, 0 / 255
        expected = torch.where(eight_bit >= 128, 1.0, -1.0)
    else:
        expected = eight_bit / 127.5 - 1
    if mode == "RGB":
        expected = expected.repeat(1, 3, 1, 1)
    assert folder.images.shape == expected.shape
    assert torch.allclose(folder.images, expected, atol=1e-6)
    assert folder.images.min() >= -1 and folder.images.max() <= 1


def test_sixteen_bit_values_beyond_the_bit_depth_are_refused(tmp_path) -> None:
    from dit_prune.data import _pixels  # a 32-bit 'I' image cannot be written as PNG here

    img = Image.fromarray(np.full((8, 8), 70_000, dtype=np.int32))
    with pytest.raises(DitPruneError, match=r"x\.png \(I\) holds values in \[70000, 70000\]"):
        _pixels(img, Path("x.png"))
    with pytest.raises(DitPruneError, match=r"x\.png has mode F"):
        _pixels(Image.fromarray(np.zeros((8, 8), dtype=np.float32)), Path("x.png"))


# ---------------------------------------------------------------- images that do not fit the model


def _folder_case(tmp_path: Path, memorized: Any, case: str) -> Path:
    _, train, labels, _ = memorized
    if case == "16x16":
        big = torch.nn.functional.interpolate(train[:20], size=16, mode="nearest")
        return save_folder(tmp_path / case, big, labels[:20])
    if case == "rgb":
        return save_folder(tmp_path / case, train[:20], labels[:20], "RGB")
    if case == "11-classes":  # class folders 00..10: folder 10 would be the null class
        return save_folder(tmp_path / case, train[:22], torch.arange(22) % 11)
    raise AssertionError(case)


FOLDER_CASES = [
    ("16x16", r"training images are \(1, 16, 16\) but the model takes \(1, 8, 8\)"),
    ("rgb", r"training images are \(3, 8, 8\) but the model takes \(1, 8, 8\)"),
    ("11-classes", r"training images: labels span \[0, 10\] but the model has 10 classes"),
]


@pytest.mark.parametrize(("case", "message"), FOLDER_CASES, ids=[c[0] for c in FOLDER_CASES])
def test_folders_that_do_not_fit_the_model_are_refused_by_the_scorers(
        tmp_path, memorized, case, message) -> None:
    loaded, _, _, split = memorized
    folder = load_image_folder(_folder_case(tmp_path, memorized, case))
    held = split.heldout_images[:8]
    if folder.images.shape[1:] != held.shape[1:]:
        held = folder.images[:8] * 0.5  # same shape, not duplicates
    data = CalibrationData(folder.images, folder.labels, held, None)
    model = loaded.model
    with pytest.raises(DitPruneError, match=message):
        get_scorer("taylor-gap", batches=1).score(model, enumerate_units(model, ["head"]), data)


@pytest.mark.parametrize(("case", "message"), FOLDER_CASES, ids=[c[0] for c in FOLDER_CASES])
def test_folders_that_do_not_fit_the_model_cli(tmp_path, capsys, memorized, case,
                                               message) -> None:
    folder = _folder_case(tmp_path, memorized, case)
    out = tmp_path / "out"
    line = run_cli(["score", str(MEMORIZED), "--out", str(out), "--scorer", "taylor-gap",
                    "--batches", "1", "--train-data", str(folder)],
                   capsys, [folder, MEMORIZED], out)
    assert f"image folder {folder}" in line  # the error names the folder, not just the images


def test_recovery_images_beyond_the_model_are_refused(memorized) -> None:
    loaded, train, labels, _ = memorized
    student = copy.deepcopy(loaded.model)
    with pytest.raises(DitPruneError, match=r"recovery images: labels span \[0, 10\]"):
        distill(student, loaded.model, train[:11], torch.arange(11), steps=1, progress=False)
    with pytest.raises(DitPruneError, match=r"recovery images are \(1, 16, 16\)"):
        finetune(student, torch.zeros(4, 1, 16, 16), torch.zeros(4, dtype=torch.long), steps=1,
                 progress=False)


# ---------------------------------------------------------------- metrics: refusals


def _torchscript_features(tmp_path: Path) -> TorchScriptFeatureExtractor:
    class Mean(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))  # (B, 3)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(Mean()).save(str(tmp_path / "toy.pt"))
    return load_feature_extractor(tmp_path / "toy.pt")


def _metric_call(name: str, fixtures: dict[str, Any]) -> Callable[[], Any]:
    """The call of case `name` (see METRIC_CASES)."""
    train, held, det, feats = (fixtures["train"], fixtures["held"], fixtures["detector"],
                               fixtures["features"])
    uint8 = ((train + 1) * 127.5).round().to(torch.uint8)
    calls: dict[str, Callable[[], Any]] = {
        "mem train uint8": lambda: memorization_report(train, uint8),
        "mem train 0-255": lambda: memorization_report(train, uint8.float()),
        "mem samples 0-255": lambda: memorization_report(uint8.float(), train),
        "mem samples uint8": lambda: memorization_report(uint8, train),
        "mem samples nan": lambda: memorization_report(torch.full_like(train, NAN), train),
        "mem train inf": lambda: memorization_report(train, train.clone().fill_(math.inf)),
        "mem channels": lambda: memorization_report(train.repeat(1, 3, 1, 1), train),
        "measure train uint8": lambda: measure_memorization(
            fixtures["pipe"], [1, 2], [0, 1], uint8, steps=2),
        "features uint8": lambda: feats.features(uint8),
        "features 0-255": lambda: feats.features(uint8.float()),
        "features nan": lambda: feats.features(torch.full_like(train, NAN)),
        "features channels": lambda: feats.features(train.repeat(1, 3, 1, 1)),
        "predict 0-255": lambda: feats.predict(uint8.float()),
        "torchscript features inf": lambda: fixtures["torchscript"].features(
            train.clone().fill_(-math.inf)),
        "torchscript features uint8": lambda: fixtures["torchscript"].features(uint8),
        "copy samples uint8": lambda: copy_report(uint8, train, det, heldout_images=held),
        "copy train 0-255": lambda: copy_report(train, uint8.float(), det, heldout_images=held),
        "copy heldout nan": lambda: copy_report(train, train, det,
                                                heldout_images=torch.full_like(held, NAN)),
        "copy heldout channels": lambda: copy_report(train, train, det,
                                                     heldout_images=held.repeat(1, 3, 1, 1)),
        "copy samples channels": lambda: copy_report(train.repeat(1, 3, 1, 1), train, det,
                                                     threshold=0.9),
        "copy no heldout": lambda: copy_report(train, train, det),
        "copy nan threshold": lambda: copy_report(train, train, det, threshold=NAN),
    }
    return calls[name]


METRIC_CASES = [
    ("mem train uint8", r"train_images: images are torch\.uint8"),
    ("mem train 0-255", r"train_images: pixel values span \[0, 255\], expected \[-1, 1\]"),
    ("mem samples 0-255", r"samples: pixel values span \[0, 255\]"),
    ("mem samples uint8", r"samples: images are torch\.uint8"),
    ("mem samples nan", r"samples: images contain NaN"),
    ("mem train inf", r"train_images: images contain NaN or infinite"),
    ("mem channels", r"samples are \(3, 8, 8\) but training images are \(1, 8, 8\)"),
    ("measure train uint8", r"train_images: pixel values span \[0, 255\]"),
    ("features uint8", r"images: images are torch\.uint8"),
    ("features 0-255", r"images: pixel values span \[0, 255\]"),
    ("features nan", r"images: images contain NaN"),
    ("features channels", r"digitsnet feature network takes \(N, 1, 8, 8\)"),
    ("predict 0-255", r"images: pixel values span \[0, 255\]"),
    ("torchscript features inf", r"images: images contain NaN or infinite"),
    ("torchscript features uint8", r"images: images are torch\.uint8"),
    ("copy samples uint8", r"samples: images are torch\.uint8"),
    ("copy train 0-255", r"train_images: pixel values span \[0, 255\]"),
    ("copy heldout nan", r"heldout_images: images contain NaN"),
    ("copy heldout channels", r"heldout_images: images are \(3, 8, 8\), expected \(1, 8, 8\)"),
    ("copy samples channels", r"samples: images are \(3, 8, 8\), expected \(1, 8, 8\)"),
    ("copy no heldout", r"needs heldout_images .* or an explicit threshold .*stored tau"),
    ("copy nan threshold", r"threshold must be a finite number, got nan"),
]


@pytest.fixture(scope="module")
def metric_inputs(memorized, detector, features, tmp_path_factory) -> dict[str, Any]:
    _, train, _, split = memorized
    pipe = pixel_dit_pipeline(new_dit("tiny", 10, 8, 1), diffusers.DDIMScheduler())
    return {"train": train, "held": split.heldout_images[:50], "detector": detector,
            "features": features, "pipe": pipe,
            "torchscript": _torchscript_features(tmp_path_factory.mktemp("ts"))}


@pytest.mark.parametrize(("case", "message"), METRIC_CASES, ids=[c[0] for c in METRIC_CASES])
def test_metrics_refuse_images_off_their_scale(metric_inputs, case, message) -> None:
    with pytest.raises(DitPruneError, match=message):
        _metric_call(case, metric_inputs)()


def test_exact_copies_give_full_rates_and_tau_is_calibrated_on_heldout(metric_inputs) -> None:
    train, held, det = metric_inputs["train"], metric_inputs["held"], metric_inputs["detector"]
    assert memorization_report(train, train).rate == 1.0
    report = copy_report(train, train, det, heldout_images=held)
    assert report.rate == 1.0 and report.threshold_source == "held-out (50 images)"
    given = copy_report(train, train, det, threshold=report.threshold)
    assert given.threshold_source == "given" and given.rate == 1.0


# ---------------------------------------------------------------- weights and devices


@pytest.mark.parametrize(("how", "file", "phrase"), CHECKPOINT_CASES,
                         ids=[c[0] for c in CHECKPOINT_CASES])
def test_broken_checkpoints_are_one_line_naming_the_file(tmp_path, how, file, phrase) -> None:
    root = broken_checkpoint(tmp_path, how)
    with pytest.raises(DitPruneError) as caught:
        load_dit(root)
    message = str(caught.value)
    assert "\n" not in message and file in message and phrase in message, message


@pytest.mark.parametrize(("how", "file", "phrase"),
                         [c for c in CHECKPOINT_CASES
                          if c[0] in ("config-list", "nan-weights", "meta-list",
                                      "structure-string", "beta-schedule")])
def test_broken_checkpoints_cli(tmp_path, capsys, how, file, phrase) -> None:
    root = broken_checkpoint(tmp_path, how)
    out = tmp_path / "out"
    line = run_cli(["score", str(root), "--out", str(out), "--scorer", "magnitude"],
                   capsys, [root], out)
    assert file in line and phrase in line


@pytest.mark.parametrize(("device", "message"), [
    ("gpu0", "unknown device 'gpu0'"),
    ("cuda:99", "device 'cuda:99'"),
    ("cuda:x", "unknown device 'cuda:x'"),
])
def test_bad_device_names(device, message) -> None:
    if device == "cuda:99" and torch.cuda.device_count() >= 100:
        pytest.skip("a machine with 100 GPUs")
    with pytest.raises(DitPruneError, match=message):
        load_dit(MEMORIZED, device=device)


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize(("options", "message"), [
    ({"steps": 0}, r"sampling steps must be an integer in \[1, 1000\].*got 0"),
    ({"steps": -3}, r"got -3"),
    ({"steps": 1001}, r"got 1001"),
    ({"steps": 2.5}, r"got 2\.5"),
    ({"guidance_scale": NAN}, r"guidance scale must be a finite number, got nan"),
    ({"guidance_scale": math.inf}, r"got inf"),
    ({"guidance_scale": -math.inf}, r"got -inf"),
    ({"labels": [3, 10]}, r"labels must lie in \[0, 9\]"),
])
def test_sample_images_refuses(tiny_model, options, message) -> None:
    args = {"labels": [3, 7], "steps": 2, "guidance_scale": 1.0, **options}
    with pytest.raises(DitPruneError, match=message):
        sample_images(tiny_model, diffusers.DDPMScheduler(), args.pop("labels"), [0, 1],
                      progress=False, **args)


# ---------------------------------------------------------------- scorers: labels and dtypes


@pytest.mark.parametrize(("split", "labels", "message"), [
    ("train", [0, 1, 10, 2], r"training images: labels span \[0, 10\]"),
    ("train", [0, -1, 2, 3], r"training images: labels span \[-1, 3\]"),
    ("heldout", [0, 1, 12, 2], r"held-out images: labels span \[0, 12\]"),
])
def test_scorer_labels_beyond_the_classes(tiny_model, digits, split, labels, message) -> None:
    bad = torch.tensor(labels)
    good = digits.pool_labels[:4]
    data = CalibrationData(digits.pool_images[:4], bad if split == "train" else good,
                           digits.heldout_images[:4], bad if split == "heldout" else good)
    for name in ("taylor-gap", "sensitivity"):
        with pytest.raises(DitPruneError, match=message):
            get_scorer(name, batches=1).score(tiny_model, enumerate_units(tiny_model, ["head"]),
                                              data)


SCORER_OPTIONS = {"cond-gap": {"num_samples": 8, "sampling_steps": 10},
                  "activation-contrast": {"num_samples": 8, "sampling_steps": 10}}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scorer", ["taylor-gap", "ablation-gap", "sensitivity", "ye2025",
                                    "cond-gap", "activation-contrast", "magnitude"])
def test_half_precision_models_score(memorized, scorer, dtype) -> None:
    loaded, train, labels, split = memorized
    model = copy.deepcopy(loaded.model).to(dtype)
    data = CalibrationData(train[:16], labels[:16], split.heldout_images[:16],
                           split.heldout_labels[:16])
    units = enumerate_units(model, ["head"])
    options = {"batches": 1, "progress": False, **SCORER_OPTIONS.get(scorer, {})}
    if scorer == "ablation-gap":
        units = units[:3]
    scores = get_scorer(scorer, **options).score(model, units, data, loaded.scheduler)
    assert scores.shape == (len(units),) and scores.dtype == torch.float64
    assert torch.isfinite(scores).all()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sampling_and_pipeline_pruning(memorized, dtype) -> None:
    loaded, train, labels, split = memorized
    model = copy.deepcopy(loaded.model).to(dtype)
    images = sample_images(model, loaded.scheduler, [1, 2], [0, 1], steps=5, guidance_scale=2.0,
                           progress=False)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1
    reference = sample_images(loaded.model, loaded.scheduler, [1, 2], [0, 1], steps=5,
                              guidance_scale=2.0, progress=False)
    assert (images - reference).abs().max() < 0.25  # the same images, at half precision
    data = CalibrationData(train[:16], labels[:16], split.heldout_images[:16],
                           split.heldout_labels[:16])
    pipe = pixel_dit_pipeline(model, loaded.scheduler)
    result = score_and_prune_pipeline(pipe, get_scorer("taylor-gap", batches=1, progress=False),
                                      0.25, data, kinds=("head",))
    assert len(result.removed) == 4 and result.pipeline.transformer.dtype == dtype


# ---------------------------------------------------------------- per-block label dropout


def _stock_dit() -> diffusers.DiTTransformer2DModel:
    """A DiT as diffusers builds it (and `DiTPipeline.from_pretrained` loads it): per-block
    label dropout 0.1."""
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(
        num_layers=2, num_attention_heads=2, attention_head_dim=8, in_channels=1,
        out_channels=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1)
    assert _dropouts(model) == {0.1}
    return model.eval()


def _dropouts(model: torch.nn.Module) -> set[float]:
    return {m.dropout_prob for m in model.modules() if type(m).__name__ == "LabelEmbedding"}


def test_distill_of_a_stock_diffusers_dit_identical_to_its_teacher_has_loss_zero(digits) -> None:
    teacher = _stock_dit()
    student = copy.deepcopy(teacher)  # identical weights, per-block label dropout 0.1
    result = distill(student, teacher, digits.pool_images[:16], digits.pool_labels[:16],
                     steps=3, batch_size=8, progress=False)
    assert result.losses == [0.0, 0.0, 0.0]  # was ~1e-4: labels dropped per block in training
    assert _dropouts(student) == {0.0} and _dropouts(teacher) == {0.1}


@pytest.mark.parametrize("path", ["pixel_dit_pipeline", "prune_pipeline",
                                  "score_and_prune_pipeline"])
def test_pipeline_wrapper_switches_per_block_label_dropout_off(digits, path) -> None:
    pipe = diffusers.DiTPipeline(transformer=_stock_dit(), vae=IdentityVAE(),
                                 scheduler=diffusers.DDIMScheduler())
    if path == "pixel_dit_pipeline":
        model = pixel_dit_pipeline(_stock_dit(), diffusers.DDIMScheduler()).transformer
    elif path == "prune_pipeline":
        model = prune_pipeline(pipe, [Unit("head", 0, 1)]).transformer
    else:
        data = CalibrationData(digits.pool_images[:8], digits.pool_labels[:8],
                               digits.heldout_images[:8], digits.heldout_labels[:8])
        model = score_and_prune_pipeline(pipe, "magnitude", 0.25, data,
                                         kinds=("head",)).pipeline.transformer
    assert _dropouts(model) == {0.0}


@pytest.mark.parametrize(("options", "message"), [
    ({"steps": 0}, r"sampling steps must be an integer in \[1, 1000\]"),
    ({"steps": 5000}, r"got 5000"),
    ({"guidance_scale": NAN}, r"guidance scale must be a finite number, got nan"),
])
def test_generate_decoded_and_measure_memorization_refuse(tiny_model, digits, options,
                                                          message) -> None:
    pipe = pixel_dit_pipeline(tiny_model, diffusers.DDIMScheduler())
    args = {"steps": 2, "guidance_scale": 1.0, **options}
    with pytest.raises(DitPruneError, match=message):
        measure_memorization(pipe, [1, 2], [0, 1], digits.pool_images[:4], **args)
