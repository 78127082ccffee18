"""Benchmark: `dit-prune run` wall time against its sampling alone (the floor), with a breakdown.

Runs the whole experiment in this process (`run_experiment` + `write_outputs` + `save_pruned`,
what `dit-prune run` does) into a fresh directory, with a timer around each stage, so every
ratio comes from one run on one (possibly shared) machine:

  * sampling: every `sample_images` call that draws the run's arms (before, the scorer's
    models, random pruning at every seed and budget) — the floor: a run cannot be faster;
  * everything else, by stage: evaluation (ratio test, copy rate, FD, ...), scoring, latency
    measurement, MACs, re-trigger attacks, pruning, noise controls, reports and figures.

overhead = (wall - sampling) / sampling. Target: < 20% on the demo configuration
(`dit-prune run checkpoints/digits-duplicated --budget 2,1,3`, as `make demo`).
With `--profile FILE` the non-sampling part is also profiled (cProfile, sorted by cumulative
time, top 40 printed).

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_run_overhead.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_run_overhead.py --scorer \
        activation-contrast --budget-mode neurons --budget 60 --random-budgets 10,20,40,80,160
    .venv/bin/python benchmarks/bench_run_overhead.py --budget 2 --random-seeds 0 --seeds 0-199
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

STAGES = {  # module attribute -> stage name; each is timed where experiment.py calls it
    "sample_images": "sampling (the floor)",
    "evaluate_samples": "evaluation of samples",
    "build_context": "evaluation context (held-out stats, tau)",
    "evaluate_noise_control": "noise controls",
    "_cached_scores": "scoring (incl. random draws)",
    "latency_seconds": "latency measurement",
    "macs_and_params": "MACs and parameters",
    "retrigger_probe": "re-trigger probe set-up",
    "_pruned_copy": "pruning (copy, select, prune)",
    "_fd_change": "paired FD change",
}


class Timers:
    """Accumulated seconds per stage; nested timed calls count only in the outer stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.depth = 0

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.depth += 1
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    self.seconds[name] += time.perf_counter() - started
        return timed


def instrument(timers: Timers) -> None:
    """Wrap the stages in `dit_prune.run.experiment` (and the re-trigger probe's attacks)."""
    from dit_prune.run import experiment, retrigger

    for attr, name in STAGES.items():
        setattr(experiment, attr, timers.wrap(name, getattr(experiment, attr)))
    retrigger.attack_success = timers.wrap("re-trigger attacks", retrigger.attack_success)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/digits-duplicated")
    parser.add_argument("--budget", default="2,1,3")
    parser.add_argument("--seeds", default="0-999")
    parser.add_argument("--random-seeds", default="0,1,2")
    parser.add_argument("--scorer", default=None, help="default: RunConfig's (taylor-gap)")
    parser.add_argument("--budget-mode", default=None, help="default: RunConfig's (heads)")
    parser.add_argument("--random-budgets", default=None,
                        help="e.g. 10,20,40,80,160 (default: the scorer's budgets)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="run directory (default: a temp dir)")
    parser.add_argument("--profile", default=None, help="write cProfile stats to this file")
    parser.add_argument("--json", default=None, help="write the breakdown as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from dit_prune.pruning import save_pruned
    from dit_prune.pruning.selection import parse_budgets
    from dit_prune.run.config import RunConfig
    from dit_prune.run.experiment import prepare_inputs, run_experiment
    from dit_prune.run.report import write_outputs

    out = Path(args.out or tempfile.mkdtemp(prefix="bench_run."))
    if out.exists():
        shutil.rmtree(out)
    timers = Timers()
    instrument(timers)
    chosen = {k: v for k, v in (("scorer", args.scorer), ("budget_mode", args.budget_mode))
              if v is not None}
    if args.random_budgets:
        chosen["random_budgets"] = parse_budgets(args.random_budgets)
    cfg = RunConfig(checkpoint=args.checkpoint, out=str(out), budgets=parse_budgets(args.budget),
                    seeds=args.seeds,
                    random_seeds=tuple(int(s) for s in args.random_seeds.split(",")), **chosen)
    profiler = cProfile.Profile() if args.profile else None
    started = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    inputs = timers.wrap("loading inputs", prepare_inputs)(cfg)
    result = run_experiment(cfg, inputs, progress=False)
    with_reports = time.perf_counter()
    write_outputs(result, out)
    entry = result["entries"][0]
    save_pruned(entry["model"], out / "pruned", scheduler=inputs.loaded.scheduler,
                plan=entry["after_plan"], base_hash=inputs.loaded.meta.weights_sha256,
                overwrite=True)
    wall = time.perf_counter() - started
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile)
    timers.seconds["reports, figures, pruned/"] = time.perf_counter() - with_reports
    floor = timers.seconds["sampling (the floor)"]
    other = wall - sum(timers.seconds.values())
    rows = sorted(timers.seconds.items(), key=lambda kv: -kv[1]) + [("other", other)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {cfg.checkpoint}, "
          f"scorer {cfg.scorer}, {cfg.budget_mode}, budgets {args.budget}, random budgets "
          f"{args.random_budgets or 'as the scorer'}, seeds {args.seeds}, random seeds "
          f"{args.random_seeds}")
    print("| stage | seconds | share of wall | relative to sampling |")
    print("|---|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} | {seconds / wall:.1%} | {seconds / floor:.1%} |")
    print(f"| **wall** | {wall:.1f} | 100% | overhead beyond sampling "
          f"**{(wall - floor) / floor:.1%}** |")
    if args.json:
        Path(args.json).write_text(json.dumps({"wall_s": wall, "sampling_s": floor,
                                               "overhead": (wall - floor) / floor,
                                               "stages": dict(rows)}, indent=2) + "\n")
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(args.profile, stream=text).sort_stats("cumulative").print_stats(40)
        print(text.getvalue())
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
