"""`dit-prune index`: build a reference store (images, optionally copy-detection embeddings).

The store holds the images in [-1, 1] as safetensors shards of `--shard-size` images, plus,
with `--copy-detector`, their embeddings keyed by the detector's weights fingerprint, and a
manifest keyed by the images' content hash (see dit_prune/store/format.py). Finished shards
are kept when the command is interrupted or fails: the same command resumes, and running it
again with another `--copy-detector` adds that detector's embeddings to a finished store. The
options and inputs (image sizes included) are checked before --out is written; a command that
fails before its first shard removes the --out it created. A finished store's `.dit_prune_run`
marker lists the files the command wrote, so `--overwrite` refuses a store folder that holds
anything else (files put beside a store that is then resumed are recorded as not its own).
Under `accelerate launch --num_processes N` every process writes and embeds every N-th shard
(dit_prune/store/distributed.py); the store is the same as one process writes, and the processes
meet at a last barrier and close their process group when the command ends (on an error too).

Example:
    $ dit-prune index --images digits-pool --out runs/pool-store \\
        --copy-detector checkpoints/digits-copydetect --shard-size 256
    $ dit-prune index --images /data/train --out /data/train-store --shard-size 4096
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from dit_prune.checkpoint import atomic_write_with
from dit_prune.commands.common import (
    MARKER_NAME,
    check_out_path,
    check_positive,
    claim_out,
    dump_resolved_config,
    foreign_entries,
    mark_finished,
    mark_started,
    missing_root,
    pick_device,
    undone_on_failure,
)
from dit_prune.errors import DitPruneError
from dit_prune.store.build import build_store
from dit_prune.store.distributed import Processes, command_processes
from dit_prune.store.sources import DIGITS_SOURCES, FolderSource, open_source

DEFAULT_SHARD_SIZE = 4096


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("index", help="build an on-disk reference store for the evaluator")
    p.add_argument("--images", required=True,
                   help=f"images to index: {' or '.join(DIGITS_SOURCES)}, or an image folder "
                        "(one subfolder per class, or flat)")
    p.add_argument("--out", required=True, help="store directory to write (or resume)")
    p.add_argument("--copy-detector", default=None,
                   help="also store embeddings of this copy detector (a digits-copydetect "
                        "directory or a TorchScript SSCD file)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help="images per shard (a multiple of 256 embeds in the same batches as "
                        "the in-memory evaluator)")
    p.add_argument("--device", default="auto", help="device for the copy detector")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier dit-prune index output instead of resuming it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Builds (or resumes) the store; under a launcher of N processes every process meets at a
    last barrier and closes the process group, also when the command fails
    (`distributed.command_processes`)."""
    check_positive(args.shard_size, "--shard-size")
    with command_processes() as processes:
        return _index(args, processes)


def _index(args: argparse.Namespace, processes: Processes) -> int:
    inputs = {"--images": None if args.images in DIGITS_SOURCES else args.images,
              "--copy-detector": args.copy_detector}
    created = missing_root(Path(args.out)) if processes.is_main else None
    foreign: tuple[str, ...] = ()  # files someone else put beside a store being resumed
    if processes.is_main:  # the others wait for it below (it may empty --out first)
        out = claim_out(args.out, "index", inputs, args.overwrite, resume=True)
        foreign = foreign_entries(out)
    else:
        out = check_out_path(args.out, inputs)
    was_empty = processes.is_main and out.is_dir() and not any(out.iterdir())
    device = pick_device(args.device)
    source = open_source(args.images)
    if isinstance(source, FolderSource):
        _check_sizes(source)
    detector = None
    if args.copy_detector is not None:
        from dit_prune.metrics.copydetect import load_copy_detector

        detector = load_copy_detector(args.copy_detector, device)
        if detector.input_shape is not None and detector.input_shape != source.shape:
            raise DitPruneError(f"copy detector {detector.name} takes {detector.input_shape} "
                                f"images, but --images {args.images} holds {source.shape}")
    marker = out / MARKER_NAME
    finished = marker.read_bytes() if processes.is_main and marker.is_file() else None
    with undone_on_failure(out, created, was_empty):  # nothing written to --out before this point
        try:
            if processes.is_main:
                if args.overwrite and out.is_dir():
                    shutil.rmtree(out)
                    finished = None  # replaced on purpose: nothing to give back
                out.mkdir(parents=True, exist_ok=True)
                mark_started(out, "index", foreign)
            processes.barrier()
            store = build_store(source, out, args.shard_size, detector,
                                progress=not args.no_progress, processes=processes)
        except BaseException:
            if finished is not None and out.is_dir():  # a refused rebuild keeps the old marker:
                old = finished  # its file list is what guards a later --overwrite
                atomic_write_with(marker, lambda tmp: tmp.write_bytes(old))
            raise
    if not processes.is_main:
        return 0
    dump_resolved_config(out, args, device=str(device), count=len(store),
                         content_hash=store.content_hash)
    mark_finished(out, "index", foreign)  # lists what it wrote: what --overwrite may replace
    print(json.dumps({"store": str(out), "images": len(store), "shape": list(store.shape),
                      "shards": store.num_shards, "content_hash": store.content_hash,
                      "embeddings": store.embedding_fingerprints()}))
    return 0


def _check_sizes(source: FolderSource) -> None:
    """Every image of the folder has the first one's size, read from the file headers (no
    pixels are decoded), so a stray size fails before --out is written rather than at its shard
    (the pixel mode is still checked as each shard is read)."""
    from PIL import Image, UnidentifiedImageError

    first = None
    for file in source.files:
        try:
            with Image.open(file) as img:
                size = img.size
        except (UnidentifiedImageError, OSError) as exc:
            raise DitPruneError(f"unreadable image {file}: {exc}") from None
        if first is None:
            first = (file, size)
        elif size != first[1]:
            raise DitPruneError(f"image {file} is {size[0]}x{size[1]}, but {first[0]} is "
                                f"{first[1][0]}x{first[1][1]}: all images must share one size")
