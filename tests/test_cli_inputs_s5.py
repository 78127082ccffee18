"""A new user's bad inputs, each one line and exit 2 before any work: seeds (too large,
repeated, negative) everywhere seeds are parsed, Ctrl-C while the CLI starts, accurate and
complete --help, errors that name the real problem, and the scripts' option handling.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_cli_inputs_s5.py -q
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import dit_prune.cli as cli
from dit_prune.errors import DitPruneError
from dit_prune.sampling import MAX_SEED, parse_seeds

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "checkpoints" / "digits-memorized"
SCRIPTS = REPO / "scripts"


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The single non-empty stderr line (asserting there is exactly one)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def load_script(name: str) -> ModuleType:
    """Import scripts/<name>.py as a module (scripts/ is not a package)."""
    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(f"_s5_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def script_usage_error(name: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Parse `argv` with scripts/<name>.py; assert a one-line usage error, exit 2."""
    with pytest.raises(SystemExit) as stop:
        load_script(name).parse_args(argv)
    assert stop.value.code == 2
    return one_line_error(capsys)


# A. seeds ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "message"), [
    ("99999999999999999999,1", "seed 99999999999999999999 of '99999999999999999999,1' is too "
                               "large; seeds are integers in [0, 2**63 - 1"),
    ("99999999999999999990-99999999999999999999", "too large"),
    (str(2**63), "too large"),
    ("0-9,0-9", "repeat seed 0"),
    ("0-3,2", "repeat seed 2"),
    ("-5", "negative"),
    ("-10--1", "negative"),
    ("3--1", "negative"),
    ("9-0", "is empty"),
    (f"0-{2**63 - 1}", "name more than 10,000,000 images"),  # refused before building it
])
def test_bad_seeds_are_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(DitPruneError, match="^--seeds: ") as error:
        parse_seeds(text, "--seeds")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_largest_seed_is_accepted_and_seeds_a_generator() -> None:
    from dit_prune.sampling import seed_generators

    assert parse_seeds(f"{MAX_SEED - 1}-{MAX_SEED}") == [MAX_SEED - 1, MAX_SEED]
    assert MAX_SEED == 2**63 - 1
    seed_generators([MAX_SEED + 1_000_003])  # the DDPM noise offset still fits a generator


@pytest.mark.parametrize("command", ["run", "eval"])
@pytest.mark.parametrize("seeds", ["--seeds=99999999999999999999,1", "--seeds=0-9,0-9",
                                   "--seeds=-5", "--seeds=-10--1"])
def test_cli_refuses_bad_seeds_before_work(command: str, seeds: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    status = cli.main([command, str(CHECKPOINT), "--out", str(out), seeds, "--steps", "5",
                       "--device", "cpu"])
    assert status == 2
    line = one_line_error(capsys)
    assert line.startswith(f"dit-prune {command}: error: --seeds: ")
    assert not out.exists()


def test_scripts_parse_seeds_the_same_way(capsys: pytest.CaptureFixture[str]) -> None:
    line = script_usage_error("regimes", ["--smoke", "--seeds", "0-3,2"], capsys)
    assert "--seeds: seeds '0-3,2' repeat seed 2" in line
    line = script_usage_error("head_effects", ["--select-seeds", "-5"], capsys)
    assert "--select-seeds: seed '-5'" in line
    line = script_usage_error("transition", ["--seeds", str(2**64)], capsys)
    assert "too large" in line


# B. Ctrl-C while the CLI starts ------------------------------------------------------------


def test_ctrl_c_while_importing_the_subcommands_is_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(name: str) -> ModuleType:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.importlib, "import_module", interrupted)
    assert cli.main(["eval", str(CHECKPOINT), "--out", "/tmp/unused", "--seeds", "0-9"]) == 130
    assert "interrupted" in one_line_error(capsys)


def test_the_cli_module_imports_no_subcommand() -> None:
    """The heavy imports (torch) happen inside main, under its Ctrl-C handler."""
    code = ("import sys, dit_prune.cli; "
            "print(any(m.startswith('dit_prune.commands.') for m in sys.modules), "
            "'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout.split()
    assert out == ["False", "False"]


# C. --help ---------------------------------------------------------------------------------


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_option_of_every_subcommand_has_help() -> None:
    missing = [f"{name} {'/'.join(action.option_strings) or action.dest}"
               for name, parser in subcommand_parsers().items() for action in parser._actions
               if not (action.help or "").strip()]
    assert missing == []


def test_help_states_overwrite_scorers_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    from dit_prune.scorers import SCORERS

    monkeypatch.setenv("COLUMNS", "10000")  # no wrapping (it splits names at hyphens)
    helps = {name: " ".join(parser.format_help().split())
             for name, parser in subcommand_parsers().items()}
    for name in ("eval", "score"):
        assert "reuse" not in helps[name] and f"earlier `dit-prune {name}` output" in helps[name]
    run = helps["run"]
    start = run.index("--scorer SCORER how")
    scorer_help = run[start:run.index("--budget BUDGET", start)]
    assert all(name in scorer_help for name in SCORERS)
    for default in ("units such as 3 (default: 0.2)", "e.g. 0-999 (default: 0-999)",
                    "sampling steps (default: 50)", "multi-process work) (default: 250)"):
        assert default in run, default
    assert "(default: None)" not in run and "(default: False)" not in run


def test_train_size_lists_its_choices() -> None:
    from dit_prune.models import DIT_SIZES

    size = next(a for a in subcommand_parsers()["train"]._actions if "--size" in a.option_strings)
    assert sorted(size.choices) == sorted(DIT_SIZES)


# D. errors that name the real problem ------------------------------------------------------


def test_a_directory_that_is_no_store_is_not_called_unfinished(tmp_path: Path) -> None:
    from dit_prune.store.format import open_store

    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text("{}")
    with pytest.raises(DitPruneError, match="is not a reference store"):
        open_store(tmp_path / "ck")
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "images-00000.safetensors").write_bytes(b"")
    with pytest.raises(DitPruneError, match="unfinished reference store"):
        open_store(tmp_path / "part")


def test_prune_scores_must_be_a_scores_directory(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    card = tmp_path / "MODEL_CARD.md"
    card.write_text("# card\n")
    assert cli.main(["prune", str(CHECKPOINT), "--scores", str(card), "--budget", "0.1",
                     "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    line = one_line_error(capsys)
    assert "is a file, not scores: it must be the directory `dit-prune score` wrote" in line
    assert "scores file missing" not in line
    (tmp_path / "empty").mkdir()
    assert cli.main(["prune", str(CHECKPOINT), "--scores", str(tmp_path / "empty"), "--budget",
                     "0.1",
                     "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert "holds no scores.safetensors" in one_line_error(capsys)


@pytest.mark.parametrize(("duplicate", "message"), [
    ("100x2", "--duplicate 100x2 asks for 100 images to duplicate, but the training set "
              "(--subset) holds 64"),
    ("3,70x2", "--duplicate 3,70x2: index 70 lies outside the 64 training images"),
    ("3,3x5", "--duplicate 3,3x5 repeats the index 3"),
])
def test_train_duplicate_errors_name_the_duplicate(duplicate: str, message: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert cli.main(["train", "--subset", "64", "--duplicate", duplicate, "--steps", "1",
                     "--out", str(out)]) == 2
    assert message in one_line_error(capsys)
    assert not out.exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_out_that_cannot_be_created_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["eval", str(CHECKPOINT), "--out", "/proc/x"]) == 2
    line = one_line_error(capsys)
    assert "cannot create --out /proc/x: /proc does not accept new folders" in line


# E. scripts --------------------------------------------------------------------------------


def test_regimes_measures_the_checkpoint_named(capsys: pytest.CaptureFixture[str]) -> None:
    line = script_usage_error("regimes", ["--checkpoint", "/nonexistent", "--smoke"], capsys)
    assert "/nonexistent: no such checkpoint directory" in line
    args = load_script("regimes").parse_args(["--checkpoint", str(CHECKPOINT), "--smoke"])
    assert args.checkpoints == str(CHECKPOINT)
    line = script_usage_error("regimes", ["--checkpoi", str(CHECKPOINT)], capsys)
    assert "unrecognized arguments: --checkpoi" in line  # no abbreviations


def test_smoke_keeps_and_validates_explicit_options(capsys: pytest.CaptureFixture[str]) -> None:
    regimes = load_script("regimes")
    args = regimes.parse_args(["--smoke", "--seeds", "0-9", "--budgets", "3",
                               "--checkpoints", str(CHECKPOINT)])
    assert (args.seeds, args.budgets, args.steps) == ("0-9", "3", 5)  # steps from --smoke
    assert "cannot parse seeds 'abc'" in script_usage_error(
        "regimes", ["--smoke", "--seeds", "abc"], capsys)
    assert "--budgets: budget must lie strictly between 0 and 1" in script_usage_error(
        "regimes", ["--smoke", "--budgets", "0"], capsys)
    assert "--max-size must be at least 1, got 0" in script_usage_error(
        "head_subsets", ["--max-size", "0", "--smoke"], capsys)


def test_script_option_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--scorers: unknown scorer 'nope'; choose from" in script_usage_error(
        "regimes", ["--scorers", "nope", "--smoke"], capsys)
    assert "--fd-limits takes a comma list of numbers" in script_usage_error(
        "head_subsets", ["--fd-limits", "abc", "--smoke"], capsys)
    assert "--pruning-seeds takes a comma list of integers" in script_usage_error(
        "ablate_budget", ["--pruning-seeds", "a"], capsys)


def test_run_script_turns_errors_into_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    common = load_script("ablation_common")

    def fails() -> None:
        raise DitPruneError("checkpoint not found: /x")

    with pytest.raises(SystemExit) as stop:
        common.run_script(fails, "demo")
    assert stop.value.code == 2
    assert one_line_error(capsys) == "demo: error: checkpoint not found: /x"
    with pytest.raises(SystemExit) as stop:
        common.run_script(lambda: (_ for _ in ()).throw(SystemExit("demo: bad\nthing")), "demo")
    assert stop.value.code == 2 and one_line_error(capsys) == "demo: bad thing"


def test_a_script_run_from_the_shell_exits_2_in_one_line() -> None:
    done = subprocess.run([sys.executable, str(SCRIPTS / "regimes.py"), "--scorers", "nope",
                           "--smoke"], capture_output=True, text=True, cwd=REPO)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "unknown scorer 'nope'" in lines[0]
