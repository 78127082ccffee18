"""`dit-prune run`: the whole before/after experiment into one run directory.

Example:
    $ dit-prune run checkpoints/digits-memorized --out runs/demo --budget 0.1,0.2
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from dit_prune.commands.common import RESOLVED_CONFIG_NAME, dump_resolved_config
from dit_prune.errors import DitPruneError
from dit_prune.run.config import BUDGET_MODES, RECOVERIES, RunConfig


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run", help="baseline, score, prune, evaluate on the same seeds, compare with random",
        description="Everything is validated before long work starts; an interrupted run "
                    "continues where it stopped when started again with the same options.")
    p.add_argument("checkpoint", help="DiT checkpoint directory (or hub id)")
    p.add_argument("--out", default="runs/run", help="run directory (default: runs/run)")
    p.add_argument("--scorer", default="taylor-gap")
    p.add_argument("--budget", default="0.2",
                   help="fraction(s) of units to remove, comma-separated, each in (0, 1)")
    p.add_argument("--budget-mode", default="heads", choices=BUDGET_MODES)
    p.add_argument("--seeds", default="0-999", help="sampling seeds, e.g. 0-999")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"))
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--scorer-option", action="append", default=[], metavar="KEY=VALUE",
                   help="scorer option, e.g. timesteps=beta:0.8,2 or batches=8 (repeatable)")
    p.add_argument("--recover", default="none", choices=RECOVERIES)
    p.add_argument("--recover-steps", type=int, default=200)
    p.add_argument("--recover-data", default="train",
                   help="images recovery trains on: train (the checkpoint's training images), "
                   "unused (digits pool images it never saw), heldout (contaminates FD, which is "
                   "measured against them) or an image folder")
    p.add_argument("--seed", type=int, default=0, help="scoring and random-control seed")
    p.add_argument("--train", help="training image folder (default: the checkpoint's digits)")
    p.add_argument("--heldout", help="held-out image folder (default: held-out digits)")
    p.add_argument("--features", help="feature network for FD (default: digits-features)")
    p.add_argument("--copy-detector", help="copy-detection model (default: digits-copydetect)")
    p.add_argument("--device", default="auto")
    p.add_argument("--shard-size", type=int, default=250,
                   help="images per sample shard (the unit of resuming and of multi-process work)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard an earlier run in --out whose options differ")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    try:
        budgets = tuple(float(b) for b in str(args.budget).split(",") if b.strip())
    except ValueError:
        raise DitPruneError(f"--budget must be numbers like 0.1,0.2, got {args.budget!r}") from None
    return RunConfig(
        checkpoint=args.checkpoint, out=args.out, scorer=args.scorer, budgets=budgets,
        budget_mode=args.budget_mode, seeds=args.seeds, steps=args.steps, sampler=args.sampler,
        guidance_scale=args.guidance_scale, scorer_options=_scorer_options(args.scorer_option),
        recover=args.recover, recover_steps=args.recover_steps,
        recover_data=args.recover_data, seed=args.seed,
        train=args.train, heldout=args.heldout, features=args.features,
        copy_detector=args.copy_detector, device=args.device,
        shard_size=args.shard_size,
    )


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from dit_prune.pruning import save_pruned
    from dit_prune.run.experiment import prepare_inputs, run_experiment
    from dit_prune.run.report import summary_lines, write_outputs
    from dit_prune.scorers import SCORERS

    started = time.perf_counter()
    cfg = config_from_args(args)
    if cfg.scorer not in SCORERS:
        raise DitPruneError(f"unknown scorer {cfg.scorer!r}; choose one of {', '.join(SCORERS)}")
    inputs = prepare_inputs(cfg)  # loads and checks everything before long work
    state = PartialState()
    run_dir = Path(cfg.out)
    if state.is_main_process:
        _claim_run_dir(run_dir, cfg, args.overwrite)
        dump_resolved_config(run_dir, args, resolved=cfg.to_json())
    state.wait_for_everyone()
    result = run_experiment(cfg, inputs, progress=state.is_main_process)
    if not state.is_main_process:
        return 0
    report = write_outputs(result, run_dir)
    entry = result["entries"][0]
    save_pruned(entry["model"], run_dir / "pruned", scheduler=inputs.loaded.scheduler,
                plan=entry["after_plan"], base_hash=inputs.loaded.meta.weights_sha256,
                overwrite=True)
    print("\n".join(summary_lines(report)))
    print(f"\nwrote {run_dir}/report.md, report.json, samples_before_after.png"
          + (", tradeoff.png" if len(cfg.budgets) > 1 else "")
          + f", pruned/ in {time.perf_counter() - started:.0f} s")
    return 0


def _claim_run_dir(run_dir: Path, cfg: RunConfig, overwrite: bool) -> None:
    """Resume a run with identical options; otherwise refuse (or, with overwrite, start over)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise DitPruneError(f"run directory {run_dir} is a file")
    previous = run_dir / RESOLVED_CONFIG_NAME
    if previous.is_file():
        try:
            same = json.loads(previous.read_text()).get("resolved") == cfg.to_json()
        except json.JSONDecodeError:
            same = False
        if same:
            return
        if not overwrite:
            raise DitPruneError(f"{run_dir} holds a run with other options (pass --overwrite to "
                                "discard it, or choose another --out)")
    elif run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        raise DitPruneError(f"{run_dir} is not empty and is not a dit-prune run "
                            "(pass --overwrite or choose another --out)")
    if run_dir.is_dir():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)


def _scorer_options(items: list[str]) -> dict[str, object]:
    options: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise DitPruneError(f"--scorer-option takes KEY=VALUE, got {item!r}")
        options[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return options


def _parse_value(text: str) -> object:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text
