"""Measure a trained digits DiT and write its MODEL_CARD.md (command, seed, data, metrics).

Usage:
    python scripts/write_model_card.py checkpoints/digits-memorized --samples 1000

The card's numbers come from this run: `--samples` class-balanced samples (seed s gets class
s mod 10), 50 DDIM steps, guidance 1, evaluated against the checkpoint's own training images.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dit_prune.checkpoint import atomic_write_text, load_dit
from dit_prune.evaluate import digits_context, evaluate_samples
from dit_prune.pruning.recovery_data import recovery_images
from dit_prune.run.report import fmt_rate
from dit_prune.sampling import labels_for_seeds, sample_images


def measure(checkpoint: Path, samples: int, steps: int = 50) -> dict:
    """Sample `samples` images with seeds 0..samples-1 and evaluate them."""
    model, scheduler, meta = load_dit(checkpoint)
    train, _, _ = recovery_images(meta.extra, "train")
    duplicated = meta.extra.get("data", {}).get("duplicated")
    subsets = {}
    if duplicated:
        positions = duplicated["train_positions"]
        subsets = {"duplicated": positions,
                   "other": sorted(set(range(len(train))) - set(positions))}
    context = digits_context(train_images=train, subsets=subsets)
    labels = labels_for_seeds(range(samples), meta.num_classes)  # (N,)
    started = time.perf_counter()
    images = sample_images(model, scheduler, labels, list(range(samples)), steps=steps)
    seconds = time.perf_counter() - started
    evaluation = evaluate_samples(images, labels, context)
    metrics = dict(evaluation.metrics)
    metrics["sampling_seconds"] = round(seconds, 1)
    metrics["distinct_training_images_copied"] = len(set(
        evaluation.memorization.nearest[evaluation.memorization.memorized].tolist()))
    metrics.update({k: v for k, v in context.describe().items() if k != "reference_key"})
    if duplicated:
        metrics["training_multiset_fd"] = multiset_fd(train, duplicated, samples, context)
    return metrics


def multiset_fd(train, duplicated: dict, samples: int, context) -> float:
    """FD of `samples` draws (seeded) from the training multiset, duplicates included: the FD a
    model that reproduced its training distribution exactly would get (a floor for the card)."""
    import torch

    from dit_prune.duplication import expand_with_duplicates
    from dit_prune.metrics.fid import frechet_distance

    multiset = expand_with_duplicates(train, duplicated["train_positions"], duplicated["copies"])
    idx = torch.randint(len(multiset), (samples,), generator=torch.Generator().manual_seed(0))
    feats = context.features.features(multiset[idx])  # (samples, D)
    return frechet_distance(feats, context.reference.stats)


def render(checkpoint: Path, metrics: dict, samples: int) -> str:
    meta = json.loads((checkpoint / "dit_prune.json").read_text())
    training, data = meta["training"], meta["data"]
    duplicated, dup_text, dup_rows = data.get("duplicated"), "", ""
    pool_text = (f"{data['num_images']} images of the 1,000-image digits pool\n"
                 f"  (`dit_prune.data.digits_split()`, class-balanced subset seed "
                 f"{data.get('subset_seed')});")
    trained_into = meta["command"].split("--out ", 1)[1].split()[0] \
        if "--out " in meta["command"] else str(checkpoint)
    moved_text = "" if Path(trained_into) == checkpoint else \
        f"\nTrained into `{trained_into}`, then copied here unchanged.\n"
    if data["num_images"] == 1000:
        pool_text = "all of the 1,000-image digits pool (`dit_prune.data.digits_split()`);"
    if duplicated:
        sub = metrics["subsets"]
        dup_text = (f"- duplicated: {len(duplicated['train_positions'])} of them "
                    f"(one per class, `--duplicate-seed {duplicated['spec']['seed']}`; pool "
                    f"indices {duplicated['pool_indices']}) are present {duplicated['copies']} "
                    f"times each: {duplicated['num_images_with_copies']} training images in "
                    "all (`data.duplicated` in `dit_prune.json`)\n")
        dup_rows = (
            f"| copy rate, duplicated images only | "
            f"{fmt_rate(sub['duplicated']['copy_rate'], sub['duplicated']['copy_interval'])} "
            f"({sub['duplicated']['distinct_copied']} of {sub['duplicated']['subset_size']} "
            "copied) |\n"
            f"| copy rate, all other training images | "
            f"{fmt_rate(sub['other']['copy_rate'], sub['other']['copy_interval'])} |\n"
            f"| memorization rate, duplicated images only | "
            f"{fmt_rate(sub['duplicated']['memorization_rate'])} |\n"
            f"| {metrics['fd_name']} of {samples} draws from the training multiset (floor) | "
            f"{metrics['training_multiset_fd']:.2f} |\n")
    return f"""# {checkpoint.name}

A tiny class-conditional pixel-space DiT (`diffusers.DiTTransformer2DModel`, {training['size']}:
4 blocks, 4 heads × 32, FF 512, patch 2, 8×8×1, ~1.4 M parameters) trained on the scikit-learn
digits with DDPM epsilon loss, label dropout {training['label_dropout']} once per example (to the
null class 10), EMA {training['ema_decay']}.

## Reproduce

```bash
{meta['command']}
```
{moved_text}
- seed {training['seed']}, {training['steps']} steps, batch {training['batch_size']}, lr {training['lr']}
- training data: {pool_text}
  SHA-256 of the pool indices (int64): `{data['indices_sha256']}`; the indices are in
  `dit_prune.json`
{dup_text}- training time on 2 CPU cores (shared with other jobs): {meta['train_seconds']} s; final loss
  (mean of the last 100 steps) {meta['final_loss_mean_last_100']:.4f}
- memorization probe during training (100 samples, 50 DDIM steps):
  {', '.join(f"{p['step']}: {p['memorization_rate']:.2f}" for p in meta['probes'])}

## Measured ({samples} samples, seeds 0–{samples - 1}, class = seed mod 10, DDIM 50 steps, guidance 1)

Measured with `python scripts/write_model_card.py {checkpoint} --samples {samples}`, against the
model's own {metrics['num_train_images']} training images:

| metric | value |
|---|---|
| memorization rate (d1/d2 < 1/3) | {fmt_rate(metrics['memorization_rate'], metrics['memorization_interval'])} |
| copy rate (`{metrics['copy_detector']}`, τ = {metrics['copy_threshold']:.4f}) | {fmt_rate(metrics['copy_rate'], metrics['copy_interval'])} |
| distinct training images copied (ratio test) | {metrics['distinct_training_images_copied']} |
{dup_rows}| {metrics['fd_name']} vs {metrics['num_heldout_images']} held-out digits | {metrics['fd']:.2f} [{metrics['fd_interval'][0]:.2f}, {metrics['fd_interval'][1]:.2f}] |
| precision / recall (k-NN, held-out) | {metrics['precision']:.3f} / {metrics['recall']:.3f} |
| class agreement (digits-features classifier) | {metrics['class_agreement']:.3f} |
| sampling time for {samples} images | {metrics['sampling_seconds']} s |

`tests/test_model_cards.py` re-measures the memorization rate and class agreement on fewer samples.

```json
{json.dumps(card_json(metrics))}
```
"""


def card_json(metrics: dict) -> dict:
    """The numbers tests/test_model_cards.py re-measures."""
    card = {k: metrics[k] for k in ("memorization_rate", "copy_rate", "fd", "class_agreement")}
    if "subsets" in metrics:
        card["duplicated_copy_rate"] = metrics["subsets"]["duplicated"]["copy_rate"]
        card["other_copy_rate"] = metrics["subsets"]["other"]["copy_rate"]
    return card


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--samples", type=int, default=1000)
    args = parser.parse_args()
    metrics = measure(args.checkpoint, args.samples)
    atomic_write_text(args.checkpoint / "MODEL_CARD.md", render(args.checkpoint, metrics,
                                                                args.samples))
    print(json.dumps(metrics, indent=2, default=str))


if __name__ == "__main__":
    main()
