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
from typing import NoReturn

from dit_prune.commands import COMMANDS
from dit_prune.errors import DitPruneError


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors (an invalid choice, an unknown flag, a missing
    argument) print one line naming the problem and `--help`, not the whole usage block, and
    exit with status 2; subcommand parsers inherit it (`add_subparsers` uses the parent's
    class)."""

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
