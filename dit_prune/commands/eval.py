"""`dit-prune eval`: sample a checkpoint on fixed seeds and measure memorization and quality.

Writes into the run directory: metrics.json, report.md, nearest.png (each sample beside its
nearest training image), ratios.png, per_sample.npz and config.resolved.json.
Under `torchrun --nproc_per_node N` (CPUs) or `accelerate launch --num_processes N` (GPUs) the
sampling batches, and with --train-store the store searches, are split across the processes;
the outputs are those of one process.

Example:
    $ dit-prune eval checkpoints/digits-memorized --out runs/eval-memorized
    $ dit-prune eval checkpoints/digits-generalized --out runs/eval-generalized --seeds 0-199
"""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dit_prune.checkpoint import atomic_write_text, atomic_write_with, load_dit
from dit_prune.commands.common import (
    DEVICE_HELP,
    GUIDANCE_HELP,
    check_cache_dir,
    check_positive,
    check_sampling_steps,
    check_written_outside_inputs,
    claim_out,
    dump_resolved_config,
    pick_device,
    staged_output,
)
from dit_prune.data import digits_split, load_image_folder
from dit_prune.errors import DitPruneError
from dit_prune.evaluate import (
    COPYDETECT_DIR,
    FEATURES_DIR,
    EvalContext,
    Evaluation,
    build_context,
    default_checkpoints_dir,
    evaluate_samples,
    evaluation_net_inputs,
)
from dit_prune.metrics.copydetect import calibration_warning, load_copy_detector
from dit_prune.metrics.features import load_feature_extractor
from dit_prune.pipelines.io import is_pixel_space
from dit_prune.plots import nearest_pairs_grid, ratio_histogram_plot
from dit_prune.sampling import (
    SAMPLERS,
    check_guidance_scale,
    format_seeds,
    labels_for_seeds,
    parse_seeds,
    sample_images,
    seed_option,
)
from dit_prune.scorers.calibration import refuse_heldout_duplicates
from dit_prune.store.distributed import (
    Processes,
    command_processes,
    release_others,
    split_batches,
)
from dit_prune.store.format import open_store

TRAIN_FROM_CHECKPOINT = "digits-from-checkpoint"
TRAIN_POOL = "digits-pool"
HELDOUT_DIGITS = "digits-heldout"
SAVED_SAMPLES_MAX_VALUES = 1 << 26  # per_sample.npz keeps the samples up to 64 MiB of uint8


def default_stats_cache() -> Path:
    """$XDG_CACHE_HOME/dit_prune/fd-stats (~/.cache/... when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dit_prune" / "fd-stats"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="sample a checkpoint and measure memorization + FD")
    p.add_argument("checkpoint", help="DiT checkpoint directory")
    p.add_argument("--out", required=True, help="run directory to write into")
    p.add_argument("--seeds", default=None,
                   help="seeds, e.g. '0-999' (default: 0 .. per-class x classes - 1)")
    p.add_argument("--per-class", type=int, default=None,
                   help="samples per class (default 100; seed s samples class s mod classes)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--guidance-scale", type=float, default=1.0, help=GUIDANCE_HELP)
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim",
                   help="ddim (deterministic) or ddpm")
    p.add_argument("--batch-size", type=int, default=128, help="sampling batch size")
    p.add_argument("--train", default=TRAIN_FROM_CHECKPOINT,
                   help=f"training images: {TRAIN_FROM_CHECKPOINT} (the pool indices recorded in "
                        f"the checkpoint), {TRAIN_POOL}, or an image folder")
    p.add_argument("--train-store", default=None,
                   help="a reference store of the same training images (dit-prune index --images "
                        "... --copy-detector ...): the ratio test and the copy rate search it "
                        "instead of memory (same numbers; the training set is not re-embedded)")
    p.add_argument("--heldout", default=HELDOUT_DIGITS,
                   help=f"held-out real images: {HELDOUT_DIGITS} or an image folder")
    p.add_argument("--features", default=None,
                   help="feature network: a digits-features directory (default "
                        "checkpoints/digits-features) or a TorchScript file such as "
                        "inception-2015-12-05.pt")
    p.add_argument("--copy-detector", default=None,
                   help="copy detector: a digits-copydetect directory (default "
                        "checkpoints/digits-copydetect) or a TorchScript SSCD file")
    p.add_argument("--stats-cache", default=None,
                   help="directory caching held-out feature statistics ('none' disables; "
                        "default $XDG_CACHE_HOME/dit_prune/fd-stats)")
    p.add_argument("--grid-pairs", type=int, default=48, help="pairs shown in nearest.png")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--seed", type=seed_option, default=0, help="seed of the bootstrap resampling")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out when it holds an earlier `dit-prune eval` output: the "
                        "new output replaces all of it once complete (a directory holding "
                        "anything else is refused)")
    p.set_defaults(func=run)


def resolve_seeds_and_labels(seeds_text: str | None, per_class: int | None,
                             num_classes: int) -> tuple[list[int], torch.Tensor]:
    """Seeds and their labels (seed s gets class s mod num_classes, `labels_for_seeds`, as in
    `dit-prune run`); the seeds must cover every class equally often.

    Example:
        >>> seeds, labels = resolve_seeds_and_labels(None, 2, 3)
        >>> seeds, labels.tolist()
        ([0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 2])
    """
    if num_classes < 1:
        raise DitPruneError("dit-prune eval needs a class-conditional DiT (no classes found)")
    if per_class is not None and per_class < 1:
        raise DitPruneError(f"--per-class must be positive, got {per_class}")
    if seeds_text is None:
        seeds = list(range((per_class or 100) * num_classes))
    else:
        seeds = parse_seeds(seeds_text, "--seeds")
        if per_class is not None and len(seeds) != per_class * num_classes:
            raise DitPruneError(f"--seeds gives {len(seeds)} seeds but --per-class {per_class} x "
                                f"{num_classes} classes needs {per_class * num_classes}")
    if len(seeds) < 2:
        raise DitPruneError(f"--seeds {seeds_text!r} gives one sample; FD and the intervals need "
                            "at least 2 (e.g. --seeds 0-99)")
    labels = labels_for_seeds(seeds, num_classes)  # (N,)
    if len(set(torch.bincount(labels, minlength=num_classes).tolist())) != 1:
        raise DitPruneError(f"--seeds gives {len(seeds)} seeds that cannot be split evenly over "
                            f"{num_classes} classes (seed s samples class s mod {num_classes}): "
                            "use a multiple of the class count of consecutive seeds")
    return seeds, labels


def _train_images(spec: str, meta_extra: dict[str, Any]) -> tuple[torch.Tensor, str]:
    if spec in (TRAIN_FROM_CHECKPOINT, TRAIN_POOL):
        split = digits_split()
        if spec == TRAIN_POOL:
            return split.pool_images, "digits pool (1000)"
        data = meta_extra.get("data", {}) if isinstance(meta_extra, dict) else {}
        indices = data.get("pool_indices") if data.get("source", "digits") == "digits" else None
        if not indices:
            raise DitPruneError("the checkpoint records no digits training indices "
                                "(meta data.pool_indices): pass --train FOLDER or --train "
                                f"{TRAIN_POOL}")
        idx = np.asarray(indices, dtype=np.int64)
        if idx.min() < 0 or idx.max() >= len(split.pool_images):
            raise DitPruneError("the checkpoint's pool indices lie outside the digits pool")
        return split.pool_images[idx], f"digits pool indices from the checkpoint ({len(idx)})"
    return load_image_folder(spec).images, f"image folder {spec}"


def _duplicated_positions(spec: str, meta_extra: dict[str, Any], num_train: int) -> list[int]:
    """The training positions of the duplicated images (`dit-prune train --duplicate`), when the
    evaluation uses the checkpoint's own training images; else none."""
    data = meta_extra.get("data", {}) if isinstance(meta_extra, dict) else {}
    duplicated = data.get("duplicated") if spec == TRAIN_FROM_CHECKPOINT else None
    if not isinstance(duplicated, dict):
        return []
    positions = [int(i) for i in duplicated.get("train_positions", [])]
    if positions and (min(positions) < 0 or max(positions) >= num_train):
        raise DitPruneError("the checkpoint's duplicated training positions are out of range")
    return positions


def _heldout_images(spec: str) -> tuple[torch.Tensor, str]:
    if spec == HELDOUT_DIGITS:
        return digits_split().heldout_images, "digits held-out (797)"
    return load_image_folder(spec).images, f"image folder {spec}"


def _folder_input(spec: str, named: tuple[str, ...]) -> str | None:
    """An image-folder option's path (None for the embedded data sets it may name)."""
    return None if spec in named else spec


def validate(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """Check every option before any work: (resolved --out, stats cache or None)."""
    check_positive(args.steps, "--steps")
    check_positive(args.batch_size, "--batch-size")
    check_positive(args.grid_pairs, "--grid-pairs")
    check_guidance_scale(args.guidance_scale, minimum=1.0, name="--guidance-scale")  # as run
    cache = check_cache_dir(args.stats_cache or str(default_stats_cache()), "--stats-cache")
    pick_device(args.device)
    inputs = {"checkpoint": args.checkpoint,
              "--train": _folder_input(args.train, (TRAIN_FROM_CHECKPOINT, TRAIN_POOL)),
              "--heldout": _folder_input(args.heldout, (HELDOUT_DIGITS,)),
              **evaluation_net_inputs(args.features, args.copy_detector),
              "--stats-cache": cache, "--train-store": args.train_store}
    check_written_outside_inputs(cache, "--stats-cache", inputs)
    return claim_out(args.out, "eval", inputs, args.overwrite), cache


def run(args: argparse.Namespace) -> int:
    """Sample, evaluate, write. Under a launcher of N processes (`torchrun`, `accelerate
    launch`) each process draws every N-th sampling batch and all get every sample
    (`split_batches`); with --train-store all of them split the store searches, else the main
    process evaluates alone; the main process writes --out. The numbers are one process's."""
    run_dir, cache = validate(args)
    with command_processes() as processes:
        return _evaluate(args, run_dir, cache, processes)


def _evaluate(args: argparse.Namespace, run_dir: Path, cache: Path | None,
              processes: Processes) -> int:
    store = open_store(args.train_store) if args.train_store else None
    device = pick_device(args.device)
    model, scheduler, meta = load_dit(args.checkpoint, device)
    if meta.pipeline_dir is not None and not meta.num_classes:
        raise DitPruneError("eval samples class-conditional DiTs; text-to-image pipelines are "
                            "not supported by eval: use `dit-prune run`")
    if meta.pipeline_dir is not None and not is_pixel_space(meta.pipeline_dir):  # IdentityVAE
        raise DitPruneError("eval samples pixel-space DiTs; latent pipelines (with a VAE) are not "
                            "supported yet")
    check_sampling_steps(args.steps, scheduler)
    seeds, labels = resolve_seeds_and_labels(args.seeds, args.per_class, meta.num_classes)
    train, train_desc = _train_images(args.train, meta.extra)
    heldout, heldout_desc = _heldout_images(args.heldout)
    model_shape = (meta.channels, meta.image_size, meta.image_size)
    if tuple(train.shape[1:]) != model_shape:
        raise DitPruneError(f"training images are {tuple(train.shape[1:])} but the model makes "
                            f"{model_shape} images")
    refuse_heldout_duplicates(train, heldout)  # a training image among them would set τ to ~1
    checkpoints = default_checkpoints_dir()
    features = load_feature_extractor(args.features or checkpoints / FEATURES_DIR, device)
    detector = load_copy_detector(args.copy_detector or checkpoints / COPYDETECT_DIR, device)
    classifier = "features" if getattr(features, "num_classes", None) == meta.num_classes else None
    duplicated = _duplicated_positions(args.train, meta.extra, len(train))
    context = build_context(train, heldout, features, detector, classifier, cache, device,
                            progress=processes.is_main,
                            subsets={"duplicated": duplicated} if duplicated else None,
                            train_store=store)
    bar = tqdm(total=len(seeds), desc=f"sampling ({args.sampler}, {args.steps} steps)",
               disable=not processes.is_main)

    def draw(start: int, stop: int) -> torch.Tensor:
        images = sample_images(model, scheduler, labels[start:stop], seeds[start:stop],
                               steps=args.steps, guidance_scale=args.guidance_scale,
                               sampler=args.sampler, batch_size=args.batch_size,
                               progress=False)  # (B, C, H, W) in [0, 1]
        bar.update((stop - start) * processes.count)
        return images

    samples = split_batches(draw, len(seeds), args.batch_size, processes)  # (N, C, H, W)
    bar.close()
    if store is None and not release_others(processes):
        return 0  # in-memory searches: the main process evaluates alone, the others leave
    result = evaluate_samples(samples, labels, context, seed=args.seed,
                              progress=processes.is_main)
    if not processes.is_main:
        return 0
    described = {**context.describe(), "train_images": train_desc, "heldout_images": heldout_desc}
    with staged_output(run_dir, "eval") as staging:
        write_outputs(staging, args, samples, context, result, described, seeds, meta.to_dict())
    print(json.dumps(result.metrics, indent=2))
    print(f"wrote {run_dir}/metrics.json, report.md, nearest.png")
    return 0


def write_outputs(run_dir: Path, args: argparse.Namespace, samples: torch.Tensor,
                  context: EvalContext, result: Evaluation, described: dict[str, Any],
                  seeds: list[int], meta: dict[str, Any]) -> None:
    """All run-directory files, each written atomically; metrics.json last."""
    name = Path(args.checkpoint).name
    nearest_pairs_grid(samples, context.train_images.cpu(), result.memorization.nearest,
                       result.memorization.ratios, run_dir / "nearest.png",
                       copies=result.copy.copies, max_pairs=args.grid_pairs,
                       title=f"{name}: generated | nearest training image (d1/d2; M memorized, "
                             "C copy)")
    ratio_histogram_plot(result.memorization.ratios, run_dir / "ratios.png", title=name)

    def save_arrays(tmp: Path) -> None:
        buffer = io.BytesIO()
        images = {}
        if samples.numel() <= SAVED_SAMPLES_MAX_VALUES:  # small images: keep them, as uint8
            images["samples_uint8"] = (samples * 255).round().to(torch.uint8).numpy()
        np.savez_compressed(buffer, seeds=np.asarray(seeds), **result.arrays, **images)
        tmp.write_bytes(buffer.getvalue())

    atomic_write_with(run_dir / "per_sample.npz", save_arrays)
    document = {
        **result.metrics,
        **described,
        "checkpoint": str(args.checkpoint),
        "seeds": format_seeds(seeds),
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "sampler": args.sampler,
        "most_replicated": result.memorization.most_replicated(),
        "most_copied": result.copy.most_copied(),
        "warnings": _warnings(result.warnings, len(context.heldout_images)),
    }
    atomic_write_text(run_dir / "report.md", render_report(document))
    dump_resolved_config(run_dir, args, seeds_resolved=format_seeds(seeds), model=meta,
                         evaluator=described)
    atomic_write_text(run_dir / "metrics.json", json.dumps(document, indent=2) + "\n")


def _warnings(measured: list[str], num_heldout: int) -> list[str]:
    """The evaluation's warnings, then tau's calibration on too few held-out images; each once."""
    note = calibration_warning(num_heldout)
    return list(dict.fromkeys([*measured, *([note] if note else [])]))


def _fmt(value: Any, interval: Any = None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.{digits}f}"
    if interval:
        text += f" [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
    return text


def _subset_rows(doc: dict[str, Any]) -> list[str]:
    rows = []
    for name, sub in doc.get("subsets", {}).items():
        rows += [f"| copy rate, {name} images only ({sub['distinct_copied']} of "
                 f"{sub['subset_size']} copied) | {_fmt(sub['copy_rate'], sub['copy_interval'])} |",
                 f"| memorization rate, {name} images only | "
                 f"{_fmt(sub['memorization_rate'], sub['memorization_interval'])} |"]
    return rows


def render_report(doc: dict[str, Any]) -> str:
    """A short markdown summary of a metrics document."""
    lines = [
        f"# Evaluation of `{doc['checkpoint']}`",
        "",
        f"{doc['num_samples']} samples, seeds {doc['seeds']}, {doc['sampler']} {doc['steps']} "
        f"steps, guidance {doc['guidance_scale']}; training images: {doc['train_images']}; "
        f"held-out: {doc['heldout_images']}.",
        "",
        "| measure | value [95% bootstrap interval] |",
        "|---|---|",
        "| memorization rate (d1/d2 < 1/3) | "
        f"{_fmt(doc['memorization_rate'], doc['memorization_interval'])} |",
        f"| copy rate ({doc['copy_detector']}, tau {doc['copy_threshold']:.4f}) | "
        f"{_fmt(doc['copy_rate'], doc['copy_interval'])} |",
        f"| {doc['fd_name']} vs held-out | {_fmt(doc['fd'], doc['fd_interval'], 2)} |",
        f"| precision / recall (k=3, {doc['feature_extractor']}) | {_fmt(doc['precision'])} / "
        f"{_fmt(doc['recall'])} |",
        f"| class agreement | {_fmt(doc['class_agreement'])} |",
        *_subset_rows(doc),
        "",
        f"Copy threshold tau = {doc['copy_threshold']:.4f}, calibrated so that 99% of the "
        f"{doc['num_heldout_images']} held-out images fall below it against these "
        f"{doc['num_train_images']} training images (held-out false-copy rate "
        f"{doc['heldout_false_copy_rate']:.4f}).",
        "",
        "Most replicated training images (ratio test; training-set index: samples): "
        f"{_pairs(doc['most_replicated'])}",
        f"Most copied training images (copy detector): {_pairs(doc['most_copied'])}",
        "",
        "Pictures: `nearest.png` (each sample beside its nearest training image), `ratios.png`.",
    ]
    if doc["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in doc["warnings"]]
    return "\n".join(lines) + "\n"


def _pairs(pairs: list[tuple[int, int]]) -> str:
    return ", ".join(f"#{i}: {n}" for i, n in pairs) if pairs else "none"
