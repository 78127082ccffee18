"""A new user's reports: save_pipeline's overwrite rule and carried records, eval on a saved
pixel-space pipeline, numbered class folders, `dit-prune index` on a damaged store, and
prompts given to a class-conditional pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import diffusers
import pytest
import torch

from dit_prune.checkpoint import load_dit, save_checkpoint
from dit_prune.cli import main
from dit_prune.data import balanced_subset, digits_split, load_image_folder
from dit_prune.errors import DitPruneError
from dit_prune.models import new_dit
from dit_prune.pipelines import (
    generate_decoded,
    load_pruned_pipeline,
    pixel_dit_pipeline,
    prune_pipeline,
    save_pipeline,
)
from dit_prune.units import Unit

from .conftest import CHECKPOINTS

UNITS = [Unit("head", 0, 1)]


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative path -> bytes)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny untrained class-conditional DiT with a training record and a model card."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ck") / "tiny"
    indices = balanced_subset(digits_split().pool_labels, 20, seed=0).tolist()
    save_checkpoint(new_dit("tiny", 10, 8, 1).eval(), diffusers.DDPMScheduler(), path,
                    extra={"data": {"source": "digits", "pool_indices": indices}})
    (path / "MODEL_CARD.md").write_text("# tiny\n\nhand-written card\n")
    return path


@pytest.fixture()
def source(checkpoint, tmp_path) -> Path:
    """A copy of the checkpoint with a file added by hand (the tester's repro)."""
    copy = tmp_path / "ckcopy"
    shutil.copytree(checkpoint, copy)
    (copy / "NOTES.txt").write_text("note\n")
    return copy


# 1. save_pipeline(..., overwrite=True)


def test_overwrite_never_replaces_the_source_directory(source):
    before = _tree(source)
    pruned = prune_pipeline(load_pruned_pipeline(source), UNITS)
    for target in (source, source / "pruned", source.parent):
        with pytest.raises(DitPruneError, match="source directory"):
            save_pipeline(pruned, target, overwrite=True)
    assert _tree(source) == before


def test_overwrite_refuses_unmarked_and_foreign_directories(source, tmp_path):
    pipe = load_pruned_pipeline(source)
    other = tmp_path / "unmarked"
    other.mkdir()
    (other / "x.txt").write_text("mine")
    with pytest.raises(DitPruneError, match="no .dit_prune_run marker") as info:
        save_pipeline(pipe, other, overwrite=True)
    assert "\n" not in str(info.value) and (other / "x.txt").read_text() == "mine"
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)  # a checkpoint loaded from elsewhere: unmarked
    with pytest.raises(DitPruneError, match="no .dit_prune_run marker"):
        save_pipeline(pipe, copy, overwrite=True)
    assert (copy / "NOTES.txt").is_file()


def test_overwrite_replaces_an_earlier_save_but_not_added_files(source, tmp_path):
    pipe = load_pruned_pipeline(source)
    out = tmp_path / "saved"
    save_pipeline(pipe, out)
    with pytest.raises(DitPruneError, match="not empty"):
        save_pipeline(pipe, out)
    save_pipeline(prune_pipeline(pipe, UNITS), out, overwrite=True)  # its own output
    assert load_pruned_pipeline(out).transformer.transformer_blocks[0].attn1.heads == 3
    (out / "scheduler" / "NOTES.txt").write_text("mine")
    with pytest.raises(DitPruneError, match="scheduler/NOTES.txt, which save_pipeline"):
        save_pipeline(pipe, out, overwrite=True)
    assert (out / "scheduler" / "NOTES.txt").read_text() == "mine"


def test_a_saved_pipeline_cannot_be_overwritten_in_place(source, tmp_path):
    """Loaded from a saved pipeline, saving back into it is refused (it is the source)."""
    out = tmp_path / "saved"
    save_pipeline(load_pruned_pipeline(source), out)
    again = load_pruned_pipeline(out)
    with pytest.raises(DitPruneError, match="is the pipeline's source directory"):
        save_pipeline(prune_pipeline(again, UNITS), out, overwrite=True)


def test_run_pruned_folder_of_an_older_version_is_still_replaced(tmp_path):
    """`dit-prune run` saves its text pipeline into its own `pruned/` with overwrite: a
    `pruned/` without its own marker inside a run directory holding only the run's files (an
    older version's run) is replaced; one holding a file of someone else's is not."""
    from dit_prune.commands.common import mark_finished, mark_started

    pipe = pixel_dit_pipeline(new_dit("tiny", 10, 8, 1), diffusers.DDIMScheduler())
    run_dir = tmp_path / "run"
    save_pipeline(pipe, run_dir / "pruned")
    (run_dir / "pruned" / ".dit_prune_run").unlink()  # as an older version wrote it
    (run_dir / "report.md").write_text("report")
    mark_finished(run_dir, "run")
    mark_started(run_dir, "run")  # a resumed run, as _claim_run_dir marks it
    save_pipeline(prune_pipeline(pipe, UNITS), run_dir / "pruned", overwrite=True)
    assert (run_dir / "pruned" / ".dit_prune_run").is_file()
    (run_dir / "pruned" / "NOTES.txt").write_text("mine")
    mark_started(run_dir, "run", ("pruned/NOTES.txt",))
    (run_dir / "pruned" / ".dit_prune_run").unlink()
    with pytest.raises(DitPruneError, match="NOTES.txt, which save_pipeline did not write"):
        save_pipeline(pipe, run_dir / "pruned", overwrite=True)
    assert (run_dir / "pruned" / "NOTES.txt").is_file()


# 2. eval on a saved pixel-space pipeline; the training record goes with it


def test_saved_pipeline_carries_the_training_record_and_a_card(source, tmp_path):
    out = save_pipeline(prune_pipeline(load_pruned_pipeline(source), UNITS), tmp_path / "p")
    record = json.loads((out / "dit_prune.json").read_text())
    assert record["data"] == json.loads((source / "dit_prune.json").read_text())["data"]
    assert record["saved_pipeline"]["source"] == str(source.resolve())
    assert load_dit(out).meta.extra["data"]["pool_indices"] == record["data"]["pool_indices"]
    card = (out / "MODEL_CARD.md").read_text()
    assert "pruned copy" in card and str(source.resolve()) in card and "head: 15 of 16" in card
    assert not (out / "NOTES.txt").exists()


@pytest.mark.filterwarnings("ignore:20 generated samples")
def test_eval_takes_a_saved_pixel_space_pipeline(checkpoint, tmp_path, capsys):
    saved = save_pipeline(prune_pipeline(load_pruned_pipeline(checkpoint), UNITS),
                          tmp_path / "pruned")
    assert (saved / "model_index.json").is_file()
    out = tmp_path / "ev"
    argv = ["eval", str(saved), "--out", str(out), "--seeds", "0-19", "--steps", "2",
            "--device", "cpu", "--stats-cache", str(tmp_path / "cache")]
    assert main(argv) == 0  # training images: the carried dit_prune.json
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["num_samples"] == 20 and "from the checkpoint (20)" in doc["train_images"]


def test_text_run_saves_again_into_its_own_pruned_folder_but_keeps_added_files(tmp_path,
                                                                              capsys):
    """`dit-prune run` on a text pipeline, run again (it resumes and saves `pruned/` again with
    overwrite); a file added to `pruned/` by hand makes the save fail in one line, kept."""
    checkpoint = tmp_path / "t2i"
    assert main(["train", "--model", "text", "--subset", "20", "--duplicate", "10x3",
                 "--steps", "2", "--batch-size", "8", "--checkpoint-every", "0",
                 "--out", str(checkpoint)]) == 0
    out = tmp_path / "run"
    argv = ["run", str(checkpoint), "--out", str(out), "--seeds", "0-19", "--steps", "2",
            "--budget", "1", "--random-seeds", "0", "--retrigger-targets", "0",
            "--scorer-option", "batches=1"]
    assert main(argv) == 0
    assert main(argv) == 0  # resumed: pruned/ saved again over its own earlier save
    assert type(load_pruned_pipeline(out / "pruned")).__name__ == "PixArtSigmaPipeline"
    (out / "pruned" / "NOTES.txt").write_text("mine")
    capsys.readouterr()
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after progress bars, warnings
    assert last.startswith("dit-prune run: error: save_pipeline: ")
    assert "NOTES.txt, which save_pipeline did not write" in last
    assert (out / "pruned" / "NOTES.txt").read_text() == "mine"


# 3. numbered class folders are their labels


def _class_folder(root: Path, names: list[str], per_class: int = 2) -> Path:
    """8x8 grey PNGs, `per_class` per subfolder; the pixel value encodes the folder's rank."""
    from PIL import Image

    for rank, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("L", (8, 8), 10 * rank + i).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize(("names", "expected"), [
    (["3", "7"], {"3": 3, "7": 7}),
    ([str(i) for i in range(12)], {str(i): i for i in range(12)}),
    (["cat", "dog"], {"cat": 0, "dog": 1}),
    (["10", "2", "cat"], {"10": 0, "2": 1, "cat": 2}),  # not all numbers: sorted position
])
def test_numbered_class_folders_are_their_labels(tmp_path, names, expected):
    from dit_prune.store.sources import FolderSource

    root = _class_folder(tmp_path / "images", names)
    folder = load_image_folder(root)
    by_name = {}
    for rank, name in enumerate(names):
        value = 10 * rank / 255 * 2 - 1  # the folder's first image
        hit = (folder.images[:, 0, 0, 0] - value).abs() < 1e-6
        by_name[name] = int(folder.labels[hit][0])
    assert by_name == expected
    assert len(folder.class_names) == max(expected.values()) + 1
    assert all(folder.class_names[label] == name for name, label in expected.items())
    assert torch.equal(FolderSource(root).labels, folder.labels)  # a store's labels agree


def test_two_folders_of_one_number_are_refused(tmp_path):
    root = _class_folder(tmp_path / "images", ["7", "07"])
    with pytest.raises(DitPruneError, match="both name class 7") as info:
        load_image_folder(root)
    assert "\n" not in str(info.value)


def test_folder_10_is_refused_by_a_10_class_model(tmp_path, capsys):
    from dit_prune.data import check_fits_model

    root = _class_folder(tmp_path / "images", ["0", "10"])
    folder = load_image_folder(root)
    with pytest.raises(DitPruneError, match=r"labels span \[0, 10\] but the model has 10"):
        check_fits_model(folder.images, folder.labels, new_dit("tiny", 10, 8, 1), "x")
    checkpoint = tmp_path / "ck"
    save_checkpoint(new_dit("tiny", 10, 8, 1), diffusers.DDPMScheduler(), checkpoint)
    capsys.readouterr()
    code = main(["score", str(checkpoint), "--out", str(tmp_path / "s"), "--scorer", "magnitude",
                 "--train-data", str(root), "--heldout-data", str(root)])
    assert code == 2 and "labels span [0, 10]" in capsys.readouterr().err


def test_train_on_numbered_folders_makes_a_model_of_their_labels(tmp_path):
    root = _class_folder(tmp_path / "images", ["3", "7"])
    out = tmp_path / "ck"
    assert main(["train", "--data", str(root), "--out", str(out), "--steps", "1",
                 "--batch-size", "2", "--probe-every", "0"]) == 0
    loaded = load_dit(out)
    assert loaded.meta.num_classes == 8  # labels 3 and 7 fit: classes 0-7
    assert loaded.meta.extra["data"]["class_names"][7] == "7"


# 4. `dit-prune index` on a store whose listed embeddings are damaged


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """`dit-prune index` of the digits pool with the shipped copy detector, 4 shards."""
    out = tmp_path_factory.mktemp("store") / "pool"
    assert main(["index", "--images", "digits-pool", "--out", str(out), "--shard-size", "256",
                 "--copy-detector", str(CHECKPOINTS / "digits-copydetect"), "--device", "cpu",
                 "--no-progress"]) == 0
    return out


def _index(out: Path, *extra: str) -> int:
    return main(["index", "--images", "digits-pool", "--out", str(out), "--shard-size", "256",
                 "--device", "cpu", "--no-progress", *extra])


def test_index_without_the_detector_refuses_a_store_missing_its_embeddings(store, tmp_path,
                                                                           capsys):
    from dit_prune.store import open_store
    from dit_prune.store.reuse import verify_shards

    damaged = tmp_path / "st_noemb"
    shutil.copytree(store, damaged)
    for file in damaged.glob("embeddings-*"):
        file.unlink()
    capsys.readouterr()
    assert _index(damaged) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "digits-copydetect" in err and "is missing" in err
    assert "again with --copy-detector" in err
    detector = str(CHECKPOINTS / "digits-copydetect")
    assert _index(damaged, "--copy-detector", detector) == 0  # the same detector repairs it
    repaired = open_store(damaged)
    (fingerprint,) = repaired.embedding_fingerprints()
    verify_shards(repaired, fingerprint)
    bookkeeping = (".dit_prune_run", "config.resolved.json")
    assert {k: v for k, v in _tree(damaged).items() if k not in bookkeeping} == {
        k: v for k, v in _tree(store).items() if k not in bookkeeping}  # as first indexed


def test_index_without_the_detector_refuses_a_changed_embedding_shard(store, tmp_path, capsys):
    damaged = tmp_path / "st_changed"
    shutil.copytree(store, damaged)
    shard = sorted(damaged.glob("embeddings-*"))[1]
    data = bytearray(shard.read_bytes())
    data[-4:] = bytes(4)  # same size, another last value
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert _index(damaged) == 2
    assert "differs from the file that was indexed" in capsys.readouterr().err


def test_index_without_the_detector_keeps_intact_embeddings(store, tmp_path, capsys):
    again = tmp_path / "st"
    shutil.copytree(store, again)
    capsys.readouterr()
    assert _index(again) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(summary["embeddings"]) == 1
    assert (again / "manifest.json").read_bytes() == (store / "manifest.json").read_bytes()


# 5. prompts given to a class-conditional pipeline; what diffusers loads by itself


@pytest.mark.parametrize("conditions", [["a cat"], "a cat", [3, "a cat"]])
def test_prompts_to_a_class_conditional_pipeline_are_one_line(conditions):
    pipe = pixel_dit_pipeline(new_dit("tiny", 10, 8, 1), diffusers.DDIMScheduler())
    seeds = list(range(len(conditions))) if isinstance(conditions, list) else [0]
    with pytest.raises(DitPruneError, match="class-conditional: it takes class labels") as info:
        generate_decoded(pipe, conditions, seeds, steps=2)
    assert "\n" not in str(info.value) and "'a cat'" in str(info.value)
    with pytest.raises(DitPruneError, match="got torch.float32 values"):
        generate_decoded(pipe, [3.5], [0], steps=2)
    assert generate_decoded(pipe, [3.0, 7], [0, 1], steps=2).shape == (2, 1, 8, 8)


def test_diffusers_loads_a_saved_unpruned_pixel_pipeline_not_a_checkpoint(checkpoint, tmp_path):
    with pytest.raises(OSError, match="model_index.json"):  # what docs/pipelines.md now says
        diffusers.DiffusionPipeline.from_pretrained(str(checkpoint))
    saved = save_pipeline(load_pruned_pipeline(checkpoint), tmp_path / "p")
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(saved))
    assert type(pipe).__name__ == "DiTPipeline" and type(pipe.vae).__name__ == "IdentityVAE"


def test_a_refused_index_leaves_the_store_marker_as_it_was(store, tmp_path, capsys):
    damaged = tmp_path / "st_refused"
    shutil.copytree(store, damaged)
    for file in damaged.glob("embeddings-*"):
        file.unlink()
    marker = (damaged / ".dit_prune_run").read_bytes()
    assert _index(damaged) == 2  # refused: the listed embeddings are missing
    assert (damaged / ".dit_prune_run").read_bytes() == marker  # its file list still guards
    (damaged / "NOTES.txt").write_text("mine")
    capsys.readouterr()
    assert _index(damaged, "--overwrite") == 2  # so --overwrite still refuses the foreign file
    assert "NOTES.txt" in capsys.readouterr().err
    assert (damaged / "NOTES.txt").read_text() == "mine"
