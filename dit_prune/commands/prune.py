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
    DEVICE_HELP,
    claim_out,
    dump_resolved_config,
    mark_finished,
    pick_device,
)
from dit_prune.errors import DitPruneError
from dit_prune.keyvalue import parse_key_values
from dit_prune.pruning.adversarial import AdversarialConfig, adversarial, adversarial_config
from dit_prune.pruning.format import PLAN_NAME, read_plan, save_pruned
from dit_prune.pruning.recovery import (
    RECOVERY_METHODS,
    RecoveryConfig,
    check_recovery_flags,
    recover,
)
from dit_prune.pruning.recovery_data import (
    GENERATED_NOVEL,
    RECOVERY_SOURCES,
    check_enough_novel,
    generated_novel_images,
    recovery_images,
)
from dit_prune.pruning.selection import (
    BUDGET_MODE_HELP,
    BUDGET_MODES,
    DEFAULT_BUDGET_MODE,
    check_budget,
    check_budget_for,
    select_units,
)
from dit_prune.pruning.structural import PrunePlan, prune_units
from dit_prune.run.measure import macs_and_params
from dit_prune.sampling import check_steps, seed_option
from dit_prune.scorers.io import SCORES_NAME, SIDECAR_NAME, check_scored_model, load_scores
from dit_prune.structure import original_counts
from dit_prune.units import Unit, adapter_for, enumerate_units

REPORT_NAME = "prune_report.json"
DEFAULT_POOL = 1000  # --recover-pool
# the recovery flags -> their attribute of the parsed arguments and the value when not given
_RECOVERY_ARGS = {
    "--recover-steps": ("recover_steps", RecoveryConfig.steps),
    "--recover-lr": ("recover_lr", RecoveryConfig.lr),
    "--recover-batch-size": ("recover_batch_size", RecoveryConfig.batch_size),
    "--recover-t-min": ("recover_t_min", None),  # the method's own
    "--recover-t-max": ("recover_t_max", RecoveryConfig.t_max),
    "--recover-ema": ("recover_ema", RecoveryConfig.ema_decay),
    "--recover-data": ("recover_data", "train"),
    "--recover-pool": ("recover_pool", DEFAULT_POOL),
    "--recover-option": ("recover_option", []),
    "--copy-detector": ("copy_detector", None),
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("prune", help="structurally prune the top-scoring heads/neurons")
    p.add_argument("checkpoint", help="checkpoint directory to prune (left unchanged)")
    p.add_argument("--scores", required=True,
                   help="a `dit-prune score` run directory or its scores.safetensors")
    p.add_argument("--budget", required=True,
                   help="a fraction in (0, 1), or a whole number of units such as 3")
    p.add_argument("--budget-mode", default=DEFAULT_BUDGET_MODE, choices=BUDGET_MODES,
                   help=f"{BUDGET_MODE_HELP} (default: {DEFAULT_BUDGET_MODE})")
    p.add_argument("--out", required=True, help="output directory of the pruned checkpoint")
    p.add_argument("--recover", default="none", choices=RECOVERY_METHODS,
                   help="recovery after pruning: none, finetune (re-teaches copying on the "
                        "training images), distill (teacher at large t by default) or "
                        "adversarial (distill while moving off re-triggered copies)")
    defaults = RecoveryConfig()  # the library's defaults are the command's
    # recovery options default to None ("not given"): one that the chosen --recover (or
    # --recover-data) would ignore is refused (check_recovery_flags); _recovery_config fills in
    # the defaults
    p.add_argument("--recover-steps", type=int, default=None,
                   help=f"recovery steps (default: {defaults.steps})")
    p.add_argument("--recover-lr", type=float, default=None,
                   help=f"recovery learning rate (default: {defaults.lr:g})")
    p.add_argument("--recover-batch-size", type=int, default=None,
                   help=f"recovery batch size (default: {defaults.batch_size})")
    p.add_argument("--recover-t-min", type=int, default=None,
                   help=f"distill, adversarial: smallest t (default: {defaults.t_min} for "
                        "distill, 0 for adversarial)")
    p.add_argument("--recover-t-max", type=int, default=None,
                   help=f"distill, adversarial: largest t (default: {defaults.t_max})")
    p.add_argument("--recover-ema", type=float, default=None,
                   help=f"finetune: EMA decay (default: {defaults.ema_decay})")
    p.add_argument("--recover-data", default=None,
                   help=f"recovery images: one of {', '.join(RECOVERY_SOURCES)} or a folder "
                        f"({GENERATED_NOVEL}: samples of the unpruned model that the copy "
                        "detector calls novel; digits checkpoints) (default: train)")
    p.add_argument("--recover-pool", type=int, default=None,
                   help=f"{GENERATED_NOVEL}: samples drawn (DDIM 50 steps) before the copies "
                        f"are dropped (default: {DEFAULT_POOL}); at least --recover-batch-size "
                        "of them must be novel")
    p.add_argument("--recover-option", action="append", default=[], metavar="KEY=VALUE",
                   help="adversarial recovery option, e.g. inner_steps=2, margin=0.05, weight=1 "
                        "(repeatable; see dit_prune.pruning.adversarial.AdversarialConfig)")
    p.add_argument("--copy-detector", default=None,
                   help=f"{GENERATED_NOVEL}: copy-detection model (default: digits-copydetect)")
    p.add_argument("--seed", type=seed_option, default=0,
                   help="seed of the recovery (its batches, noise and generated pool; "
                        "with --recover)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
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
    base_hash, history = _lineage(checkpoint, meta.weights_sha256)
    ancestors = _ancestors(meta.extra, base_hash, meta.weights_sha256)
    score_dir = _score_dir(Path(args.scores))
    scores = load_scores(score_dir)
    check_scored_model(scores, str(score_dir), str(checkpoint), meta.weights_sha256, ancestors)
    units, values, already_gone = _present_units(model, scores.units, scores.scores)
    check_budget_for(budget, args.budget_mode, _counts(units), model)
    chosen = select_units(units, values, budget, mode=args.budget_mode, model=model)
    if not chosen:
        raise DitPruneError(f"budget {budget} of {args.budget_mode} selects no unit")
    recovery_data, targets = None, None
    if recovery_config is not None:
        num_train_timesteps = int(loaded.scheduler.config.num_train_timesteps)
        if isinstance(recovery_config, AdversarialConfig):
            recovery_config.distill_config().check_timesteps(num_train_timesteps)
            check_steps(recovery_config.ddim_steps, loaded.scheduler,
                        "--recover-option ddim_steps")
        elif args.recover == "distill":  # finetune trains at the trainer's own t
            recovery_config.check_timesteps(num_train_timesteps)
        if args.recover_data == GENERATED_NOVEL:
            check_steps(50, loaded.scheduler, f"{GENERATED_NOVEL} sampling steps")
            recovery_data = _generated_novel(model, loaded.scheduler, meta.extra, args)
        else:
            recovery_data = recovery_images(meta.extra, args.recover_data)  # checked first
        if args.recover == "finetune" and recovery_data[1] is None:
            raise DitPruneError(f"fine-tuning needs labelled images, but --recover-data "
                                f"{args.recover_data} has none (use --recover distill)")
        if args.recover == "adversarial":
            targets = _adversarial_targets(meta.extra, recovery_data[2],
                                           recovery_config.max_targets)
    teacher = copy.deepcopy(model) if args.recover in ("distill", "adversarial") else None
    before = macs_and_params(model)
    plan = prune_units(model, chosen, progress=True)
    after = macs_and_params(model)
    if args.recover == "adversarial" and targets is not None and recovery_data is not None:
        recovery = adversarial(model, teacher, loaded.scheduler, recovery_data[0],
                               recovery_data[1], *targets[:2], recovery_config)
        data_info = {**recovery_data[2], "targets": targets[2]}
    else:
        recovery, data_info = _recover(args.recover, recovery_config, model, teacher,
                                       recovery_data)
    if recovery is not None:
        model = recovery.model
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
    # every model this one was pruned from: scores of any of them may prune it further
    extra["pruning"]["ancestors_sha256"] = [*ancestors, meta.weights_sha256]

    def write_run_files(tmp: Path) -> None:
        dump_resolved_config(tmp, args, budget=budget, device=str(device))
        mark_finished(tmp, "prune")  # last: the marker lists every file of the output

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


def _recovery_config(args: argparse.Namespace) -> RecoveryConfig | AdversarialConfig | None:
    """The validated recovery options (None without recovery), before any work.

    Every recovery option given must apply to --recover (and --recover-data); the ones not
    given then get their defaults in `args`."""
    given = [flag for flag, (name, _) in _RECOVERY_ARGS.items()
             if getattr(args, name, None) not in (None, [])]
    check_recovery_flags(args.recover, given, data=args.recover_data,
                         generated_only=("--recover-pool", "--copy-detector"))
    for name, default in _RECOVERY_ARGS.values():
        if getattr(args, name, None) is None:
            setattr(args, name, default)
    options = parse_key_values(args.recover_option, "--recover-option")
    if args.recover == "none":
        return None
    if isinstance(args.recover_pool, bool) or args.recover_pool < 1:
        raise DitPruneError(f"--recover-pool must be a positive integer, got {args.recover_pool}")
    shared = {"steps": args.recover_steps, "lr": args.recover_lr,
              "batch_size": args.recover_batch_size, "t_max": args.recover_t_max,
              "seed": args.seed}
    if args.recover == "adversarial":
        flags = {"steps": "--recover-steps", "lr": "--recover-lr", "seed": "--seed",
                 "batch_size": "--recover-batch-size", "t_min": "--recover-t-min",
                 "t_max": "--recover-t-max"}
        reserved = sorted(set(flags) & set(options))
        if reserved:
            raise DitPruneError(f"recovery option {reserved[0]!r} is set by "
                                f"{flags[reserved[0]]}")
        t_min = 0 if args.recover_t_min is None else args.recover_t_min
        return adversarial_config(options, t_min=t_min, **shared)
    t_min = RecoveryConfig.t_min if args.recover_t_min is None else args.recover_t_min
    return RecoveryConfig(t_min=t_min, ema_decay=args.recover_ema, **shared)


def _generated_novel(
    teacher: nn.Module, scheduler: Any, extra: dict[str, Any], args: argparse.Namespace
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Teacher samples the copy detector calls novel, against the checkpoint's training images,
    tau calibrated on the held-out digits (as `dit-prune run` does by default)."""
    from dit_prune.data import digits_split
    from dit_prune.evaluate import default_checkpoints_dir
    from dit_prune.metrics.copydetect import calibrate_threshold, load_copy_detector, nearest_cosine

    data = extra.get("data") if isinstance(extra, dict) else None
    if not isinstance(data, dict) or data.get("source") != "digits":
        raise DitPruneError(f"--recover-data {GENERATED_NOVEL} in dit-prune prune needs a digits "
                            "checkpoint (held-out digits calibrate tau); use dit-prune run "
                            "with --train and --heldout otherwise")
    train, _, _ = recovery_images(extra, "train")
    detector = load_copy_detector(args.copy_detector
                                  or default_checkpoints_dir() / "digits-copydetect")
    train_emb = detector.embed(train)  # (M, E)
    held, _ = nearest_cosine(detector.embed(digits_split().heldout_images), train_emb)  # (K,)
    pool = generated_novel_images(teacher, scheduler, train_emb, detector,
                                  calibrate_threshold(held), count=args.recover_pool,
                                  progress=True)
    check_enough_novel(pool, args.recover_batch_size)
    print(f"{GENERATED_NOVEL}: kept {int(pool.kept.sum())} of {len(pool.kept)} samples")
    return pool.images, pool.labels, {**pool.info(), "copied_positions": pool.copied_positions()}


def _adversarial_targets(extra: dict[str, Any], data_info: dict[str, Any],
                         count: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The copied training images to re-trigger: the duplicated ones the checkpoint records,
    else those the teacher's generated samples copied (--recover-data generated-novel)."""
    data = extra.get("data") if isinstance(extra, dict) else None
    duplicated = data.get("duplicated") if isinstance(data, dict) else None
    if isinstance(duplicated, dict) and duplicated.get("train_positions"):
        positions, source = list(duplicated["train_positions"]), "duplicated"
    elif data_info.get("copied_positions"):
        positions, source = list(data_info["copied_positions"]), "copied by the unpruned model"
    else:
        raise DitPruneError("adversarial recovery needs copied images: a checkpoint that "
                            f"records duplicated images, or --recover-data {GENERATED_NOVEL}")
    train, labels, _ = recovery_images(extra, "train")
    if labels is None:
        raise DitPruneError("adversarial recovery needs labelled training images")
    idx = torch.as_tensor(positions[:count], dtype=torch.long)  # (T,)
    if idx.max() >= len(train):
        raise DitPruneError("the checkpoint's duplicated training positions are invalid")
    return train[idx], labels[idx], {"source": source, "positions": idx.tolist()}


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


def _ancestors(extra: dict[str, Any], base_hash: str, weights_sha256: str) -> tuple[str, ...]:
    """Weights hashes of the models a (pruned) checkpoint was pruned from, oldest first: the
    ones its metadata records, else its unpruned base alone (pruned by an older version)."""
    pruning = extra.get("pruning") if isinstance(extra, dict) else None
    recorded = pruning.get("ancestors_sha256") if isinstance(pruning, dict) else None
    hashes = [h for h in recorded if isinstance(h, str)] if isinstance(recorded, list) else []
    if base_hash != weights_sha256 and base_hash not in hashes:
        hashes.insert(0, base_hash)
    return tuple(h for h in hashes if h != weights_sha256)


def _score_dir(path: Path) -> Path:
    """`dit-prune score` output: the run directory, or one of its two files; anything else (a
    missing path, another file, a folder without scores) is a one-line error naming --scores.

    Example:
        >>> _score_dir(Path("/nonexistent/scores"))
        Traceback (most recent call last):
        ...
        dit_prune.errors.DitPruneError: --scores /nonexistent/scores does not exist: name the \
directory `dit-prune score` wrote
    """
    wanted = "the directory `dit-prune score` wrote"
    if path.is_file():
        if path.name not in (SCORES_NAME, SIDECAR_NAME):
            raise DitPruneError(f"--scores {path} is a file, not scores: it must be {wanted} "
                                f"(or its {SCORES_NAME})")
        return path.parent
    if not path.exists():
        raise DitPruneError(f"--scores {path} does not exist: name {wanted}")
    if not (path / SCORES_NAME).is_file() and not (path / SIDECAR_NAME).is_file():
        raise DitPruneError(f"--scores {path} holds no {SCORES_NAME}: it must be {wanted}")
    return path
