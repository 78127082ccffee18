"""`dit-prune prune`: scores + budget -> a structurally pruned checkpoint directory.

Loads the checkpoint (never modifying it), selects the top-scoring units within the budget,
removes them with torch-pruning, optionally recovers, and writes OUT with the pruned weights,
`plan.json`, `prune_report.json` (parameters and MACs before/after) and `config.resolved.json`.

Example:
    $ dit-prune prune checkpoints/digits-memorized --scores runs/score-taylor --budget 0.2 \
        --budget-mode heads --out runs/pruned-taylor-20 --recover distill --recover-steps 200
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dit_prune.checkpoint import load_dit
from dit_prune.commands.common import (
    claim_out,
    dump_resolved_config,
    pick_device,
    write_marker,
)
from dit_prune.errors import DitPruneError
from dit_prune.pruning.format import PLAN_NAME, read_plan, save_pruned
from dit_prune.pruning.recovery import RECOVERY_METHODS, RecoveryConfig, recover
from dit_prune.pruning.recovery_data import RECOVERY_SOURCES, recovery_images
from dit_prune.pruning.selection import (
    BUDGET_MODES,
    DEFAULT_BUDGET_MODE,
    check_budget,
    check_budget_for,
    select_units,
)
from dit_prune.pruning.structural import PrunePlan, prune_units
from dit_prune.run.measure import macs_and_params
from dit_prune.scorers.io import load_scores
from dit_prune.structure import original_counts
from dit_prune.units import Unit, adapter_for, enumerate_units

REPORT_NAME = "prune_report.json"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("prune", help="structurally prune the top-scoring heads/neurons")
    p.add_argument("checkpoint", help="checkpoint directory to prune (left unchanged)")
    p.add_argument("--scores", required=True,
                   help="a `dit-prune score` run directory or its scores.safetensors")
    p.add_argument("--budget", required=True,
                   help="a fraction in (0, 1), or a whole number of units such as 3")
    p.add_argument("--budget-mode", default=DEFAULT_BUDGET_MODE, choices=BUDGET_MODES,
                   help=f"what the budget is a fraction of (default: {DEFAULT_BUDGET_MODE})")
    p.add_argument("--out", required=True, help="output directory of the pruned checkpoint")
    p.add_argument("--recover", default="none", choices=RECOVERY_METHODS,
                   help="recovery after pruning: none, finetune (re-teaches copying on the "
                        "training images) or distill (teacher at large t only)")
    defaults = RecoveryConfig()  # the library's defaults are the command's
    p.add_argument("--recover-steps", type=int, default=defaults.steps)
    p.add_argument("--recover-lr", type=float, default=defaults.lr)
    p.add_argument("--recover-batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--recover-t-min", type=int, default=defaults.t_min, help="distill: smallest t")
    p.add_argument("--recover-t-max", type=int, default=defaults.t_max, help="distill: largest t")
    p.add_argument("--recover-ema", type=float, default=defaults.ema_decay,
                   help="finetune: EMA decay")
    p.add_argument("--recover-data", default="train",
                   help=f"recovery images: one of {', '.join(RECOVERY_SOURCES)} or a folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    budget = check_budget(args.budget)
    recovery_config = _recovery_config(args)
    checkpoint, out = Path(args.checkpoint), Path(args.out)
    if not checkpoint.exists():
        raise DitPruneError(f"checkpoint not found: {checkpoint}")
    recover_folder = None if args.recover_data in RECOVERY_SOURCES else args.recover_data
    claim_out(args.out, "prune", {"checkpoint": args.checkpoint, "--scores": args.scores,
                             "--recover-data": recover_folder}, args.overwrite)
    device = pick_device(args.device)
    loaded = load_dit(checkpoint, device=device)
    model, meta = loaded.model, loaded.meta
    recovery_data = None
    if recovery_config is not None:
        recovery_config.check_timesteps(int(loaded.scheduler.config.num_train_timesteps))
        recovery_data = recovery_images(meta.extra, args.recover_data)  # checked before work
        if args.recover == "finetune" and recovery_data[1] is None:
            raise DitPruneError(f"fine-tuning needs labelled images, but --recover-data "
                                f"{args.recover_data} has none (use --recover distill)")
    scores = load_scores(_score_dir(Path(args.scores)))
    units, values, already_gone = _present_units(model, scores.units, scores.scores)
    check_budget_for(budget, args.budget_mode, _counts(units))
    chosen = select_units(units, values, budget, mode=args.budget_mode, model=model)
    if not chosen:
        raise DitPruneError(f"budget {budget} of {args.budget_mode} selects no unit")
    teacher = copy.deepcopy(model) if args.recover == "distill" else None
    before = macs_and_params(model)
    plan = prune_units(model, chosen, progress=True)
    after = macs_and_params(model)
    recovery, data_info = _recover(args.recover, recovery_config, model, teacher, recovery_data)
    if recovery is not None:
        model = recovery.model
    base_hash, history = _lineage(checkpoint, meta.weights_sha256)
    report = {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": meta.weights_sha256,
        "base_sha256": base_hash,
        "scores": str(args.scores),
        "scorer": scores.config.get("scorer", "unknown"),
        "budget": budget,
        "budget_mode": args.budget_mode,
        "units_removed": plan.counts,
        "scored_units_already_pruned": already_gone,
        "params": _pair(before["params"], after["params"]),
        "macs": _pair(before["macs"], after["macs"]),
        "recovery": None if recovery is None else {**recovery.summary(), "data": data_info},
        "seconds": round(time.perf_counter() - started, 1),
    }
    extra = dict(meta.extra)
    extra["pruning"] = {k: report[k] for k in ("checkpoint", "base_sha256", "scorer", "budget",
                                               "budget_mode", "units_removed", "recovery")}

    def write_run_files(tmp: Path) -> None:
        write_marker(tmp, "prune")
        dump_resolved_config(tmp, args, budget=budget, device=str(device))

    try:
        save_pruned(model.cpu(), out, scheduler=loaded.scheduler, plan=[*history, plan],
                    base_hash=base_hash, overwrite=True, extra=extra,
                    files={REPORT_NAME: json.dumps(report, indent=2)},
                    on_staged=write_run_files)
    except OSError as exc:
        raise DitPruneError(f"cannot write --out {out}: {exc.filename or out}: "
                            f"{exc.strerror or exc}") from None
    print(json.dumps({k: report[k] for k in ("units_removed", "params", "macs")}))
    print(f"saved {out}")
    return 0


def _recovery_config(args: argparse.Namespace) -> RecoveryConfig | None:
    """The validated recovery options (None without recovery), before any work."""
    if args.recover == "none":
        return None
    return RecoveryConfig(steps=args.recover_steps, lr=args.recover_lr,
                          batch_size=args.recover_batch_size, t_min=args.recover_t_min,
                          t_max=args.recover_t_max, ema_decay=args.recover_ema, seed=args.seed)


def _counts(units: list[Unit]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for unit in units:
        counts[unit.kind] = counts.get(unit.kind, 0) + 1
    return counts


def _present_units(
    model: nn.Module, units: list[Unit], values: torch.Tensor
) -> tuple[list[Unit], torch.Tensor, int]:
    """Drop scored units that an earlier pruning removed; error on units the model never had."""
    present = set(enumerate_units(model, adapter_for(model).kinds))
    full = original_counts(model)
    keep: list[int] = []
    for i, unit in enumerate(units):
        if unit in present:
            keep.append(i)
            continue
        counts = full.get(unit.kind, [])
        if unit.block >= len(counts) or unit.index >= counts[unit.block]:
            raise DitPruneError(f"the scores name {unit}, which this model's architecture lacks")
    return [units[i] for i in keep], values[keep], len(units) - len(keep)


def _pair(before: int, after: int) -> dict[str, Any]:
    return {"before": before, "after": after, "ratio": round(after / before, 6)}


def _recover(
    method: str, config: RecoveryConfig | None, model: nn.Module, teacher: nn.Module | None,
    data: tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]] | None,
) -> tuple[Any, dict[str, Any] | None]:
    if config is None or data is None:
        return None, None
    images, labels, info = data
    result = recover(
        method, model, images, labels, teacher=teacher, steps=config.steps,
        lr=config.lr, batch_size=config.batch_size, t_min=config.t_min,
        t_max=config.t_max, ema_decay=config.ema_decay, seed=config.seed,
    )
    return result, info


def _lineage(checkpoint: Path, weights_sha256: str) -> tuple[str, list[PrunePlan]]:
    """The original base's hash and earlier plans, carried over when the input was pruned."""
    plan_file = checkpoint / PLAN_NAME
    if not plan_file.is_file():
        return weights_sha256, []
    info = read_plan(plan_file)
    history = [PrunePlan.from_json(p) for p in info.get("plans", [])]
    return str(info.get("base_sha256") or weights_sha256), history


def _score_dir(path: Path) -> Path:
    """`dit-prune score` output: the run directory, or one of its two files."""
    return path.parent if path.is_file() else path
