"""The memorization-to-generalization transition on the digits, and whether pruning moves a
memorizing model's samples towards a generalizing model's.

Part 1: for each n and each training seed, two tiny DiTs are trained (same settings, fixed step
count) on two disjoint class-balanced sets of n pool digits (halves A and B; only A when the
1,000-digit pool cannot hold two, and then the whole pool for n = 1,000). Each is judged against
its own training set (memorization rate, copy rate, FD to held-out digits); and the FD between
A's and B's samples on the same seeds measures whether they converge (Kadkhodaie et al. 2024) —
compared with the FD between two disjoint real sets of the same size (the floor).

Part 2: FD, on the same seeds, between the shipped generalized model's samples and those of the
memorized model before pruning, after scorer-chosen pruning and after random pruning (scores
reused from ablate_budget's cache when present).

Usage:
    OMP_NUM_THREADS=1 python scripts/transition.py --out runs/transition --ns 16,64,256,400,1000 \
        --train-steps 1000 --seeds 0-299 --steps 25 --pruning-seeds 0,1,2
    OMP_NUM_THREADS=1 python scripts/transition.py --smoke --out /tmp/transition_smoke
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablation_common import (  # noqa: E402
    base_parser,
    check_positive,
    check_scorers,
    digits_calibration,
    fmt,
    int_list,
    limit_threads,
    mean_std,
    new_figure,
    parse_list,
    parse_script_args,
    run_script,
    save_figure,
    scored_and_pruned,
    timed,
    write_json,
    write_table,
)
from tqdm.auto import tqdm  # noqa: E402


def parse_args(argv: list[str] | None = None) -> Any:
    parser = base_parser(__doc__.splitlines()[0], "runs/transition")
    parser.add_argument("--ns", default="16,64,256,400,1000",
                        help="training-set sizes per model (two balanced halves fit up to 430 "
                        "in the digits pool; 1000 = the whole pool)")
    parser.add_argument("--train-steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--generalized", default="checkpoints/digits-generalized")
    parser.add_argument("--scorer", default="taylor-gap")
    parser.add_argument("--mode", default="heads")
    parser.add_argument("--budget", type=float, default=0.2)
    args = parse_script_args(parser, argv, {
        "seeds": "0-29", "steps": 5, "pruning_seeds": "0", "ns": "10,600", "train_steps": 20})
    check_scorers(parser, args.scorer, "--scorer")
    int_list(parser, args.ns, "--ns")
    check_positive(parser, args.train_steps, "--train-steps")
    check_positive(parser, args.batch_size, "--batch-size")
    return args


def disjoint_halves(labels: torch.Tensor, n: int, seed: int) -> list[np.ndarray]:
    """Two disjoint class-balanced index sets of size n each (indices into labels); only one
    when the pool cannot hold two balanced halves, and the whole pool (unbalanced if the pool
    is) when n is its size."""
    from dit_prune.data import balanced_subset
    from dit_prune.errors import DitPruneError

    if n >= len(labels):
        return [np.arange(len(labels))]
    a = balanced_subset(labels, n, seed)
    rest = np.setdiff1d(np.arange(len(labels)), a)
    try:
        b = rest[balanced_subset(labels[rest], n, seed + 1)]
    except DitPruneError:  # some class has too few images left for a second half
        return [np.sort(a)]
    return [np.sort(a), np.sort(b)]


def trained_model(images: torch.Tensor, labels: torch.Tensor, steps: int, batch: int, seed: int,
                  path: Path) -> torch.nn.Module:
    """Train (or reload from path, a safetensors file) a tiny DiT on images (N, C, H, W) in
    [-1, 1]; the file is written atomically, so an interrupted training leaves nothing."""
    from safetensors.torch import load_file, save_file

    from dit_prune.checkpoint import atomic_write_with
    from dit_prune.models import new_dit
    from dit_prune.training import TrainConfig, train_dit

    if path.is_file():
        model = new_dit("tiny", 10, images.shape[-1], images.shape[1])
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    cfg = TrainConfig(steps=steps, batch_size=batch, probe_every=0, seed=seed)
    result = train_dit(images, labels, cfg, num_classes=10, progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in result.model.state_dict().items()}
    atomic_write_with(path, lambda tmp: save_file(state, str(tmp)))
    return result.model.eval()


def draw(model: torch.nn.Module, scheduler: Any, seeds: list[int], steps: int) -> torch.Tensor:
    """(N, C, H, W) samples in [0, 1]; class = seed mod 10."""
    from dit_prune.sampling import labels_for_seeds, sample_images

    labels = labels_for_seeds(seeds, 10)  # (N,)
    return sample_images(model, scheduler, labels, seeds, steps=steps, progress=False)


def fd_between(features: Any, a: torch.Tensor, b: torch.Tensor) -> float:
    """FD between feature fits of two image sets in [-1, 1]."""
    from dit_prune.metrics.fid import frechet_distance

    with torch.no_grad():
        return float(frechet_distance(features.features(a), features.features(b)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import diffusers

    from dit_prune.data import digits_split
    from dit_prune.evaluate import build_context, default_checkpoints_dir, evaluate_samples
    from dit_prune.metrics.copydetect import load_copy_detector
    from dit_prune.metrics.features import load_feature_extractor
    from dit_prune.sampling import labels_for_seeds, parse_seeds

    args = parse_args(argv)
    limit_threads()
    done = timed("transition")
    out = Path(args.out)
    root = default_checkpoints_dir()
    features = load_feature_extractor(root / "digits-features")
    detector = load_copy_detector(root / "digits-copydetect")
    split = digits_split()
    seeds = parse_seeds(args.seeds)
    labels = labels_for_seeds(seeds, 10)  # (N,)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(split.heldout_images), generator=gen)
    half = min(len(seeds), len(perm) // 2)
    floor = fd_between(features, split.heldout_images[perm[:half]],
                       split.heldout_images[perm[half: 2 * half]])
    rows, summary = [], []
    train_seeds = parse_list(args.pruning_seeds, int)
    for n in tqdm(parse_list(args.ns, int), desc="transition"):
        per_model, between = [], []
        for seed in train_seeds:
            samples = []
            halves = disjoint_halves(split.pool_labels, n, seed=1000 * seed + n)
            for name, idx in zip("AB", halves, strict=False):
                imgs, labs = split.pool_images[idx], split.pool_labels[idx]
                path = out / "models" / f"n{n}_{name}_seed{seed}_{args.train_steps}.safetensors"
                model = trained_model(imgs, labs, args.train_steps, args.batch_size, seed, path)
                images = draw(model, scheduler, seeds, args.steps)  # (N, C, H, W) in [0, 1]
                ctx = build_context(imgs, split.heldout_images, features, detector,
                                    cache_dir=out / "cache")
                per_model.append(evaluate_samples(images, labels, ctx).metrics)
                samples.append(images * 2 - 1)
            if len(samples) == 2:
                between.append(fd_between(features, samples[0], samples[1]))
        stats = {k: mean_std(m[k] for m in per_model)
                 for k in ("memorization_rate", "copy_rate", "fd", "class_agreement")}
        gap = mean_std(between)
        rows.append([n, args.train_steps, len(per_model),
                     fmt(stats["memorization_rate"], "memorization_rate"),
                     fmt(stats["copy_rate"], "copy_rate"), fmt(stats["fd"], "fd"),
                     fmt(gap, "fd"), f"{floor:.1f}"])
        summary.append({"n": n, "stats": stats, "fd_between_halves": gap, "floor": floor,
                        "models": per_model, "fd_between_per_seed": between})
    notes = [f"Each row: tiny DiTs trained for {args.train_steps} steps (batch "
             f"{args.batch_size}, lr 1e-3) on disjoint class-balanced halves A and B of n pool "
             f"digits, for training seeds {args.pruning_seeds} (each seed draws its own halves "
             "and its own initialisation); only half A when the 1,000-digit pool cannot hold two "
             f"halves. Rates and FD to held-out: mean ± std over all models; FD between halves: "
             f"mean ± std over seeds. {len(seeds)} samples each, DDIM {args.steps} steps, the "
             "same seeds for every model.",
             f"floor: FD between two disjoint sets of {half} real held-out digits."]
    table = write_table(out / "transition_table.md",
                        ["n per model", "train steps", "models", "memorization (ratio)",
                         "copy rate",
                         "FD_digitsnet to held-out", "FD between halves' samples", "real floor"],
                        rows, title="Memorization vs training-set size", notes=notes)
    prune_rows = _pruning_part(args, features, scheduler, seeds)
    prune_table = write_table(out / "transition_pruning.md",
                              ["model", f"FD to {Path(args.generalized).name} samples"],
                              prune_rows, title="Does pruning move samples towards the "
                              "generalizing model?",
                              notes=["same seeds for all models; mean ± std over pruning seeds "
                                     f"{args.pruning_seeds}; real floor {floor:.1f}."])
    plot = _plot(summary, out / "transition.png")
    write_json(out / "transition_summary.json", {"rows": summary, "pruning": prune_rows})
    done()
    print(table.read_text() + "\n" + prune_table.read_text())
    return {"table": table, "pruning_table": prune_table, "plot": plot}


def _pruning_part(args: Any, features: Any, scheduler: Any, seeds: list[int]) -> list[list[str]]:
    from dit_prune.checkpoint import load_dit

    general = draw(load_dit(args.generalized).model, scheduler, seeds, args.steps) * 2 - 1
    base, scheduler_of_base, meta = load_dit(args.checkpoint)
    unpruned = fd_between(features, draw(base, scheduler, seeds, args.steps) * 2 - 1, general)
    rows = [[f"{Path(args.checkpoint).name}, unpruned", f"{unpruned:.1f}"]]
    data = digits_calibration(meta)
    for name in (args.scorer, "random"):
        values = []
        for seed in parse_list(args.pruning_seeds, int):
            model = scored_and_pruned(base, name, seed, args.budget, args.mode, data,
                                      scheduler_of_base, args.smoke)
            values.append(fd_between(features, draw(model, scheduler, seeds, args.steps)
                                     * 2 - 1, general))
        rows.append([f"pruned by {name}, {args.mode} {args.budget:g}",
                     fmt(mean_std(values), "fd")])
    return rows


def _plot(summary: list[dict[str, Any]], path: Path) -> Path:
    fig, axes = new_figure(2)
    ns = [r["n"] for r in summary]
    for key, label in (("memorization_rate", "memorization (ratio)"), ("copy_rate", "copy rate")):
        axes[0].errorbar(ns, [100 * r["stats"][key][0] for r in summary],
                         yerr=[100 * r["stats"][key][1] for r in summary], marker="o",
                         capsize=3, label=label)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("training images n")
    axes[0].set_ylabel("%")
    axes[0].legend()
    paired = [r for r in summary if r["fd_between_halves"][2]]
    axes[1].errorbar([r["n"] for r in paired], [r["fd_between_halves"][0] for r in paired],
                     yerr=[r["fd_between_halves"][1] for r in paired], marker="o", capsize=3,
                     label="FD between halves' samples")
    axes[1].errorbar(ns, [r["stats"]["fd"][0] for r in summary],
                     yerr=[r["stats"]["fd"][1] for r in summary], marker="s", capsize=3,
                     label="FD to held-out (mean over models)")
    axes[1].axhline(summary[0]["floor"], color="grey", linestyle=":", label="real-vs-real floor")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("training images n")
    axes[1].set_ylabel("FD_digitsnet")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


if __name__ == "__main__":
    run_script(main, "transition")
