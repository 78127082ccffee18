"""Shared pieces of the ablation scripts: arguments, running cached experiments, aggregation
(mean ± std over pruning/scoring seeds), markdown tables and Agg plots.

Every script parses and validates its options at once (`parse_script_args`): a bad option is
one line and exit status 2, as are the errors its run raises (`run_script`). `--smoke` fills in
tiny settings only for the options the command line does not give: explicit options win, and
are validated all the same.

Usage (from another script in scripts/):
    from ablation_common import base_parser, parse_script_args, run_cached, run_script
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

METRICS = ("memorization_rate", "copy_rate", "fd", "precision", "recall", "class_agreement")
RATE_METRICS = ("memorization_rate", "copy_rate", "class_agreement")


def parse_list(text: str, kind: Callable[[str], Any] = str) -> list[Any]:
    """'a,b,c' -> [kind(a), kind(b), kind(c)] (empty items dropped)."""
    return [kind(item.strip()) for item in text.split(",") if item.strip()]


def parse_scorer_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'taylor-gap+quality_weight=0.5' -> ('taylor-gap', {'quality_weight': 0.5}).

    The whole spec is the arm's label in tables; values are read by the CLI's KEY=VALUE parser.
    """
    from dit_prune.errors import DitPruneError
    from dit_prune.keyvalue import parse_key_values

    name, *items = spec.split("+")
    try:
        return name, parse_key_values(items, f"scorer spec {spec!r}")
    except DitPruneError as exc:
        raise SystemExit(str(exc)) from None


class ScriptParser(argparse.ArgumentParser):
    """An ArgumentParser for the scripts: no abbreviated options (`--checkpoint` never stands
    for `--checkpoints`), and a usage error is one line, exit status 2.

    Example:
        >>> p = ScriptParser(prog="x")
        >>> _ = p.add_argument("--checkpoints")
        >>> p.parse_args(["--checkpoint", "a"])
        Traceback (most recent call last):
        ...
        SystemExit: 2
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        from dit_prune.cli import DefaultsHelpFormatter  # '(default: X)' where worth showing

        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Print `PROG: error: MESSAGE` on one line and exit 2."""
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def base_parser(description: str, default_out: str,
                checkpoint: bool = True) -> argparse.ArgumentParser:
    """The options every ablation script shares (`--checkpoint` unless `checkpoint` is False:
    a script measuring several checkpoints names its own option)."""
    parser = ScriptParser(description=description)
    if checkpoint:
        parser.add_argument("--checkpoint", default="checkpoints/digits-memorized",
                            help="checkpoint directory to measure")
    parser.add_argument("--out", default=default_out, help="output folder (runs, tables, plots)")
    parser.add_argument("--seeds", default="0-299", help="sampling seeds (one per image)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM sampling steps")
    parser.add_argument("--pruning-seeds", default="0,1,2",
                        help="scoring / random-pruning / training seeds; mean ± std over these")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny settings for CI (e.g. 30 samples, 5 steps, one seed) for "
                             "every option not given explicitly; given options win")
    return parser


def explicit_options(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The destinations of the options `argv` gives explicitly (not left at their default).

    Example:
        >>> p = ScriptParser()
        >>> _ = p.add_argument("--steps", type=int, default=25)
        >>> _ = p.add_argument("--seeds", default="0-9")
        >>> sorted(explicit_options(p, ["--steps", "5"]))
        ['steps']
    """
    saved = [(action, action.default) for action in parser._actions]
    saved_defaults = parser._defaults
    try:
        parser._defaults = {}
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        given, _ = parser.parse_known_args(argv)
    finally:
        parser._defaults = saved_defaults
        for action, default in saved:
            action.default = default
    return set(vars(given))


def parse_script_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                      smoke: Mapping[str, Any]) -> argparse.Namespace:
    """Parse `argv`; with --smoke, set the `smoke` values (dest -> value) of the options not
    given explicitly; then validate the shared options (one-line usage error, exit 2).

    Example:
        >>> p = base_parser("demo", "/tmp/demo", checkpoint=False)
        >>> args = parse_script_args(p, ["--smoke", "--steps", "7"], {"steps": 5, "seeds": "0-9"})
        >>> args.steps, args.seeds
        (7, '0-9')
    """
    args = parser.parse_args(argv)
    if args.smoke:
        given = explicit_options(parser, argv)
        for dest, value in smoke.items():
            if dest not in given:
                setattr(args, dest, value)
    check_shared_args(parser, args)
    return args


def check_shared_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate base_parser's options: --seeds (as `dit-prune run --seeds`), --steps,
    --pruning-seeds and --checkpoint (an existing directory)."""
    from dit_prune.errors import DitPruneError
    from dit_prune.sampling import parse_seeds

    try:
        parse_seeds(args.seeds, "--seeds")
    except DitPruneError as exc:
        parser.error(str(exc))
    check_positive(parser, args.steps, "--steps")
    int_list(parser, args.pruning_seeds, "--pruning-seeds")
    if getattr(args, "checkpoint", None) is not None:
        check_checkpoints(parser, args.checkpoint, "--checkpoint")


def check_positive(parser: argparse.ArgumentParser, value: int, flag: str,
                   low: int = 1) -> None:
    """Refuse an integer option below `low` (one-line usage error)."""
    if value < low:
        parser.error(f"{flag} must be at least {low}, got {value}")


def int_list(parser: argparse.ArgumentParser, text: str, flag: str) -> list[int]:
    """A comma list of distinct non-negative integers ('0,1,2'), or a one-line usage error."""
    try:
        values = parse_list(text, int)
    except ValueError:
        parser.error(f"{flag} takes a comma list of integers such as 0,1,2, got {text!r}")
    if not values or min(values) < 0 or len(set(values)) != len(values):
        parser.error(f"{flag} takes distinct non-negative integers, at least one, got {text!r}")
    return values


def float_list(parser: argparse.ArgumentParser, text: str, flag: str) -> list[float]:
    """A comma list of finite numbers ('0,5,10'), at least one, or a one-line usage error."""
    try:
        values = parse_list(text, float)
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        parser.error(f"{flag} takes a comma list of numbers such as 0,5,10, got {text!r}")
    return values


def check_checkpoints(parser: argparse.ArgumentParser, text: str, flag: str) -> list[str]:
    """A comma list of existing checkpoint directories, or a one-line usage error naming the
    first that is missing."""
    names = parse_list(text)
    if not names:
        parser.error(f"{flag} names no checkpoint")
    for name in names:
        if not Path(name).expanduser().is_dir():
            parser.error(f"{flag} {name}: no such checkpoint directory")
    return names


def check_scorers(parser: argparse.ArgumentParser, text: str, flag: str) -> None:
    """Every scorer spec of comma list `text` names a registered scorer and well-formed
    options (`parse_scorer_spec`), or a one-line usage error listing the scorers."""
    from dit_prune.scorers import SCORERS

    specs = parse_list(text)
    if not specs:
        parser.error(f"{flag} names no scorer; choose from {', '.join(sorted(SCORERS))}")
    for spec in specs:
        try:
            name, _ = parse_scorer_spec(spec)
        except SystemExit as exc:
            parser.error(f"{flag}: {exc}")
        if name not in SCORERS:
            parser.error(f"{flag}: unknown scorer {name!r}; choose from "
                         f"{', '.join(sorted(SCORERS))}")


def check_budgets(parser: argparse.ArgumentParser, text: str, flag: str) -> Any:
    """Budgets as `dit-prune run --budget` takes them, or a one-line usage error."""
    from dit_prune.errors import DitPruneError
    from dit_prune.pruning.selection import parse_budgets

    try:
        return parse_budgets(text)
    except DitPruneError as exc:
        parser.error(f"{flag}: {exc}")


def run_script(main: Callable[[], Any], prog: str) -> NoReturn:
    """Run a script's `main` and exit: 0 (or the int it returns); a DitPruneError or a
    SystemExit carrying a message is one line on stderr and status 2; Ctrl-C is one line, 130.

    Example (end of a script):
        if __name__ == "__main__":
            run_script(main, "regimes")
    """
    from dit_prune.errors import DitPruneError

    def fail(message: str, status: int) -> NoReturn:
        line = " ".join(message.split())
        sys.stderr.write((line if line.startswith(f"{prog}:") else f"{prog}: error: {line}")
                         + "\n")
        sys.stderr.flush()
        sys.exit(status)

    try:
        result = main()
    except DitPruneError as exc:
        fail(str(exc), 2)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            fail(exc.code, 2)
        raise
    except KeyboardInterrupt:
        fail("interrupted", 130)
    sys.exit(result if isinstance(result, int) else 0)


def limit_threads() -> None:
    """One thread: the tiny models run fastest so, and shared CPUs do not thrash."""
    import torch

    torch.set_num_threads(1)


@contextmanager
def no_latency_measurement() -> Any:
    """Skip the run's sampling-latency timing (3 × 32 images per model): it is irrelevant to the
    ablations and costs more than the evaluation itself on shared CPUs. Latency is reported NaN."""
    import dit_prune.run.experiment as experiment

    original = experiment.latency_seconds
    experiment.latency_seconds = lambda *args, **kwargs: float("nan")
    try:
        yield
    finally:
        experiment.latency_seconds = original


def run_cached(cfg: Any, report_path: Path, inputs: Any = None) -> dict[str, Any]:
    """run_experiment(cfg) → build_report, stored at report_path; reread if already there.

    Sample shards, reference statistics and scores are cached in cfg.out by run_experiment
    itself, so several scorers sharing one run folder share the before / random arms. A stored
    report is reused only if it holds the same budgets and was made by the same scoring code.
    """
    from dit_prune.scorers import scoring_code_fingerprint

    code = scoring_code_fingerprint()
    if report_path.is_file():
        cached = json.loads(report_path.read_text())
        budgets = [b["budget"] for b in cached.get("budgets", [])]
        if cached.get("scoring_code") == code and budgets == list(cfg.budgets):
            return cached
    from dit_prune.run import run_experiment
    from dit_prune.run.report import build_report

    started = time.perf_counter()
    with no_latency_measurement():
        result = run_experiment(cfg, inputs, progress=False)
    report = build_report(result)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report["scoring_code"] = code
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=1))
    return report


def mean_std(values: Iterable[float | None]) -> tuple[float, float, int]:
    """(mean, sample std (0 for one value), count) of the finite values; NaNs when none."""
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not kept:
        return math.nan, math.nan, 0
    std = float(np.std(kept, ddof=1)) if len(kept) > 1 else 0.0
    return float(np.mean(kept)), std, len(kept)


def aggregate(metric_dicts: Sequence[dict[str, Any]],
              keys: Sequence[str] = METRICS) -> dict[str, tuple[float, float, int]]:
    """Per key, mean ± std over the given metric dicts (one per seed)."""
    return {key: mean_std(d.get(key) for d in metric_dicts) for key in keys}


def fmt(stat: tuple[float, float, int], key: str) -> str:
    """'45.3 ± 2.1%' for rates, '21.4 ± 1.3' for FD, '0.512 ± 0.010' otherwise."""
    mean, std, count = stat
    if count == 0:
        return "—"
    if key in ("memorization_rate", "copy_rate"):
        mean, std, unit, digits = 100 * mean, 100 * std, "%", 1
    else:
        unit, digits = "", 1 if key == "fd" else 3
    if count == 1:
        return f"{mean:.{digits}f}{unit}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}{unit}"


def digits_calibration(meta: Any) -> Any:
    """CalibrationData of a digits checkpoint: the training digits its metadata records, and the
    held-out digits (with labels)."""
    from dit_prune.data import digits_split
    from dit_prune.pruning.recovery_data import recovery_images
    from dit_prune.scorers import CalibrationData

    train, train_labels, _ = recovery_images(meta.extra, "train")
    split = digits_split()
    return CalibrationData(train, train_labels, split.heldout_images, split.heldout_labels)


def scored_and_pruned(base: Any, scorer: str, seed: int, budget: float, mode: str, data: Any,
                      scheduler: Any, smoke: bool = False) -> Any:
    """A copy of base with `budget` of its `mode` units removed by `scorer` (scored afresh with
    `seed` on data, a CalibrationData; tiny calibration when smoke). Scoring takes seconds on
    the digits model, so scores are not cached here: they always come from the current code."""
    import copy

    from dit_prune.pruning import prune_units, select_units
    from dit_prune.pruning.selection import model_mode_kinds
    from dit_prune.scorers import get_scorer
    from dit_prune.units import enumerate_units

    units = enumerate_units(base, model_mode_kinds(mode, base))
    name, options = parse_scorer_spec(scorer)
    if smoke:
        options = {"batches": 1, "max_images": 16, **options}
    scores = get_scorer(name, progress=False, seed=seed, **options).compute(
        base, units, data, scheduler).scores  # (U,)
    model = copy.deepcopy(base)
    prune_units(model, select_units(units, scores, budget, mode=mode, model=model))
    return model.eval()


def write_table(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]],
                title: str = "", notes: Sequence[str] = ()) -> Path:
    """A markdown table (with an optional heading and notes) at path."""
    lines = [f"## {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=float))
    return path


def new_figure(ncols: int, width: float = 5.0, height: float = 4.0,
               ratios: Sequence[float] | None = None) -> tuple[Any, Any]:
    """A matplotlib (Agg) figure with ncols axes (always an array), of relative widths ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = list(ratios) if ratios else [1.0] * ncols
    fig, axes = plt.subplots(1, ncols, figsize=(width * sum(ratios), height), squeeze=False,
                             gridspec_kw={"width_ratios": ratios})
    return fig, axes[0]


def save_figure(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def timed(label: str) -> Callable[[], None]:
    """Start a wall clock; calling the result prints '<label>: N s'."""
    started = time.perf_counter()

    def done() -> None:
        print(f"{label}: {time.perf_counter() - started:.0f} s wall")

    return done
