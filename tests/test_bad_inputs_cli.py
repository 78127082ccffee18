"""Bad command lines, table-driven: each exits 2 with one stderr line naming the input, before
any long work, writes nothing to --out and leaves every input byte-identical.

The workspace (the current directory of every case) holds a tiny untrained checkpoint `ck`,
scores for it, an image folder `train`, a user's `thesis.txt` and a plain file `afile`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from dit_prune.cli import main

EVAL = ["--per-class", "1", "--steps", "1", "--device", "cpu", "--stats-cache", "none"]
RUN = ["--seeds", "0-9", "--steps", "2", "--device", "cpu", "--scorer-option", "batches=1"]
PRUNE = ["--scores", "scores", "--device", "cpu"]
SCORE = ["--scorer", "random", "--device", "cpu"]
MACROS = {"@RUN": RUN, "@EVAL": EVAL, "@EVAL2": EVAL[:-2], "@PRUNE": PRUNE, "@SCORE": SCORE}


def case(name: str, words: str, message: str, kind: str | None = None) -> tuple:
    """(id, argv, how --out is prepared, error text); '@RUN' etc. expand, '""' is ''."""
    argv: list[str] = []
    for word in words.split():
        argv += MACROS.get(word, ["" if word == '""' else word])
    return name, argv, kind, message


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")

# case(id, argv with OUT for --out, the text the error must hold, how --out is prepared)
CASES = [
    # data loss: --out is, contains or lies inside an input, or is not ours to replace
    case("run-out-is-ck", "run ck --out ck --overwrite @RUN", "overlaps the input checkpoint"),
    case("run-out-dot", "run ck --out . --overwrite @RUN", "current directory"),
    case("run-out-empty", "run ck --out \"\" --overwrite @RUN", "--out is empty"),
    case("run-out-inside-ck", "run ck --out ck/run --overwrite @RUN",
         "overlaps the input checkpoint"),
    case("run-out-symlink-to-ck", "run ck --out OUT --overwrite @RUN",
         "overlaps the input checkpoint", "symlink"),
    case("run-overwrite-foreign-dir", "run ck --out OUT --overwrite @RUN",
         "not a dit-prune output", "foreign"),
    case("run-out-is-train-folder", "run ck --out train --train train @RUN",
         "overlaps the input --train"),
    case("run-out-is-a-file", "run ck --out afile @RUN", "is an existing file"),
    case("run-in-use", "run ck --out OUT --overwrite @RUN",
         "in use by another dit-prune run", "locked_run"),
    case("eval-out-is-ck", "eval ck --out ck --overwrite @EVAL", "overlaps the input checkpoint"),
    case("eval-out-dot", "eval ck --out . --overwrite @EVAL", "current directory"),
    case("eval-out-empty", "eval ck --out \"\" @EVAL", "--out is empty"),
    case("eval-out-inside-ck", "eval ck --out ck/transformer/x @EVAL",
         "overlaps the input checkpoint"),
    case("eval-out-symlink-to-ck", "eval ck --out OUT --overwrite @EVAL",
         "overlaps the input checkpoint", "symlink"),
    case("eval-overwrite-foreign-dir", "eval ck --out OUT --overwrite @EVAL",
         "not a dit-prune output", "foreign"),
    case("eval-out-is-heldout", "eval ck --out train --heldout train @EVAL",
         "overlaps the input --heldout"),
    case("eval-out-contains-stats-cache", "eval ck --out OUT @EVAL2 --stats-cache OUT/cache",
         "overlaps the input --stats-cache"),
    case("eval-not-empty", "eval ck --out OUT @EVAL", "not empty", "eval_run"),
    case("eval-read-only-out", "eval ck --out OUT @EVAL", "Permission denied", "read_only"),
    case("score-out-is-ck", "score ck --out ck --overwrite @SCORE",
         "overlaps the input checkpoint"),
    case("score-out-symlink-to-ck", "score ck --out OUT --overwrite @SCORE",
         "overlaps the input checkpoint", "symlink"),
    case("score-overwrite-eval-run", "score ck --out OUT --overwrite @SCORE",
         "written by `dit-prune eval`", "eval_run"),
    case("score-out-dot", "score ck --out . --overwrite @SCORE", "current directory"),
    case("prune-out-is-ck", "prune ck --budget 0.25 --out ck --overwrite @PRUNE",
         "overlaps the input checkpoint"),
    case("prune-out-inside-scores", "prune ck --budget 0.25 --out scores/p @PRUNE",
         "overlaps the input --scores"),
    case("prune-out-empty", "prune ck --budget 0.25 --out \"\" @PRUNE", "--out is empty"),
    case("prune-overwrite-foreign-dir", "prune ck --budget 0.25 --out OUT --overwrite @PRUNE",
         "not a dit-prune output", "foreign"),
    case("train-overwrite-a-checkpoint-it-did-not-write", "train --steps 1 --out ck --overwrite",
         "not a dit-prune output"),
    case("train-out-dot", "train --steps 1 --out . --overwrite", "current directory"),
    # a finished output holding a file someone put inside one of its folders
    *[case(f"{command}-overwrite-file-added-in-a-subfolder", f"{words} --overwrite",
           f"holds samples/mine.txt, which `dit-prune {command}` did not write",
           f"nested_{command}")
      for command, words in (("run", "run ck --out OUT @RUN"), ("eval", "eval ck --out OUT @EVAL"),
                             ("score", "score ck --out OUT @SCORE"),
                             ("prune", "prune ck --budget 0.25 --out OUT @PRUNE"),
                             ("train", "train --steps 1 --out OUT"))],
    # --train-store naming a file
    case("run-train-store-is-a-file", "run ck --out OUT @RUN --train-store afile",
         "afile is a file, not a reference store directory"),
    case("eval-train-store-is-a-file", "eval ck --out OUT @EVAL --train-store afile",
         "afile is a file, not a reference store directory"),
    # options validated before any work
    case("run-scorer-option-typo", "run ck --out OUT @RUN --scorer-option batchs=8",
         "unknown option(s) ['batchs']"),
    case("run-scorer-timesteps-out-of-range",
         "run ck --out OUT @RUN --scorer-option timesteps=5000",
         "timestep 5000 is outside [0, 1000)"),
    case("run-scorer-timesteps-garbage",
         "run ck --out OUT @RUN --scorer-option timesteps=sometimes",
         "cannot parse timesteps"),
    case("run-scorer-option-seed", "run ck --out OUT @RUN --scorer-option seed=3", "use --seed"),
    case("run-scorer-option-no-equals", "run ck --out OUT @RUN --scorer-option batches",
         "--scorer-option takes KEY=VALUE"),
    case("run-steps-0", "run ck --out OUT @RUN --steps 0", "steps must be a positive integer"),
    case("run-steps-negative", "run ck --out OUT @RUN --steps -3",
         "steps must be a positive integer"),
    case("run-steps-above-schedule", "run ck --out OUT @RUN --steps 5000",
         "--steps must be an integer in [1, 1000]"),
    case("run-budget-rounds-to-zero", "run ck --out OUT @RUN --budget 0.001",
         "smallest fraction that removes one is 0.032"),
    case("run-budget-count-too-large", "run ck --out OUT @RUN --budget 17",
         "exceeds the 16 head units"),
    case("run-budget-one-point-five", "run ck --out OUT @RUN --budget 1.5",
         "strictly between 0 and 1"),
    case("run-shard-size-0", "run ck --out OUT @RUN --shard-size 0",
         "shard size must be a positive integer"),
    case("run-recover-steps-0", "run ck --out OUT @RUN --recover distill --recover-steps 0",
         "recover steps must be a positive integer"),
    case("run-guidance-nan", "run ck --out OUT @RUN --guidance-scale nan",
         "guidance scale must be a finite number"),
    case("eval-steps-0", "eval ck --out OUT @EVAL --steps 0", "--steps must be a positive integer"),
    case("eval-steps-negative", "eval ck --out OUT @EVAL --steps -3",
         "--steps must be a positive integer"),
    case("eval-steps-above-schedule", "eval ck --out OUT @EVAL --steps 5000",
         "--steps must be an integer in [1, 1000]"),
    case("eval-batch-size-0", "eval ck --out OUT @EVAL --batch-size 0",
         "--batch-size must be a positive integer"),
    case("eval-batch-size-negative", "eval ck --out OUT @EVAL --batch-size -1",
         "--batch-size must be a positive integer"),
    case("eval-guidance-inf", "eval ck --out OUT @EVAL --guidance-scale inf",
         "--guidance-scale must be a finite number"),
    case("eval-stats-cache-is-a-file", "eval ck --out OUT @EVAL2 --stats-cache afile",
         "--stats-cache afile is an existing file"),
    case("eval-out-is-a-file", "eval ck --out thesis.txt @EVAL", "is an existing file"),
    case("score-option-seed-collides", "score ck --out OUT @SCORE --option seed=3",
         "use --seed instead"),
    case("score-option-typo", "score ck --out OUT @SCORE --option batchs=3",
         "unknown option(s) ['batchs']"),
    case("score-batch-size-0", "score ck --out OUT @SCORE --batch-size 0",
         "batch_size must be a positive integer"),
    case("score-timesteps-above-schedule", "score ck --out OUT @SCORE --timesteps 10,2000",
         "timestep 2000 is outside [0, 1000)"),
    case("prune-budget-rounds-to-zero", "prune ck --budget 0.001 --out OUT @PRUNE",
         "smallest fraction that removes one is 0.032"),
    case("prune-budget-zero", "prune ck --budget 0 --out OUT @PRUNE", "strictly between 0 and 1"),
    case("prune-budget-count-too-large", "prune ck --budget 40 --out OUT @PRUNE",
         "exceeds the 16 head units"),
    case("prune-recover-lr-nan",
         "prune ck --budget 2 --out OUT @PRUNE --recover distill --recover-lr nan",
         "learning rate must be a positive finite number"),
    case("prune-recover-lr-inf",
         "prune ck --budget 2 --out OUT @PRUNE --recover distill --recover-lr inf",
         "learning rate must be a positive finite number"),
    case("prune-recover-lr-zero",
         "prune ck --budget 2 --out OUT @PRUNE --recover distill --recover-lr 0",
         "learning rate must be a positive finite number"),
    case("prune-recover-t-max-5000",
         "prune ck --budget 2 --out OUT @PRUNE --recover distill --recover-t-max 5000",
         "must lie in [0, 999]"),
    case("prune-recover-batch-size-0",
         "prune ck --budget 2 --out OUT @PRUNE --recover finetune --recover-batch-size 0",
         "batch size must be positive"),
    case("train-patch-size-0", "train --steps 1 --patch-size 0 --out OUT",
         "--patch-size must be a positive integer"),
    case("train-lr-nan", "train --steps 1 --lr nan --out OUT", "--lr must be a finite number"),
    case("train-lr-inf", "train --steps 1 --lr inf --out OUT", "--lr must be a finite number"),
    case("train-lr-negative", "train --steps 1 --lr -1 --out OUT",
         "--lr must be a finite number greater than 0"),
    case("train-steps-0", "train --steps 0 --out OUT", "--steps must be a positive integer"),
    case("train-batch-size-0", "train --steps 1 --batch-size 0 --out OUT",
         "--batch-size must be a positive integer"),
    case("train-out-is-a-file", "train --steps 1 --out afile", "is an existing file"),
]
CUDA_CASES = [
    (f"{command}-device-cuda", [command, "ck", "--out", "OUT", *extra, "--device", "cuda"], None,
     "CUDA is not available")
    for command, extra in (("eval", EVAL), ("score", SCORE), ("run", RUN),
                           ("prune", ["--budget", "2", *PRUNE]))
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """The inputs: tiny checkpoint `ck`, its scores, an image folder and two user files."""
    import diffusers
    from PIL import Image

    from dit_prune.checkpoint import save_checkpoint
    from dit_prune.data import balanced_subset, digits_split
    from dit_prune.models import new_dit
    from dit_prune.scorers import save_scores
    from dit_prune.units import enumerate_units

    root = tmp_path_factory.mktemp("workspace")
    torch.manual_seed(0)
    model = new_dit("tiny", 10, 8, 1).eval()
    indices = balanced_subset(digits_split().pool_labels, 20, seed=0).tolist()
    save_checkpoint(model, diffusers.DDPMScheduler(num_train_timesteps=1000), root / "ck",
                    extra={"data": {"source": "digits", "pool_indices": indices}})
    units = enumerate_units(model, ["head"])
    from dit_prune.checkpoint import load_dit

    save_scores(root / "scores", units, torch.linspace(0, 1, len(units)),
                {"scorer": "random", "options": {}},
                model={"weights_sha256": load_dit(root / "ck").meta.weights_sha256})
    for cls in range(2):
        (root / "train" / str(cls)).mkdir(parents=True)
        Image.new("L", (8, 8), color=40 * cls).save(root / "train" / str(cls) / "a.png")
    (root / "thesis.txt").write_text("four years of work\n")
    (root / "afile").write_text("not a directory\n")
    return root


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file, directory and link under `roots` (hidden ones too) -> its content hash."""
    seen: dict[str, str] = {}
    for root in roots:
        if not os.path.lexists(root):
            continue
        seen[str(root)] = "dir" if root.is_dir() and not root.is_symlink() else _digest(root)
        if root.is_symlink() or not root.is_dir():
            continue
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = Path(folder) / name
                seen[str(path)] = ("link:" + os.readlink(path) if path.is_symlink()
                                   else "dir" if path.is_dir() else _digest(path))
    return seen


def _digest(path: Path) -> str:
    if path.is_symlink():
        return "link:" + os.readlink(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare_out(kind: str | None, out: Path, workspace: Path, monkeypatch) -> object:
    """Set up --out as the case needs; returns what must stay alive during the call."""
    if kind == "symlink":
        out.symlink_to(workspace / "ck", target_is_directory=True)
    elif kind == "foreign":
        out.mkdir()
        (out / "notes.txt").write_text("keep me\n")
    elif kind == "eval_run":
        out.mkdir()
        (out / ".dit_prune_run").write_text(json.dumps({"command": "eval"}))
        (out / "metrics.json").write_text("{}")
    elif kind is not None and kind.startswith("nested_"):  # a finished output, then a user file
        out.mkdir()
        (out / "samples").mkdir()
        (out / "samples" / "0.png").write_bytes(b"a sample")
        (out / "metrics.json").write_text("{}")
        from dit_prune.commands.common import mark_finished

        mark_finished(out, kind.removeprefix("nested_"))
        (out / "samples" / "mine.txt").write_text("a note kept beside the samples\n")
    elif kind == "locked_run":
        import fcntl

        out.mkdir()
        (out / ".dit_prune_run").write_text(json.dumps({"command": "run", "run_id": "other"}))
        (out / "config.resolved.json").write_text(json.dumps({"command": "run",
                                                              "resolved": {"seeds": "0-1"}}))
        handle = open(out / ".dit_prune_run")  # noqa: SIM115 - held (locked) during the call
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return handle
    elif kind == "read_only":
        import dit_prune.commands.common as common

        def refuse(*args, dir=None, **kwargs):  # noqa: A002 - mkdtemp's own keyword
            raise PermissionError(13, "Permission denied", str(dir))

        monkeypatch.setattr(common.tempfile, "mkdtemp", refuse)
    return None


def check_case(argv, kind, message, workspace, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(workspace)
    out = tmp_path / "out"
    keep = prepare_out(kind, out, workspace, monkeypatch)
    argv = [str(out) if a == "OUT" else a.replace("OUT/", f"{out}/") for a in argv]
    before = snapshot(workspace, out)
    try:
        code = main(argv)
    finally:
        if keep is not None:
            keep.close()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]  # no bars
    assert code == 2, err
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert snapshot(workspace, out) == before  # inputs byte-identical, nothing written to --out
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers  # no staging directory left behind


@pytest.mark.parametrize(("argv", "kind", "message"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(argv, kind, message, workspace, tmp_path,
                                                   monkeypatch, capsys) -> None:
    check_case(argv, kind, message, workspace, tmp_path, monkeypatch, capsys)


@NO_CUDA
@pytest.mark.parametrize(("argv", "kind", "message"), [c[1:] for c in CUDA_CASES],
                         ids=[c[0] for c in CUDA_CASES])
def test_cuda_on_a_machine_without_it(argv, kind, message, workspace, tmp_path, monkeypatch,
                                      capsys) -> None:
    check_case(argv, kind, message, workspace, tmp_path, monkeypatch, capsys)


@pytest.mark.filterwarnings("ignore:10 generated samples")
def test_a_full_disk_while_writing_leaves_no_partial_output(workspace, tmp_path, monkeypatch,
                                                            capsys) -> None:
    """eval fails while writing its files (ENOSPC): one line, no --out, no staging folder; the
    same command then succeeds."""
    import dit_prune.commands.eval as eval_command

    real = eval_command.write_outputs

    def full_disk(run_dir, *args, **kwargs):
        (run_dir / "nearest.png").write_bytes(b"half")
        raise OSError(28, "No space left on device", str(run_dir / "per_sample.npz"))

    monkeypatch.setattr(eval_command, "write_outputs", full_disk)
    argv = ["eval", "ck", "--out", "OUT", *EVAL]
    check_case(argv, None, "No space left on device", workspace, tmp_path, monkeypatch, capsys)
    monkeypatch.setattr(eval_command, "write_outputs", real)
    out = tmp_path / "out"
    assert main(["eval", "ck", "--out", str(out), *EVAL]) == 0
    assert (out / "metrics.json").is_file() and (out / ".dit_prune_run").is_file()
    # a second eval may replace the first (a marked eval output), and nothing else
    assert main(["eval", "ck", "--out", str(out), *EVAL, "--overwrite"]) == 0
    assert main(["score", "ck", "--out", str(out), *SCORE, "--overwrite"]) == 2
