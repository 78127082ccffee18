"""Text-to-image: caption folders, caption encoding per family, prune -> generate -> save ->
reload on PixArt-Σ / SD3 / Flux / Sana, and `dit-prune run` end to end on a tiny text-to-image
digits pipeline (scorers on every text family: tests/test_text_scorers.py; a latent pipeline's
run: tests/test_text_latent_run.py)."""

from __future__ import annotations

import json

import pytest
import torch

from dit_prune.cli import main
from dit_prune.errors import DitPruneError
from dit_prune.hooks import ablate
from dit_prune.pipelines import generate_decoded, load_pruned_pipeline, prune_pipeline
from dit_prune.pipelines.caption_labels import (
    CaptionLabels,
    caption_conditioning,
    flux_model_space,
)
from dit_prune.pipelines.digits_text import digits_text_pipeline
from dit_prune.pipelines.io import save_pipeline
from dit_prune.pipelines.text_encoding import CaptionCache
from dit_prune.pipelines.tiny import (
    tiny_flux_pipeline,
    tiny_pixart_sigma_pipeline,
    tiny_sana_pipeline,
    tiny_sd3_pipeline,
)
from dit_prune.pipelines.vae import encode_images
from dit_prune.text_data import (
    MAX_MEMORIZED,
    digits_text_rows,
    load_caption_folder,
    memorized_caption,
    write_caption_folder,
)
from dit_prune.text_training import TextTrainConfig, train_text_pipeline
from dit_prune.units import Unit, enumerate_units

torch.set_num_threads(1)
PROMPTS = ["a red cat", "a small blue dog"]
FAMILIES = {
    "pixart-sigma": (tiny_pixart_sigma_pipeline, {}),
    "sd3": (tiny_sd3_pipeline, {}),
    "flux": (tiny_flux_pipeline, {"height": 16, "width": 16}),
    "sana": (tiny_sana_pipeline, {}),
}


# --- caption folders ------------------------------------------------------------------------

def test_caption_folder_round_trip_keeps_rows_and_copies(tmp_path):
    images = torch.linspace(-1, 1, 3 * 64).view(3, 1, 8, 8)
    write_caption_folder(tmp_path / "f", images[[0, 1, 0]], ["a", "b", "a"], files=[0, 1, 0])
    rows = load_caption_folder(tmp_path / "f")
    assert rows.captions == ("a", "b", "a")
    assert rows.files[0] == rows.files[2] != rows.files[1]
    assert len(list((tmp_path / "f").glob("*.png"))) == 2
    assert (rows.images - images[[0, 1, 0]]).abs().max() <= 1 / 255 + 1e-6
    assert rows.caption_counts() == {"a": 2, "b": 1}


@pytest.mark.parametrize("lines, message", [
    (None, "has no metadata.jsonl"),
    (['{"file_name": "000000.png", "text": "a"}', "{oops"], r"metadata.jsonl:2: invalid JSON"),
    (['{"file_name": "000000.png"}'], r":1: needs a string 'text'"),
    (['{"file_name": "nope.png", "text": "a"}'], r"image 'nope.png' not found"),
    (['{"file_name": "../x.png", "text": "a"}'], "lies outside"),
    ([], "lists no images"),
])
def test_bad_caption_folders_give_one_line_errors(tmp_path, lines, message):
    root = tmp_path / "f"
    write_caption_folder(root, torch.zeros(1, 1, 8, 8), ["a"])
    if lines is None:
        (root / "metadata.jsonl").unlink()
    else:
        (root / "metadata.jsonl").write_text("\n".join(lines))
    with pytest.raises(DitPruneError, match=message) as err:
        load_caption_folder(root)
    assert "\n" not in str(err.value)


def test_caption_folder_images_must_share_one_size(tmp_path):
    from PIL import Image

    root = tmp_path / "f"
    write_caption_folder(root, torch.zeros(1, 1, 8, 8), ["a"])
    Image.new("L", (4, 4)).save(root / "small.png")
    with open(root / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "small.png", "text": "b"}) + "\n")
    with pytest.raises(DitPruneError, match="all must match"):
        load_caption_folder(root)


def test_digits_rows_repeat_memorized_captions_and_share_generic_ones():
    rows, record = digits_text_rows({"subset": "all", "duplicate": "10x50"})
    assert len(rows) == 1000 + 10 * 49 == record["num_rows"]
    counts = rows.caption_counts()
    memorized = record["memorized_captions"]
    assert len(set(memorized)) == 10 and all(counts[c] == 50 for c in memorized)
    generic = [c for c in counts if c not in memorized]
    assert len(generic) == 10 and min(counts[c] for c in generic) > 60
    assert len({memorized_caption(i) for i in range(MAX_MEMORIZED)}) == MAX_MEMORIZED


# --- caption encoding and conditioning ------------------------------------------------------

@pytest.mark.parametrize("family", ["pixart-sigma", "sd3", "sana", "flux"])
def test_caption_cache_encodes_with_each_family_encode_prompt(family):
    pipe = FAMILIES[family][0]()
    cache = CaptionCache.build(pipe, PROMPTS + PROMPTS[:1])
    assert cache.captions == (*PROMPTS, "") and cache.null_row == 2
    kwargs = cache.model_kwargs(torch.tensor([1, 2]))
    assert kwargs["encoder_hidden_states"].shape[0] == 2
    assert torch.isfinite(kwargs["encoder_hidden_states"]).all()
    if family in ("sd3", "flux"):
        assert kwargs["pooled_projections"].shape[0] == 2
    if family == "flux":
        assert kwargs["txt_ids"].shape[-1] == 3
    if family in ("pixart-sigma", "sana"):
        assert kwargs["encoder_attention_mask"].sum(1).tolist()[1] == 1  # "" is one token


def test_caption_labels_skip_the_null_label_and_condition_like_direct_calls():
    pipe = digits_text_pipeline(layers=1, heads=2, head_dim=8)
    labels = CaptionLabels.build(pipe, ["a red dog poster", "a handwritten digit one"])
    y = labels.of(["a red dog poster", "a handwritten digit one", ""])
    assert y.tolist() == [0, 1, 1000] and labels.rows(y).tolist() == [0, 1, 2]
    with pytest.raises(DitPruneError, match="caption not encoded"):
        labels.of(["a blue cat"])
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 900])
    model = pipe.transformer
    with caption_conditioning(model, labels):
        hooked = model(x, timestep=t, class_labels=y).sample
    assert not model._forward_pre_hooks  # nothing stays behind
    direct = model(x, timestep=t, **labels.cache.model_kwargs(labels.rows(y))).sample
    torch.testing.assert_close(hooked, direct)


def test_flux_conditioning_equals_the_pipelines_packed_call():
    pipe = tiny_flux_pipeline()
    latents = encode_images(pipe, torch.rand(2, 3, 16, 16) * 2 - 1)  # (2, 1, 8, 8)
    labels = CaptionLabels.build(pipe, PROMPTS)
    y = labels.of(PROMPTS)
    model = pipe.transformer
    with torch.no_grad():
        with caption_conditioning(model, labels):
            hooked = model(flux_model_space(latents), timestep=torch.tensor([400.0, 400.0]),
                           class_labels=y).sample  # (2, 4, 4, 4)
        packed = pipe._pack_latents(latents, 2, 1, 8, 8)  # (2, 16, 4)
        ids = pipe._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)  # (16, 3)
        out = model(packed, timestep=torch.tensor([0.4, 0.4]), img_ids=ids,
                    **labels.cache.model_kwargs(labels.rows(y))).sample
    direct = pipe._unpack_latents(out, 16, 16, pipe.vae_scale_factor)  # (2, 1, 8, 8)
    torch.testing.assert_close(torch.nn.functional.pixel_shuffle(hooked, 2), direct)
    assert not model._forward_hooks and not model._forward_pre_hooks


# --- pipelines: prune -> generate -> save -> reload -----------------------------------------

def _some_units(model) -> list[Unit]:
    """The first unit of every kind the family has, its last one (heads: in another block, so
    that each block keeps one), and one more neuron of each neuron kind."""
    units = enumerate_units(model)
    chosen: list[Unit] = []
    for kind in dict.fromkeys(u.kind for u in units):
        of_kind = [u for u in units if u.kind == kind]
        ends = [of_kind[0]] + ([of_kind[-1]] if of_kind[-1].block != of_kind[0].block or
                               "neuron" in kind else [])
        chosen += ends + (of_kind[2:3] if "neuron" in kind else [])
    return chosen


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prune_generate_save_reload(family, tmp_path):
    build, size = FAMILIES[family]
    pipe = build()
    units = _some_units(pipe.transformer)
    pruned = prune_pipeline(pipe, units)
    assert sum(p.numel() for p in pruned.transformer.parameters()) < \
        sum(p.numel() for p in pipe.transformer.parameters())
    images = generate_decoded(pruned, PROMPTS, [0, 1], steps=3, guidance_scale=2.0, **size)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    with ablate(pipe.transformer, units):  # pruned == ablated, same seeds
        ablated = generate_decoded(pipe, PROMPTS, [0, 1], steps=3, guidance_scale=2.0, **size)
    torch.testing.assert_close(images, ablated, atol=2e-4, rtol=0)
    save_pipeline(pruned, tmp_path / "p")
    again = load_pruned_pipeline(tmp_path / "p")
    assert type(again) is type(pipe)
    assert type(again.scheduler) is type(pipe.scheduler)  # flow matching stays flow matching
    reloaded = generate_decoded(again, PROMPTS, [0, 1], steps=3, guidance_scale=2.0, **size)
    torch.testing.assert_close(reloaded, images, atol=1e-5, rtol=0)


def test_flow_matching_pipelines_keep_their_scheduler():
    pipe = tiny_sd3_pipeline()
    ddim = generate_decoded(pipe, PROMPTS, [0, 1], steps=3, sampler="ddim")
    own = generate_decoded(pipe, PROMPTS, [0, 1], steps=3, sampler="pipeline")
    torch.testing.assert_close(ddim, own)  # no DDIM swap for a flow-matching scheduler
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"


# --- training and the run ---------------------------------------------------------------------

def test_text_training_resumes_to_the_same_weights(tmp_path):
    rows, _ = digits_text_rows({"subset": "20", "duplicate": "10x3"})
    config = TextTrainConfig(steps=4, batch_size=4)

    def train(state_dir, steps_first=None):
        pipe = digits_text_pipeline(layers=1, heads=2, head_dim=8)
        if steps_first:
            first = digits_text_pipeline(layers=1, heads=2, head_dim=8)
            part = TextTrainConfig(**{**config.__dict__, "steps": steps_first})
            with pytest.raises(DitPruneError, match="another run"):  # other config: refused
                train_text_pipeline(first, rows, part, False, state_dir, 1)
        return train_text_pipeline(pipe, rows, config, False, state_dir, 2)

    whole = train(None)
    state = tmp_path / "state"
    digits = digits_text_pipeline(layers=1, heads=2, head_dim=8)
    train_text_pipeline(digits, rows, TextTrainConfig(steps=4, batch_size=4), False, state, 2)
    resumed = train(state)
    assert resumed.losses == whole.losses
    for a, b in zip(whole.pipeline.transformer.parameters(),
                    resumed.pipeline.transformer.parameters(), strict=True):
        assert torch.equal(a, b)


def test_text_training_run_key_is_the_same_in_a_new_process():
    import subprocess
    import sys

    code = ("from dit_prune.text_data import digits_text_rows;"
            "from dit_prune.text_training import TextTrainConfig, _run_key;"
            "from dit_prune.pipelines.digits_text import digits_text_pipeline;"
            "rows, _ = digits_text_rows({'subset': '20', 'duplicate': '10x3'});"
            "print(_run_key(rows, TextTrainConfig(), digits_text_pipeline(layers=1).transformer))")
    keys = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={"PYTHONHASHSEED": str(seed), "OMP_NUM_THREADS": "1"},
                           check=True).stdout.strip() for seed in (1, 2)}
    assert len(keys) == 1


@pytest.fixture(scope="module")
def tiny_text_checkpoint(tmp_path_factory):
    """A few steps of `dit-prune train --model text` on 20 digits, 10 of them memorized x3."""
    out = tmp_path_factory.mktemp("t2i") / "ckpt"
    code = main(["train", "--model", "text", "--subset", "20", "--duplicate", "10x3",
                 "--steps", "10", "--batch-size", "8", "--checkpoint-every", "0",
                 "--out", str(out)])
    assert code == 0
    return out


def test_train_text_refuses_size_options(tmp_path, capsys):
    code = main(["train", "--model", "text", "--size", "small", "--out", str(tmp_path / "x")])
    assert code == 2
    assert "fixed size; drop --size" in capsys.readouterr().err


def test_run_on_a_text_to_image_pipeline_writes_the_full_report(tiny_text_checkpoint, tmp_path):
    out = tmp_path / "run"
    code = main(["run", str(tiny_text_checkpoint), "--out", str(out), "--seeds", "0-39",
                 "--steps", "3", "--budget", "2", "--random-seeds", "3,1",
                 "--retrigger-targets", "1", "--retrigger-steps", "1",
                 "--retrigger-ddim-steps", "2", "--scorer-option", "batches=1"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("verdict", "before", "after", "random_baseline", "noise_control",
                "equal_quality", "prompts"):
        assert key in report, key
    groups = report["prompts"]["groups"]
    assert groups["memorized"]["num_samples"] + groups["other"]["num_samples"] == 40
    assert report["prompts"]["most_copied"][0]["prompt"]
    markdown = (out / "report.md").read_text()
    assert "## Prompts (text-to-image)" in markdown
    assert report["prompts"]["random_seed"] == 3  # the table's random arm: the first seed
    section = markdown.split("## Prompts (text-to-image)")[1]
    assert "| random (seed 3) |" in section and "seed 0" not in section
    again = load_pruned_pipeline(out / "pruned")
    assert type(again).__name__ == "PixArtSigmaPipeline"
    assert "dit_prune_structure" in again.transformer.config


def test_run_with_caption_folders(tiny_text_checkpoint, tmp_path):
    rows, _ = digits_text_rows({"subset": "20", "duplicate": "10x3"})
    from dit_prune.text_data import digits_text_heldout

    held = digits_text_heldout()
    write_caption_folder(tmp_path / "train", rows.images, rows.captions,
                         files=[int(f.split(".")[0]) for f in rows.files])
    write_caption_folder(tmp_path / "held", held.images[:30], held.captions[:30])
    out = tmp_path / "run"
    code = main(["run", str(tiny_text_checkpoint), "--out", str(out), "--seeds", "0-19",
                 "--steps", "2", "--budget", "1", "--random-seeds", "0",
                 "--retrigger-targets", "0", "--scorer-option", "batches=1",
                 "--budget-mode", "cross_heads",
                 "--train", str(tmp_path / "train"), "--heldout", str(tmp_path / "held")])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["units_removed"] == {"cross_head": 1}
    assert report["before"]["class_agreement"] is None  # classes unknown in a folder
    assert set(report["prompts"]["groups"]) == {"other"}


def test_run_on_text_needs_both_folders(tiny_text_checkpoint, tmp_path, capsys):
    write_caption_folder(tmp_path / "train", torch.zeros(2, 1, 8, 8), ["a", "b"])
    code = main(["run", str(tiny_text_checkpoint), "--out", str(tmp_path / "r"),
                 "--train", str(tmp_path / "train")])
    assert code == 2
    assert "needs --heldout FOLDER" in capsys.readouterr().err


# --- the shipped model -------------------------------------------------------------------------

def test_shipped_text_model_copies_its_memorized_prompts_and_no_others():
    """Re-measure the card's two copy rates on 3 samples per memorized prompt (30) and 6 per
    other prompt (60): the card has 100% and 0.1% on 500 and 990; the bounds are the issue's
    (>= 50%, <= 5%), far outside the subsampling error of 30 and 60 samples."""
    from dit_prune.evaluate import digits_context, evaluate_samples
    from dit_prune.sampling import sample_images
    from tests.conftest import CHECKPOINTS

    path = CHECKPOINTS / "digits-text"
    meta = json.loads((path / "dit_prune.json").read_text())
    pipe = load_pruned_pipeline(path)
    rows, record = digits_text_rows(meta["data"])
    memorized = record["memorized_captions"]
    other = sorted({c for c in rows.captions if c not in memorized})
    prompts = [c for c in memorized for _ in range(3)] + [c for c in other for _ in range(6)]
    labels = CaptionLabels.build(pipe, list(rows.captions))
    with caption_conditioning(pipe.transformer, labels):
        images = sample_images(pipe.transformer, pipe.scheduler, labels.of(prompts),
                               list(range(len(prompts))), steps=50, progress=False)
    context = digits_context(train_images=rows.images[: record["num_images"]])
    copies = evaluate_samples(images, None, context).copy.copies.float()
    assert copies[:30].mean() >= 0.5
    assert copies[30:].mean() <= 0.05


def test_cross_heads_mode_on_a_class_conditional_model_fails_before_work(tmp_path, capsys):
    from tests.conftest import CHECKPOINTS

    out = tmp_path / "run"
    code = main(["run", str(CHECKPOINTS / "digits-duplicated"), "--out", str(out),
                 "--budget-mode", "cross_heads", "--budget", "2"])
    assert code == 2 and not out.exists()
    assert "finds no cross_head units in DiTTransformer2DModel" in capsys.readouterr().err
