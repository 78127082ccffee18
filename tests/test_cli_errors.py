"""Usage errors from the parser (an invalid choice, an unknown flag, a bad number) print one
line on stderr naming the option (and, for a choice, the valid ones) and exit with status 2,
for every subcommand: never the whole usage block."""

from __future__ import annotations

import pytest

from dit_prune.cli import main

CASES = [
    # (argv, text the one line must hold)
    (["run", "ck", "--budget-mode", "bogus"],
     ["argument --budget-mode: invalid choice: 'bogus'", "'heads'", "'neurons'"]),
    (["run", "ck", "--recover", "generated-novel"],
     ["argument --recover: invalid choice: 'generated-novel'", "'distill'"]),
    (["run", "ck", "--sampler", "euler"], ["argument --sampler: invalid choice", "'ddim'"]),
    (["run", "ck", "--steps", "x"], ["argument --steps: invalid int value: 'x'"]),
    (["run", "ck", "--bogus", "3"], ["dit-prune run: error: unrecognized arguments: --bogus 3"]),
    (["eval", "ck", "--out", "o", "--bogus"], ["dit-prune eval:", "unrecognized arguments"]),
    (["score", "ck", "--out", "o", "--scorer", "random", "--bogus"],
     ["dit-prune score:", "unrecognized arguments: --bogus"]),
    (["prune", "ck"], ["dit-prune prune: error: the following arguments are required"]),
    (["train", "--model", "bogus"], ["argument --model: invalid choice: 'bogus'"]),
    (["index", "--bogus"], ["dit-prune index:"]),
    (["bogus"], ["argument COMMAND: invalid choice: 'bogus'", "'run'"]),
    ([], ["the following arguments are required: COMMAND"]),
]


@pytest.mark.parametrize(("argv", "texts"), CASES, ids=[" ".join(c[0]) or "none" for c in CASES])
def test_a_usage_error_is_one_line(argv, texts, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "usage:" not in captured.err, captured.err
    assert all(text in lines[0] for text in texts), lines[0]
    assert "--help" in lines[0] and captured.out == ""
    assert not any(tmp_path.iterdir())  # nothing written
