"""`dit-prune train --model text`: the embedded text-to-image DiT (digits with captions).

Every digit of the pool (or a class-balanced subset) gets the caption of its class ("a
handwritten digit seven"), except the images `--duplicate COUNTxCOPIES` picks: each of those gets
a caption of its own ("a red dog poster") and is present COPIES times, the memorized-prompt
case. The pipeline (`digits_text_pipeline`) is trained with its scheduler's loss and saved as a
diffusers pipeline directory, with `dit_prune.json` recording the data and the command.

Example:
    $ dit-prune train --model text --subset all --duplicate 10x50 --steps 10000 \\
        --out checkpoints/digits-text
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from dit_prune.checkpoint import atomic_directory
from dit_prune.commands.common import mark_finished
from dit_prune.errors import DitPruneError

TEXT_META = "dit_prune.json"
SIZE_OPTIONS = ("size", "patch_size", "probe_every")


def run_text(args: argparse.Namespace, defaults: dict, argv: list[str]) -> int:
    """Train and save the text-to-image digits pipeline (`args` from `dit-prune train`)."""
    from dit_prune.pipelines.digits_text import digits_text_pipeline
    from dit_prune.pipelines.io import save_pipeline
    from dit_prune.text_data import digits_text_rows
    from dit_prune.text_training import TextTrainConfig, train_text_pipeline

    changed = [k for k in SIZE_OPTIONS if getattr(args, k) != defaults[k]]
    if changed:
        raise DitPruneError(f"--model text has a fixed size; drop --{changed[0].replace('_', '-')}")
    if args.data != "digits":
        raise DitPruneError("--model text trains on the embedded digits only (--data digits); "
                            "caption folders are for `dit-prune run`")
    config = TextTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             caption_dropout=args.label_dropout, ema_decay=args.ema_decay,
                             seed=args.seed)
    data = {"source": "digits", "subset": args.subset, "subset_seed": args.subset_seed,
            "duplicate": args.duplicate, "duplicate_seed": args.duplicate_seed}
    rows, record = digits_text_rows(data)
    out = Path(args.out)
    state_dir = out.with_name(out.name + ".train-state")
    if (state_dir / "state.json").is_file():
        print(f"resuming from {state_dir}")
    pipe = digits_text_pipeline(seed=args.seed)
    result = train_text_pipeline(pipe, rows, config, state_dir=state_dir,
                                 checkpoint_every=args.checkpoint_every)
    extra = {
        "kind": "text-to-image",
        "training": result.config,
        "data": {**data, **record},
        "final_loss_mean_last_100": float(np.mean(result.losses[-100:])),
        "train_seconds": round(result.seconds, 1),
        "command": "dit-prune train " + " ".join(argv),
    }
    with atomic_directory(out, args.overwrite) as tmp:
        save_pipeline(result.pipeline, tmp / "pipeline")
        for item in (tmp / "pipeline").iterdir():
            item.rename(tmp / item.name)
        (tmp / "pipeline").rmdir()
        (tmp / TEXT_META).write_text(json.dumps(extra, indent=2))
        mark_finished(tmp, "train")  # what a later `train --overwrite` may replace
    shutil.rmtree(state_dir, ignore_errors=True)
    print(json.dumps({k: extra[k] for k in ("final_loss_mean_last_100", "train_seconds")}))
    print(f"saved {out}")
    return 0
