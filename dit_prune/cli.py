"""The `dit-prune` command line: subcommands train, eval, score, prune, run.

User errors (DitPruneError) print one line and exit with status 2, with no traceback; so do
file-system errors (a read-only or full disk: OSError), naming the path, and usage errors (an
invalid choice, an unknown flag: `OneLineParser`).

Example:
    $ dit-prune train --subset 64 --steps 12000 --out checkpoints/digits-memorized
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from dit_prune.commands import COMMANDS
from dit_prune.errors import DitPruneError


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends '(default: X)' to an option's help when it has a default worth showing (not
    None, False, empty) and its help does not state one already.

    Example:
        >>> p = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter)
        >>> _ = p.add_argument("--steps", type=int, default=50, help="sampling steps")
        >>> "sampling steps (default: 50)" in p.format_help()
        True
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not text or text == argparse.SUPPRESS or not action.option_strings
                or "(default" in text or "default:" in text or default is None
                or default is False or default in ("", argparse.SUPPRESS) or default == []):
            return text
        return f"{text} (default: %(default)s)"


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors (an invalid choice, an unknown flag, a missing
    argument) print one line naming the problem and `--help`, not the whole usage block, and
    exit with status 2; its help shows each option's default (`DefaultsHelpFormatter`).
    Subcommand parsers inherit both (`add_subparsers` uses the parent's class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Print `PROG: error: MESSAGE (see PROG --help)` on stderr and exit 2."""
        detail = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {detail} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="dit-prune",
        description="Find and structurally prune the DiT units that reproduce training images.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"dit_prune.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"dit_prune.commands.{name}":
                raise
            continue
        module.add_parser(subparsers)
    return parser


def _say(line: str) -> None:
    """Write one line to stderr in a single write, flushed: processes launched together (torchrun)
    that fail together print whole lines, not interleaved pieces."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """The `dit-prune` console script: parse, run the subcommand, return the exit status.

    This module imports nothing heavy; the subcommands (torch, diffusers) are imported inside
    this call, so Ctrl-C while they load (the first seconds) is one line and status 130 too.

    Example (Ctrl-C at once):
        $ dit-prune eval checkpoints/digits-memorized --out runs/eval
        ^Cdit-prune: interrupted while starting; nothing was written
    """
    try:
        return _main(argv)
    except KeyboardInterrupt:
        _say("dit-prune: interrupted while starting; nothing was written")
        return 130


def _main(argv: Sequence[str] | None) -> int:
    """Build the parser (importing every subcommand), parse `argv` and run the subcommand."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named with the subcommand whose flags they are not
        parser.prog = f"dit-prune {args.command}"
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.func(args) or 0)
    except DitPruneError as exc:
        _say(f"dit-prune {args.command}: error: {exc}")
        return 2
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        detail = exc.strerror or " ".join(str(exc).split())
        _say(f"dit-prune {args.command}: error: {where}{detail}")
        return 2
    except KeyboardInterrupt:
        kept = ("finished sample shards are kept: the same command resumes"
                if args.command == "run" else
                "finished store shards are kept: the same command resumes"
                if args.command == "index" else
                f"--out was not written; the training state saved so far (every "
                f"--checkpoint-every steps) is kept in {_state_dir(args.out)}: the same command "
                "resumes from it" if args.command == "train" and
                getattr(args, "model", "dit") in ("dit", "text") else
                "no partial output was kept")
        _say(f"dit-prune {args.command}: interrupted; {kept}")
        return 130


def _state_dir(out: str) -> str:
    """Where `dit-prune train --out OUT` keeps its resumable state: OUT.train-state/."""
    path = Path(out)
    return f"{path.with_name(path.name + '.train-state')}/"


if __name__ == "__main__":
    sys.exit(main())
