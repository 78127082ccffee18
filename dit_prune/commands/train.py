"""`dit-prune train`: train a DiT on the embedded digits (or an image folder).

Example:
    $ dit-prune train --subset 64 --steps 12000 --out checkpoints/digits-memorized
    $ dit-prune train --subset all --steps 12000 --out checkpoints/digits-generalized
    $ dit-prune train --subset all --duplicate 10x50 --steps 10000 --out runs/dup
    $ dit-prune train --model features --out checkpoints/digits-features
    $ dit-prune train --model copydetect --out checkpoints/digits-copydetect
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from dit_prune.checkpoint import save_checkpoint
from dit_prune.commands.common import SUBSET_DEFAULT, check_train_args, mark_finished
from dit_prune.data import balanced_subset, digits_split, indices_hash, load_image_folder
from dit_prune.duplication import DuplicationSpec, expand_with_duplicates
from dit_prune.errors import DitPruneError
from dit_prune.models import DIT_SIZES
from dit_prune.sampling import seed_option
from dit_prune.training import TrainConfig, train_dit

SMALL_NETS_AND_DIT = ("dit", "features", "copydetect", "text")
DIT_ONLY_OPTIONS = ("data", "subset", "subset_seed", "size", "steps", "batch_size", "lr",
                    "label_dropout", "ema_decay", "probe_every", "patch_size", "duplicate",
                    "duplicate_seed", "checkpoint_every")
STATE_SUFFIX = ".train-state"
# the TrainConfig fields that are options of `dit-prune train` -> their help (defaults from
# TrainConfig)
TRAIN_OPTION_HELP = {
    "size": "DiT size: one of %(choices)s",
    "steps": "training steps",
    "batch_size": "images per training step",
    "lr": "AdamW learning rate",
    "label_dropout": "fraction of labels replaced by the null class (for classifier-free "
                     "guidance), in [0, 1)",
    "ema_decay": "decay of the weights' exponential moving average (the saved model), in [0, 1)",
    "seed": "seed of initialization, batches and noise (features / copydetect: their training)",
    "probe_every": "measure memorization every N steps (0: never)",
    "patch_size": "DiT patch size in pixels",
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a class-conditional DiT (digits by default)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--model", choices=SMALL_NETS_AND_DIT, default="dit",
                   help="dit (default), or one of the digits evaluation nets: features "
                        "(digits-features classifier) or copydetect (copy-detection embedding); "
                        "those use only --seed, --out and --overwrite; or text: the text-to-image "
                        "digits pipeline (--duplicate images get captions of their own)")
    p.add_argument("--data", default="digits",
                   help="'digits' (embedded) or an image folder (one subfolder per class)")
    p.add_argument("--subset", default=SUBSET_DEFAULT,
                   help="class-balanced subset size of the digits pool, or 'all'")
    p.add_argument("--subset-seed", type=seed_option, default=0,
                   help="seed choosing the --subset images from the digits pool")
    p.add_argument("--duplicate", default=None, metavar="COUNTxCOPIES",
                   help="repeat some training images: '10x50' = 10 class-balanced images (chosen "
                        "by --duplicate-seed) present 50 times each; '3,17x50' names positions in "
                        "the training set. Recorded in the checkpoint's dit_prune.json")
    p.add_argument("--duplicate-seed", type=seed_option, default=0,
                   help="seed choosing which images --duplicate COUNTxCOPIES repeats")
    p.add_argument("--checkpoint-every", type=int, default=1000,
                   help="save the resumable training state to OUT.train-state every N steps "
                        "(0: only at the end); running the same command again resumes from it")
    defaults = TrainConfig()
    for name, text in TRAIN_OPTION_HELP.items():
        value = getattr(defaults, name)
        kind = seed_option if name == "seed" else type(value)
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value, help=text,
                       **({"choices": sorted(DIT_SIZES)} if name == "size" else {}))
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_train_args(args)  # options and --out, before work
    if args.duplicate is not None and getattr(args, "model", "dit") in ("dit", "text"):
        subset = int(args.subset) if str(args.subset).isdigit() else None
        parse_duplicate(args.duplicate, args.duplicate_seed,
                        subset if args.data == "digits" else None)
    if getattr(args, "model", "dit") == "text":
        from dit_prune.commands.train_text import run_text

        return run_text(args, _defaults(), _argv(args))
    if getattr(args, "model", "dit") != "dit":
        return _run_small_net(args)
    config = TrainConfig(
        size=args.size, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        label_dropout=args.label_dropout, ema_decay=args.ema_decay, seed=args.seed,
        probe_every=args.probe_every, patch_size=args.patch_size,
    )
    if args.checkpoint_every < 0:
        raise DitPruneError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    images, labels, num_classes, data_meta = _training_data(args)
    if args.duplicate is not None:
        images, labels, data_meta["duplicated"] = _duplicate(args, images, labels, data_meta)
    state_dir = out.with_name(out.name + STATE_SUFFIX)
    if (state_dir / "state.json").is_file():
        print(f"resuming from {state_dir}")
    result = train_dit(images, labels, config, num_classes=num_classes, state_dir=state_dir,
                       checkpoint_every=args.checkpoint_every)
    extra = {
        "training": result.config,
        "data": data_meta,
        "final_loss_mean_last_100": float(np.mean(result.losses[-100:])),
        "train_seconds": round(result.seconds, 1),
        "probes": result.probes,
        "command": "dit-prune train " + " ".join(_argv(args)),
    }
    save_checkpoint(result.model, result.scheduler, out, extra=extra, overwrite=args.overwrite)
    mark_finished(out, "train")  # what a later `train --overwrite` may replace
    shutil.rmtree(state_dir, ignore_errors=True)
    print(json.dumps({k: extra[k] for k in ("final_loss_mean_last_100", "train_seconds")}))
    print(f"saved {out}")
    return 0


def _run_small_net(args: argparse.Namespace) -> int:
    """Train digits-features or digits-copydetect (the evaluator's nets) on the digits pool."""
    from dit_prune.metrics.small_nets import train_copydetect_checkpoint, train_features_checkpoint

    defaults = _defaults()
    changed = [k for k in DIT_ONLY_OPTIONS if getattr(args, k) != defaults[k]]
    if changed:
        raise DitPruneError(f"--model {args.model} takes only --seed, --out and --overwrite; "
                            f"drop --{changed[0].replace('_', '-')}")
    train = train_features_checkpoint if args.model == "features" else train_copydetect_checkpoint
    extra = train(args.out, seed=args.seed, overwrite=args.overwrite)
    mark_finished(Path(args.out), "train")
    print(json.dumps({"metrics": extra["metrics"], "train_seconds":
                      extra["training"]["train_seconds"]}, indent=2))
    print(f"saved {args.out}")
    return 0


def _defaults() -> dict:
    """Every option's default value (to tell which options a command line changed)."""
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return vars(parser.parse_args(["train", "--out", "x"]))


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


def parse_duplicate(text: str, seed: int, train_size: int | None = None,
                    num_classes: int | None = None) -> DuplicationSpec:
    """`--duplicate` parsed, with one-line errors naming it: a repeated index, an index outside
    the `train_size` training images, or a count that a class-balanced choice among them cannot
    make (at least one per class, at most all of them); None skips a bound.

    Example:
        >>> parse_duplicate("3,3x5", 0)
        Traceback (most recent call last):
        ...
        dit_prune.errors.DitPruneError: --duplicate 3,3x5 repeats the index 3: name each \
training image once
        >>> parse_duplicate("100x2", 0, train_size=64)
        Traceback (most recent call last):
        ...
        dit_prune.errors.DitPruneError: --duplicate 100x2 asks for 100 images to duplicate, but \
the training set (--subset) holds 64
    """
    head = str(text).strip().rpartition("x")[0]
    if "," in head or head.startswith("["):
        seen: set[int] = set()
        for word in head.strip("[]").split(","):
            if word.strip().isdigit():
                if int(word) in seen:
                    raise DitPruneError(f"--duplicate {text} repeats the index {int(word)}: "
                                        "name each training image once")
                seen.add(int(word))
    spec = DuplicationSpec.parse(text, seed=seed)
    if train_size is None:
        return spec
    if spec.indices is not None and max(spec.indices) >= train_size:
        raise DitPruneError(f"--duplicate {text}: index {max(spec.indices)} lies outside the "
                            f"{train_size} training images (--subset; indices are positions "
                            f"0..{train_size - 1} in it)")
    if spec.indices is None and spec.count > train_size:
        raise DitPruneError(f"--duplicate {text} asks for {spec.count} images to duplicate, but "
                            f"the training set (--subset) holds {train_size}")
    if spec.indices is None and num_classes is not None and spec.count < num_classes:
        raise DitPruneError(f"--duplicate {text} asks for {spec.count} images, but a "
                            f"class-balanced choice needs at least one of each of the "
                            f"{num_classes} classes")
    return spec


def _duplicate(args: argparse.Namespace, images: torch.Tensor, labels: torch.Tensor,
               data_meta: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The training multiset with the duplicated images repeated, and what to record of it."""
    spec = parse_duplicate(args.duplicate, args.duplicate_seed, len(labels),
                           len(torch.unique(labels)))
    positions = spec.choose(labels)  # positions in the (unique) training set
    record = {"spec": spec.to_json(), "copies": spec.copies,
              "train_positions": positions.tolist(),
              "num_images_with_copies": len(images) + len(positions) * (spec.copies - 1)}
    if "pool_indices" in data_meta:
        record["pool_indices"] = [data_meta["pool_indices"][i] for i in positions]
    return (expand_with_duplicates(images, positions, spec.copies),
            expand_with_duplicates(labels, positions, spec.copies), record)


def _argv(args: argparse.Namespace) -> list[str]:
    skip = {"func", "command", "overwrite"}
    return [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in skip]
