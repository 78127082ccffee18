"""`dit-prune score`: score every unit of a checkpoint and write the scores into a run directory.

The calibration data defaults to the digits training subset recorded in the checkpoint
(`dit_prune.json` -> data.pool_indices, indices into the digits pool) and the digits held-out
set; `--train-data` / `--heldout-data` take image folders instead.

Example:
    $ dit-prune score checkpoints/digits-memorized --out runs/score-taylor --scorer taylor-gap
    $ dit-prune score checkpoints/digits-memorized --out runs/score-ye --scorer ye2025 \\
        --timesteps beta:0.8,2 --batches 8
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from dit_prune.checkpoint import load_dit
from dit_prune.commands.common import (
    DEVICE_HELP,
    check_scorer_timesteps,
    claim_out,
    dump_resolved_config,
    pick_device,
    staged_output,
)
from dit_prune.data import check_fits_model, digits_split, load_image_folder
from dit_prune.errors import DitPruneError
from dit_prune.keyvalue import parse_key_values
from dit_prune.sampling import seed_option
from dit_prune.scorers import (
    NORMALIZATIONS,
    SCORERS,
    CalibrationData,
    ScorerOptions,
    get_scorer,
    save_scores,
)
from dit_prune.units import UNIT_KINDS, adapter_for, enumerate_units


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("score", help="score heads and neurons by how much they memorize")
    p.add_argument("checkpoint", help="checkpoint directory (base or pruned)")
    p.add_argument("--out", required=True, help="run directory to write the scores into")
    p.add_argument("--scorer", required=True, choices=sorted(SCORERS), metavar="NAME",
                   help="how units are scored: one of %(choices)s")
    p.add_argument("--kinds", default=None,
                   help="comma list of unit kinds (default: the scorer's kinds, e.g. head,neuron)")
    p.add_argument("--timesteps", default=None,
                   help="uniform | uniform:LOW,HIGH | beta:A,B | a list such as 10,50,100 "
                        "(default: the scorer's own)")
    shared = ScorerOptions()  # the library's defaults are the command's
    p.add_argument("--batches", type=int, default=shared.batches,
                   help="calibration batches (noise draws)")
    p.add_argument("--batch-size", type=int, default=shared.batch_size,
                   help="examples per forward pass")
    p.add_argument("--seed", type=seed_option, default=shared.seed,
                   help="seed of the scorer's random draws (images, noise, timesteps)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--max-images", type=int, default=None, help="cap images per split")
    p.add_argument("--normalize", default=shared.normalize, choices=NORMALIZATIONS,
                   help="how head and neuron scores are made comparable: robust-z (per kind, "
                        "median/MAD), zscore (per kind, mean/std), rank (per-kind percentile), "
                        "per-param (divided by the unit's parameter count) or none")
    p.add_argument("--quality-weight", type=float, default=shared.quality_weight,
                   help="penalty weight on units whose removal raises the held-out loss")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="scorer-specific option (JSON value), e.g. num_samples=200; repeatable "
                        "(the shared options have their own flags)")
    p.add_argument("--train-data", default=None, help="image folder instead of the digits subset")
    p.add_argument("--heldout-data", default=None, help="image folder instead of digits held-out")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out when it holds an earlier `dit-prune score` output: the "
                        "new scores replace all of it once complete (a directory holding "
                        "anything else is refused)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    specific = parse_options(args.option)
    scorer = get_scorer(
        args.scorer, timesteps=args.timesteps, batches=args.batches, batch_size=args.batch_size,
        seed=args.seed, device=str(pick_device(args.device)), max_images=args.max_images,
        normalize=args.normalize, quality_weight=args.quality_weight, **specific,
    )
    kinds = _kinds(args.kinds, scorer)
    run_dir = claim_out(args.out, "score", {"checkpoint": args.checkpoint,
                                            "--train-data": args.train_data,
                                            "--heldout-data": args.heldout_data}, args.overwrite)
    loaded = load_dit(args.checkpoint)
    check_scorer_timesteps(scorer, loaded.scheduler)
    if args.kinds is None:  # the scorer's kinds that this model's family has
        adapter = adapter_for(loaded.model)
        kinds = tuple(k for k in kinds if k in adapter.default_kinds)
        if not kinds:
            raise DitPruneError(f"scorer {scorer.name!r} scores {', '.join(scorer.kinds)} units; "
                                f"{adapter.family} has {', '.join(adapter.kinds)}")
    units = enumerate_units(loaded.model, kinds)
    data, data_meta = calibration_data(args, loaded.meta.extra, loaded.model)
    started = time.perf_counter()
    result = scorer.compute(loaded.model, units, data, loaded.scheduler)
    seconds = time.perf_counter() - started
    with staged_output(run_dir, "score") as staging:
        save_scores(staging, result.units, result.scores, scorer.config(), raw=result.raw,
                    extra={"checkpoint": str(args.checkpoint),
                           "weights_sha256": loaded.meta.weights_sha256,
                           "data": data_meta, "seconds": round(seconds, 2)},
                    model={"weights_sha256": loaded.meta.weights_sha256,
                           "checkpoint": str(args.checkpoint)})
        dump_resolved_config(staging, args, kinds=list(kinds), scorer_config=scorer.config(),
                             data=data_meta)
    top = torch.argsort(result.scores, descending=True)[:5].tolist()
    print(json.dumps({"units": len(units), "seconds": round(seconds, 1),
                      "top": [result.units[i].to_json() for i in top]}))
    print(f"saved {run_dir}")
    return 0


def parse_options(items: list[str]) -> dict[str, Any]:
    """['num_samples=200', 'reference=heldout'] -> {'num_samples': 200, 'reference': 'heldout'};
    a shared option (seed, batches, ...) has its own flag and is refused here."""
    options = parse_key_values(items, "--option")
    for key in options:
        if key in SHARED_FLAGS:
            raise DitPruneError(f"--option {key}=... repeats a shared option: use "
                                f"{SHARED_FLAGS[key]} instead")
    return options


SHARED_FLAGS = {name: "--" + name.replace("_", "-") for name in
                ("timesteps", "batches", "batch_size", "seed", "device", "max_images",
                 "normalize", "quality_weight")}
SHARED_FLAGS["progress"] = "nothing (progress is always shown)"


def _kinds(text: str | None, scorer: Any) -> tuple[str, ...]:
    if text is None:
        return tuple(k for k in scorer.kinds if k != "cross_head")
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in UNIT_KINDS]
    if not kinds or bad:
        raise DitPruneError(f"--kinds must be a comma list of {UNIT_KINDS}, got {text!r}")
    return kinds


def calibration_data(args: argparse.Namespace, meta: dict[str, Any],
                     model: Any = None) -> tuple[CalibrationData, dict[str, Any]]:
    """Training images from --train-data or the checkpoint's recorded digits subset; held-out
    images from --heldout-data or the digits held-out set. With `model`, a folder that does not
    fit it is refused in one line naming the folder."""
    split = digits_split() if args.train_data is None or args.heldout_data is None else None
    if args.train_data is not None:
        folder = load_image_folder(args.train_data)
        train_images, train_labels = folder.images, folder.labels
        if model is not None:
            check_fits_model(train_images, train_labels, model, f"image folder {args.train_data}")
        train_meta: dict[str, Any] = {"train": str(args.train_data)}
    else:
        indices = (meta.get("data") or {}).get("pool_indices")
        if not indices:
            raise DitPruneError(
                f"{args.checkpoint} records no digits training subset (dit_prune.json: "
                "data.pool_indices); pass --train-data FOLDER"
            )
        index = torch.as_tensor(indices, dtype=torch.long)  # (N,)
        if index.min() < 0 or index.max() >= len(split.pool_images):
            raise DitPruneError(f"{args.checkpoint}: recorded pool indices are out of range")
        train_images, train_labels = split.pool_images[index], split.pool_labels[index]
        train_meta = {"train": "digits pool", "num_train": len(index),
                      "indices_sha256": (meta.get("data") or {}).get("indices_sha256")}
    if args.heldout_data is not None:
        folder = load_image_folder(args.heldout_data)
        held_images, held_labels = folder.images, folder.labels
        if model is not None:
            check_fits_model(held_images, held_labels, model,
                             f"image folder {args.heldout_data}")
        train_meta["heldout"] = str(args.heldout_data)
    else:
        held_images, held_labels = split.heldout_images, split.heldout_labels
        train_meta["heldout"] = "digits held-out"
    data = CalibrationData(train_images, train_labels, held_images, held_labels)
    train_meta.update(num_train=data.num_train, num_heldout=data.num_heldout)
    return data, train_meta


__all__ = ["add_parser", "calibration_data", "parse_options", "run"]
