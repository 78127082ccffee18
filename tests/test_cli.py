"""The CLI turns user errors into one line on stderr and exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dit_prune.cli import main


def test_missing_checkpoint_exits_2_with_one_line(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "missing")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "not found" in err
    assert not (tmp_path / "o").exists()


def test_bad_subset_exits_2(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "o"), "--subset", "lots"]) == 2
    assert "--subset" in capsys.readouterr().err


def test_console_script_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dit_prune.cli", "train", "--out", str(tmp_path / "o"),
         "--data", str(tmp_path / "missing")],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["train"])
def test_help_lists_subcommand(command, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert command in capsys.readouterr().out
