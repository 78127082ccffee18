"""Shared pieces of the ablation scripts: arguments, running cached experiments, aggregation
(mean ± std over pruning/scoring seeds), markdown tables and Agg plots.

Usage (from another script in scripts/):
    from ablation_common import base_parser, run_cached, aggregate, write_table
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


def base_parser(description: str, default_out: str) -> argparse.ArgumentParser:
    """The options every ablation script shares."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--checkpoint", default="checkpoints/digits-memorized")
    parser.add_argument("--out", default=default_out, help="output folder (runs, tables, plots)")
    parser.add_argument("--seeds", default="0-299", help="sampling seeds (one per image)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM sampling steps")
    parser.add_argument("--pruning-seeds", default="0,1,2",
                        help="scoring / random-pruning / training seeds; mean ± std over these")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny settings for CI: 30 samples, 5 steps, one seed")
    return parser


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
