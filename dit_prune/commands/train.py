"""`dit-prune train`: train a DiT on the embedded digits (or an image folder).

Example:
    $ dit-prune train --subset 64 --steps 12000 --out checkpoints/digits-memorized
    $ dit-prune train --subset all --steps 12000 --out checkpoints/digits-generalized
    $ dit-prune train --model features --out checkpoints/digits-features
    $ dit-prune train --model copydetect --out checkpoints/digits-copydetect
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from dit_prune.checkpoint import save_checkpoint
from dit_prune.data import balanced_subset, digits_split, indices_hash, load_image_folder
from dit_prune.errors import DitPruneError
from dit_prune.training import TrainConfig, train_dit

SMALL_NETS_AND_DIT = ("dit", "features", "copydetect")
DIT_ONLY_OPTIONS = ("data", "subset", "subset_seed", "size", "steps", "batch_size", "lr",
                    "label_dropout", "ema_decay", "probe_every", "patch_size")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a class-conditional DiT (digits by default)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--model", choices=SMALL_NETS_AND_DIT, default="dit",
                   help="dit (default), or one of the digits evaluation nets: features "
                        "(digits-features classifier) or copydetect (copy-detection embedding); "
                        "those use only --seed, --out and --overwrite")
    p.add_argument("--data", default="digits",
                   help="'digits' (embedded) or an image folder (one subfolder per class)")
    p.add_argument("--subset", default="64",
                   help="class-balanced subset size of the digits pool, or 'all'")
    p.add_argument("--subset-seed", type=int, default=0)
    defaults = TrainConfig()
    for name in ("size", "steps", "batch_size", "lr", "label_dropout", "ema_decay", "seed",
                 "probe_every", "patch_size"):
        value = getattr(defaults, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise DitPruneError(f"output {out} exists and is not empty (pass --overwrite to replace)")
    if getattr(args, "model", "dit") != "dit":
        return _run_small_net(args)
    config = TrainConfig(
        size=args.size, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        label_dropout=args.label_dropout, ema_decay=args.ema_decay, seed=args.seed,
        probe_every=args.probe_every, patch_size=args.patch_size,
    )
    images, labels, num_classes, data_meta = _training_data(args)
    result = train_dit(images, labels, config, num_classes=num_classes)
    extra = {
        "training": result.config,
        "data": data_meta,
        "final_loss_mean_last_100": float(np.mean(result.losses[-100:])),
        "train_seconds": round(result.seconds, 1),
        "probes": result.probes,
        "command": "dit-prune train " + " ".join(_argv(args)),
    }
    save_checkpoint(result.model, result.scheduler, out, extra=extra, overwrite=args.overwrite)
    print(json.dumps({k: extra[k] for k in ("final_loss_mean_last_100", "train_seconds")}))
    print(f"saved {out}")
    return 0


def _run_small_net(args: argparse.Namespace) -> int:
    """Train digits-features or digits-copydetect (the evaluator's nets) on the digits pool."""
    from dit_prune.metrics.small_nets import train_copydetect_checkpoint, train_features_checkpoint

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    defaults = vars(parser.parse_args(["train", "--out", "x"]))
    changed = [k for k in DIT_ONLY_OPTIONS if getattr(args, k) != defaults[k]]
    if changed:
        raise DitPruneError(f"--model {args.model} takes only --seed, --out and --overwrite; "
                            f"drop --{changed[0].replace('_', '-')}")
    train = train_features_checkpoint if args.model == "features" else train_copydetect_checkpoint
    extra = train(args.out, seed=args.seed, overwrite=args.overwrite)
    print(json.dumps({"metrics": extra["metrics"], "train_seconds":
                      extra["training"]["train_seconds"]}, indent=2))
    print(f"saved {args.out}")
    return 0


def _training_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, int, dict]:
    if args.data == "digits":
        split = digits_split()
        if args.subset == "all":
            idx = np.arange(len(split.pool_labels))
        else:
            try:
                size = int(args.subset)
            except ValueError:
                raise DitPruneError(
                    f"--subset must be an integer or 'all', got {args.subset}") from None
            idx = balanced_subset(split.pool_labels, size, args.subset_seed)
        meta = {"source": "digits", "pool_indices": idx.tolist(), "subset_seed": args.subset_seed,
                "indices_sha256": indices_hash(idx), "num_images": len(idx)}
        return split.pool_images[idx], split.pool_labels[idx], 10, meta
    folder = load_image_folder(args.data)
    if folder.labels is None:
        raise DitPruneError(f"{args.data}: training needs one subfolder per class")
    meta = {"source": str(args.data), "class_names": list(folder.class_names),
            "num_images": len(folder.images)}
    return folder.images, folder.labels, len(folder.class_names), meta


def _argv(args: argparse.Namespace) -> list[str]:
    skip = {"func", "command", "overwrite"}
    return [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in skip]
