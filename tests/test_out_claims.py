"""Who may replace what: `--overwrite` replaces only a marked output of the same subcommand
(never a shipped checkpoint, never files the tool did not write), and `run` / `index` that fail
before any work leave no --out behind (nothing blocks the corrected command).

Shipped checkpoints are only ever used here as copies in tmp_path (or as read-only inputs).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from dit_prune.cli import main
from dit_prune.commands.common import (
    MARKER_NAME,
    claim_out,
    foreign_entries,
    mark_finished,
    missing_root,
    output_entries,
    previous_command,
    undone_on_failure,
)
from dit_prune.errors import DitPruneError

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
RUN = ["--seeds", "0-9", "--steps", "2", "--device", "cpu", "--scorer-option", "batches=1"]


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under `root` (hidden ones too) -> its content hash."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            seen[str(Path(folder, name).relative_to(root))] = "dir"
        for name in files:
            path = Path(folder, name)
            seen[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# 1. --overwrite never replaces a shipped (unmarked) checkpoint


@pytest.mark.parametrize("name", ["digits-memorized", "digits-features"])
def test_train_overwrite_refuses_a_copy_of_a_shipped_checkpoint(name, tmp_path, monkeypatch,
                                                                capsys):
    source = CHECKPOINTS / name
    if not (source / "MODEL_CARD.md").is_file():
        pytest.skip(f"{source} is not shipped in this checkout")
    copy = tmp_path / "checkpoints" / name
    shutil.copytree(source, copy)
    (copy / "MODEL_CARD.md").write_text("# hand-written card\n\nkeep me\n")
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--out", str(copy), "--steps", "5", "--overwrite"]
    if name == "digits-features":
        argv = ["train", "--model", "features", "--out", str(copy), "--overwrite"]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert MARKER_NAME in line and str(copy) in line, line
    assert snapshot(tmp_path) == before  # every file byte-identical, nothing added beside it


def test_previous_command_reads_only_the_marker(tmp_path):
    folder = tmp_path / "ck"
    folder.mkdir()
    (folder / "dit_prune.json").write_text(json.dumps({"command": "dit-prune train --steps 5"}))
    (folder / "config.resolved.json").write_text(json.dumps({"command": "train"}))
    assert previous_command(folder) is None  # recorded commands are not markers
    (folder / MARKER_NAME).write_text(json.dumps({"command": "train"}))
    assert previous_command(folder) == "train"


def test_overwrite_refuses_files_added_to_a_finished_output(tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "dit_prune.json").write_text("{}")
    (out / "transformer").mkdir()
    mark_finished(out, "train")
    assert json.loads((out / MARKER_NAME).read_text())["files"] == ["dit_prune.json",
                                                                   "transformer"]
    assert claim_out(out, "train", {}, overwrite=True) == out.resolve()  # all its own files
    (out / "MODEL_CARD.md").write_text("written by a person\n")
    with pytest.raises(DitPruneError, match="MODEL_CARD.md, which `dit-prune train` did not "
                                            "write; --overwrite would delete it"):
        claim_out(out, "train", {}, overwrite=True)
    with pytest.raises(DitPruneError, match="was written by `dit-prune train`, not `dit-prune "
                                            "eval`"):
        claim_out(out, "eval", {}, overwrite=True)


@pytest.mark.filterwarnings("ignore")
def test_train_marks_its_output_and_may_replace_it_but_not_a_card_added_later(tmp_path,
                                                                              monkeypatch,
                                                                              capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "ck"
    argv = ["train", "--out", str(out), "--steps", "1", "--subset", "10", "--batch-size", "4",
            "--probe-every", "0", "--checkpoint-every", "0"]
    assert main(argv) == 0
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker["command"] == "train" and "dit_prune.json" in marker["files"]
    assert main(argv) == 2  # not empty, no --overwrite
    capsys.readouterr()
    assert main([*argv, "--overwrite"]) == 0  # its own output: replaced
    (out / "MODEL_CARD.md").write_text("a card written by hand\n")
    before = snapshot(out)
    capsys.readouterr()
    assert main([*argv, "--overwrite"]) == 2
    assert "MODEL_CARD.md" in one_error_line(capsys)
    assert snapshot(out) == before


def test_interrupted_train_names_the_state_it_keeps(tmp_path, monkeypatch, capsys):
    import dit_prune.commands.train as train_command

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_command, "train_dit", interrupted)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--out", "ck", "--steps", "1", "--subset", "10"]) == 130
    err = capsys.readouterr().err
    assert "no partial output" not in err
    assert "ck.train-state/" in err and "the same command resumes" in err, err
    assert not (tmp_path / "ck").exists()


# 2. run / index failing before any work leave no --out


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> Path:
    """A tiny untrained checkpoint recording 20 digits pool images as its training set."""
    import diffusers

    from dit_prune.checkpoint import save_checkpoint
    from dit_prune.data import balanced_subset, digits_split
    from dit_prune.models import new_dit

    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    indices = balanced_subset(digits_split().pool_labels, 20, seed=0).tolist()
    save_checkpoint(new_dit("tiny", 10, 8, 1).eval(),
                    diffusers.DDPMScheduler(num_train_timesteps=1000), root / "ck",
                    extra={"data": {"source": "digits", "pool_indices": indices}})
    return root / "ck"


def test_run_with_a_bad_features_network_leaves_no_out(ck, tmp_path, monkeypatch, capsys):
    features = CHECKPOINTS / "digits-copydetect"  # a copy detector, not a feature network
    if not features.is_dir():
        pytest.skip("no shipped digits-copydetect")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "x" / "r27"
    argv = ["run", str(ck), "--out", str(out), *RUN, "--features", str(features)]
    assert main(argv) == 2
    one_error_line(capsys)
    assert not (tmp_path / "x").exists()  # neither --out nor the parent it would have made


@pytest.mark.parametrize("before", ["missing", "empty"])
def test_run_failing_before_any_work_undoes_its_out(before, ck, tmp_path, monkeypatch, capsys):
    """A failure after --out is claimed but before any sample: the --out it created is removed
    (an empty one the user made is kept, empty), so the corrected command is not blocked."""
    import dit_prune.run.experiment as experiment

    def fails(cfg, inputs, progress=True):
        assert (Path(cfg.out) / MARKER_NAME).is_file()  # claimed by now
        raise DitPruneError("copy detector does not fit")

    monkeypatch.setattr(experiment, "run_experiment", fails)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "r"
    if before == "empty":
        out.mkdir(parents=True)
    assert main(["run", str(ck), "--out", str(out), *RUN]) == 2
    assert "copy detector does not fit" in one_error_line(capsys)
    if before == "missing":
        assert not (tmp_path / "runs").exists()
    else:
        assert out.is_dir() and not any(out.iterdir())
    # the corrected command (other options) is not refused for the leftovers of the first
    assert main(["run", str(ck), "--out", str(out), *RUN, "--seed", "1"]) == 2
    assert "holds a run with other options" not in capsys.readouterr().err


def test_interrupted_run_keeps_finished_work(ck, tmp_path, monkeypatch, capsys):
    import dit_prune.run.experiment as experiment

    def works_then_stops(cfg, inputs, progress=True):
        shard = Path(cfg.out) / "samples" / "before-000.safetensors"
        shard.parent.mkdir()
        shard.write_bytes(b"a finished shard")
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "run_experiment", works_then_stops)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r"
    assert main(["run", str(ck), "--out", str(out), *RUN]) == 130
    assert (out / "samples" / "before-000.safetensors").is_file()  # kept: the rerun resumes
    assert (out / MARKER_NAME).is_file() and (out / "config.resolved.json").is_file()


def _image_folder(root: Path, sizes_and_modes: list[tuple[int, str]]) -> Path:
    from PIL import Image

    root.mkdir(parents=True)
    for i, (size, mode) in enumerate(sizes_and_modes):
        Image.new(mode, (size, size), color=40 if mode == "L" else (40, 80, 120)).save(
            root / f"{i}.png")
    return root


def test_index_of_mixed_size_images_leaves_no_out(tmp_path, monkeypatch, capsys):
    images = _image_folder(tmp_path / "images", [(8, "L"), (8, "L"), (12, "L")])
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "x" / "s4"
    assert main(["index", "--images", str(images), "--out", str(out), "--no-progress"]) == 2
    assert "all images must share one size" in one_error_line(capsys)
    assert not (tmp_path / "x").exists()


def test_index_failing_at_its_first_shard_removes_the_out_it_created(tmp_path, monkeypatch,
                                                                     capsys):
    """Same size, another pixel mode: found while reading the shard, after --out was marked."""
    images = _image_folder(tmp_path / "images", [(8, "L"), (8, "RGB")])
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "s5"
    assert main(["index", "--images", str(images), "--out", str(out), "--no-progress"]) == 2
    assert "must share one size and mode" in one_error_line(capsys)
    assert not out.exists()
    (images / "1.png").unlink()  # the corrected folder indexes into the same --out
    assert main(["index", "--images", str(images), "--out", str(out), "--no-progress"]) == 0
    assert previous_command(out) == "index"


def test_undone_on_failure_keeps_what_existed(tmp_path):
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine\n")
    assert missing_root(kept) is None
    assert missing_root(tmp_path / "a" / "b" / "c") == (tmp_path / "a").resolve()
    with pytest.raises(DitPruneError), undone_on_failure(kept, None):
        (kept / MARKER_NAME).write_text("{}")
        raise DitPruneError("boom")
    assert (kept / "notes.txt").is_file()
    target = tmp_path / "a" / "b" / "c"
    created = missing_root(target)
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "other.txt").write_text("appeared meanwhile\n")
    with pytest.raises(DitPruneError), undone_on_failure(target.resolve(), created):
        target.mkdir()
        (target / MARKER_NAME).write_text("{}")
        raise DitPruneError("boom")
    assert not (tmp_path / "a" / "b").exists() and (tmp_path / "a" / "other.txt").is_file()


# 3. run / index markers list the files they wrote: --overwrite removes only those


def test_a_resumed_output_keeps_foreign_files_out_of_its_marker(tmp_path):
    """Files put beside a finished output are named foreign while a resumed command works and
    left out of its final list; --overwrite is refused meanwhile and afterwards."""
    from dit_prune.commands.common import foreign_entries, mark_started

    out = tmp_path / "store"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    assert foreign_entries(out) == ()  # no marker: nothing is known about the files
    mark_finished(out, "index")
    (out / "notes.txt").write_text("mine\n")
    foreign = foreign_entries(out)
    assert foreign == ("notes.txt",)
    mark_started(out, "index", foreign)  # resumed: the list is gone, the foreign name is kept
    assert "files" not in json.loads((out / MARKER_NAME).read_text())
    with pytest.raises(DitPruneError, match="holds notes.txt, which `dit-prune index` did not"):
        claim_out(out, "index", {}, overwrite=True)
    (out / "images-00000.safetensors").write_text("a shard")
    mark_finished(out, "index", foreign)
    assert json.loads((out / MARKER_NAME).read_text())["files"] == [
        "images-00000.safetensors", "manifest.json"]
    with pytest.raises(DitPruneError, match="holds notes.txt"):
        claim_out(out, "index", {}, overwrite=True)
    (out / "notes.txt").unlink()
    assert claim_out(out, "index", {}, overwrite=True) == out.resolve()


def test_index_marker_lists_its_files_and_overwrite_spares_others(tmp_path, monkeypatch,
                                                                  capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "store"
    argv = ["index", "--images", "digits-heldout", "--out", str(out), "--shard-size", "512",
            "--no-progress"]
    assert main(argv) == 0
    on_disk = sorted(output_entries(out))
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker["command"] == "index" and marker["files"] == on_disk
    assert {"manifest.json", "images-00000.safetensors", "config.resolved.json"} <= set(on_disk)
    capsys.readouterr()
    assert main([*argv, "--overwrite"]) == 0  # only its own files: replaced
    (out / "README.txt").write_text("what this store is, written by hand\n")
    before = snapshot(out)
    capsys.readouterr()
    assert main([*argv, "--overwrite"]) == 2
    line = one_error_line(capsys)
    assert "README.txt" in line and "did not write" in line, line
    assert snapshot(out) == before
    assert main(argv) == 0  # resuming keeps the hand-written file, and does not claim it
    assert (out / "README.txt").is_file()
    assert "README.txt" not in json.loads((out / MARKER_NAME).read_text())["files"]
    capsys.readouterr()
    assert main([*argv, "--overwrite"]) == 2
    assert "README.txt" in one_error_line(capsys)


@pytest.mark.filterwarnings("ignore")
def test_run_marker_lists_its_files_and_overwrite_spares_others(ck, tmp_path, monkeypatch,
                                                                capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r"
    argv = ["run", str(ck), "--out", str(out), *RUN, "--retrigger-targets", "0"]
    assert main(argv) == 0
    on_disk = sorted(output_entries(out))
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker["command"] == "run" and marker["files"] == on_disk
    assert {"report.json", "report.md", "pruned/plan.json", "config.resolved.json"} <= set(
        on_disk)
    assert any(name.startswith("samples/") for name in on_disk)  # every file, at any depth
    (out / "samples" / "precious.txt").write_text("kept beside the samples\n")
    before = snapshot(out)
    capsys.readouterr()
    assert main([*argv, "--seed", "1", "--overwrite"]) == 2
    line = one_error_line(capsys)
    assert "samples/precious.txt" in line and "did not write" in line, line
    assert snapshot(out) == before
    (out / "samples" / "precious.txt").unlink()
    (out / "notes.md").write_text("what I saw in this run\n")
    before = snapshot(out)
    capsys.readouterr()
    assert main([*argv, "--seed", "1", "--overwrite"]) == 2  # other options: would start over
    line = one_error_line(capsys)
    assert "notes.md" in line and "did not write" in line, line
    assert snapshot(out) == before


def test_overwrite_refuses_files_added_inside_an_outputs_folders(tmp_path):
    """The marker lists every file at any depth: a file put into one of the output's folders
    (or a folder added inside one) is foreign, named in the one-line refusal."""
    out = tmp_path / "ck"
    (out / "transformer").mkdir(parents=True)
    (out / "transformer" / "config.json").write_text("{}")
    (out / "dit_prune.json").write_text("{}")
    mark_finished(out, "train")
    assert json.loads((out / MARKER_NAME).read_text())["files"] == ["dit_prune.json",
                                                                   "transformer/config.json"]
    assert claim_out(out, "train", {}, overwrite=True) == out.resolve()
    (out / "transformer" / "notes.txt").write_text("mine\n")
    with pytest.raises(DitPruneError, match="holds transformer/notes.txt, which `dit-prune "
                                            "train` did not write"):
        claim_out(out, "train", {}, overwrite=True)
    (out / "transformer" / "notes.txt").unlink()
    (out / "transformer" / "mine").mkdir()
    (out / "transformer" / "mine" / "a.txt").write_text("mine\n")
    with pytest.raises(DitPruneError, match="holds transformer/mine/a.txt"):
        claim_out(out, "train", {}, overwrite=True)


def test_a_resumed_output_keeps_nested_foreign_files_out_of_its_marker(tmp_path):
    """A file put into a finished output's folder stays foreign through a resumed command
    (`mark_started`, then `mark_finished`), while the command's new files are listed."""
    from dit_prune.commands.common import mark_started

    out = tmp_path / "run"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "0.safetensors").write_text("a shard")
    mark_finished(out, "run")
    (out / "samples" / "precious.txt").write_text("mine\n")
    foreign = foreign_entries(out)
    assert foreign == ("samples/precious.txt",)
    mark_started(out, "run", foreign)
    with pytest.raises(DitPruneError, match="holds samples/precious.txt"):
        claim_out(out, "run", {}, overwrite=True)
    (out / "samples" / "1.safetensors").write_text("a new shard")  # the resumed run's work
    mark_finished(out, "run", foreign)
    assert json.loads((out / MARKER_NAME).read_text())["files"] == [
        "samples/0.safetensors", "samples/1.safetensors"]
    with pytest.raises(DitPruneError, match="holds samples/precious.txt"):
        claim_out(out, "run", {}, overwrite=True)
    (out / "samples" / "precious.txt").unlink()
    assert claim_out(out, "run", {}, overwrite=True) == out.resolve()


def test_an_older_marker_listing_top_level_names_still_covers_its_folders(tmp_path):
    out = tmp_path / "run"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "0.safetensors").write_text("a shard")
    (out / MARKER_NAME).write_text(json.dumps({"command": "run", "files": ["samples"]}))
    assert foreign_entries(out) == ()
    (out / "notes.txt").write_text("mine\n")
    assert foreign_entries(out) == ("notes.txt",)


@pytest.mark.filterwarnings("ignore")
def test_run_resumes_when_paths_are_spelled_differently(ck, tmp_path, monkeypatch, capsys):
    """Relative, './'-prefixed and absolute spellings of --out and of the checkpoint (and of
    every other path option) name the same run: it resumes instead of asking for
    --overwrite; a different checkpoint still does."""
    monkeypatch.chdir(ck.parent)
    out = tmp_path / "r"
    options = [*RUN, "--retrigger-targets", "0"]
    assert main(["run", str(ck), "--out", str(out), *options]) == 0
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    assert main(["run", f"./{os.path.relpath(ck, tmp_path)}", "--out", "./r", *options]) == 0
    assert "holds a run with other options" not in capsys.readouterr().err
    other = tmp_path / "ck2"
    shutil.copytree(ck, other)
    assert main(["run", str(other), "--out", "r", *options]) == 2
    assert "holds a run with other options" in one_error_line(capsys)


def test_resolved_paths_follow_existing_paths_and_keep_hub_ids(tmp_path, monkeypatch):
    from dit_prune.commands.run import resolved_paths
    from dit_prune.run.config import RunConfig

    (tmp_path / "ck").mkdir()
    (tmp_path / "train").mkdir()
    monkeypatch.chdir(tmp_path)
    one = resolved_paths(RunConfig(checkpoint="./ck", out="r", train="train",
                                   heldout="org/held-out"))
    two = resolved_paths(RunConfig(checkpoint=str(tmp_path / "ck"), out="/x/r",
                                   train=str(tmp_path / "train"), heldout="org/held-out"))
    assert one == two
    assert one["checkpoint"] == str((tmp_path / "ck").resolve()) and one["heldout"] == (
        "org/held-out") and one["recover_data"] == "train" and one["features"] is None
