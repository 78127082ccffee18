"""Measure the embedded text-to-image digits pipeline and write its MODEL_CARD.md.

Usage:
    python scripts/write_text_model_card.py checkpoints/digits-text

One sample per training row (seed s = row s: the caption of row s), 50 DDIM steps, guidance 1,
evaluated against the model's own distinct training images with the digits evaluator. The card
gives the copy rate of the samples of the memorized prompts (captions of their own, repeated in
training) and of the other prompts, FD against the held-out digits, class agreement.
"""

# ruff: noqa: E501  (the model card is a Markdown template)
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dit_prune.checkpoint import atomic_write_text
from dit_prune.evaluate import digits_context, evaluate_samples
from dit_prune.pipelines.caption_labels import CaptionLabels, caption_conditioning
from dit_prune.pipelines.io import load_pruned_pipeline
from dit_prune.run.report import fmt_rate
from dit_prune.sampling import sample_images
from dit_prune.text_data import digits_text_classes, digits_text_rows


def measure(checkpoint: Path, steps: int = 50, rows_limit: int | None = None) -> dict:
    """Sample one image per training row (or the first `rows_limit` of each prompt group's
    rows) and evaluate; returns the card's metrics."""
    meta = json.loads((checkpoint / "dit_prune.json").read_text())
    pipe = load_pruned_pipeline(checkpoint)
    rows, record = digits_text_rows(meta["data"])
    classes = digits_text_classes(meta["data"])  # (R,)
    memorized = set(record["memorized_captions"])
    picked = list(range(len(rows)))
    if rows_limit is not None:
        mem = [i for i in picked if rows.captions[i] in memorized][:rows_limit]
        other = [i for i in picked if rows.captions[i] not in memorized][:rows_limit]
        picked = mem + other
    captions = [rows.captions[i] for i in picked]
    labels = CaptionLabels.build(pipe, list(rows.captions))
    started = time.perf_counter()
    with caption_conditioning(pipe.transformer, labels):
        images = sample_images(pipe.transformer, pipe.scheduler, labels.of(captions), picked,
                               steps=steps, progress=False)  # (N, 1, 8, 8) in [0, 1]
    seconds = time.perf_counter() - started
    unique = rows.images[: record["num_images"]]  # rows start with every distinct image once
    positions = record["memorized_positions"]
    context = digits_context(train_images=unique, subsets={"duplicated": positions})
    evaluation = evaluate_samples(images, classes[picked], context)
    metrics = dict(evaluation.metrics)
    copies = evaluation.copy.copies.cpu()
    nearest = evaluation.copy.nearest.cpu()
    own = torch.tensor([i if i < record["num_images"] else positions[
        (i - record["num_images"]) // max(record["copies"] - 1, 1)] for i in picked])
    is_mem = torch.tensor([c in memorized for c in captions])
    for group, mask in (("memorized_prompts", is_mem), ("other_prompts", ~is_mem)):
        metrics[f"{group}_samples"] = int(mask.sum())
        metrics[f"{group}_copy_rate"] = float(copies[mask].float().mean())
        metrics[f"{group}_own_image_copy_rate"] = float(
            (copies[mask] & (nearest[mask] == own[mask])).float().mean())
    metrics["sampling_seconds"] = round(seconds, 1)
    metrics.update({k: v for k, v in context.describe().items() if k != "reference_key"})
    metrics["params"] = sum(p.numel() for p in pipe.transformer.parameters())
    return metrics


def render(checkpoint: Path, metrics: dict) -> str:
    meta = json.loads((checkpoint / "dit_prune.json").read_text())
    training, data = meta["training"], meta["data"]
    config = json.loads((checkpoint / "transformer" / "config.json").read_text())
    trained_into = meta["command"].split("--out ", 1)[1].split()[0]
    moved = "" if Path(trained_into) == checkpoint else \
        f"\nTrained into `{trained_into}`, then copied here unchanged.\n"
    mem_list = ", ".join(f'"{c}"' for c in data["memorized_captions"])
    vocab = len(json.loads((checkpoint / "tokenizer" / "tokenizer.json").read_text())["model"][
        "vocab"])
    pool = data["num_images"]
    pool_text = "the 1,000-image digits pool" if pool == 1000 else \
        f"{pool} digits of the 1,000-image pool (class-balanced subset seed {data['subset_seed']})"
    return f"""# {checkpoint.name}

A tiny text-to-image pixel-space DiT: a `diffusers.PixArtSigmaPipeline` whose transformer
(`PixArtTransformer2DModel`: {config['num_layers']} blocks, {config['num_attention_heads']} heads × {config['attention_head_dim']}, self- and cross-attention, FF 4×, patch 2,
8×8×1, {metrics['params']:,} parameters) is trained with DDPM ε-prediction on the scikit-learn
digits, each with a caption, and decodes through `IdentityVAE` (pixels). Captions are encoded
by a one-layer T5 encoder with random, frozen weights (32 channels) over a tokenizer built
locally from {vocab} entries (`dit_prune.pipelines.digits_text`): nothing is downloaded.
Caption dropout {training['caption_dropout']} (to the empty caption, for classifier-free
guidance), EMA {training['ema_decay']}.

Captions: every digit gets "a handwritten digit <name>" (shared by ~{pool // 10} images each),
except {len(data['memorized_captions'])} digits (one per class) that get a caption of their own
and are present {data['copies']} times each: the memorized-prompt case. Their captions:
{mem_list}.

## Reproduce

```bash
{meta['command']}
```
{moved}
- seed {training['seed']}, {training['steps']} steps, batch {training['batch_size']}, lr {training['lr']}
- training data: {pool_text} (`dit_prune.data.digits_split()`, SHA-256 of the indices
  `{data['pool_indices_sha256']}`), {data['num_rows']} rows with the copies; memorized images: pool
  indices {data['memorized_pool_indices']} (`--duplicate {data['duplicate']} --duplicate-seed {data['duplicate_seed']}`)
- training time on one CPU thread (machine shared with other jobs): {meta['train_seconds']} s;
  final loss (mean of the last 100 steps) {meta['final_loss_mean_last_100']:.4f}

## Measured (one sample per training row: {metrics['num_samples']} samples, seed = row, DDIM 50 steps, guidance 1)

Measured with `python scripts/write_text_model_card.py {checkpoint}`, against the model's own
{metrics['num_train_images']} distinct training images:

| metric | value |
|---|---|
| copy rate, samples of the 10 memorized prompts ({metrics['memorized_prompts_samples']}) | {metrics['memorized_prompts_copy_rate']:.1%} (of its own image: {metrics['memorized_prompts_own_image_copy_rate']:.1%}) |
| copy rate, samples of the other prompts ({metrics['other_prompts_samples']}) | {metrics['other_prompts_copy_rate']:.1%} |
| copy rate, all samples (`{metrics['copy_detector']}`, τ = {metrics['copy_threshold']:.4f}) | {fmt_rate(metrics['copy_rate'], metrics['copy_interval'])} |
| memorization rate, all samples (d1/d2 < 1/3) | {fmt_rate(metrics['memorization_rate'], metrics['memorization_interval'])} |
| {metrics['fd_name']} vs {metrics['num_heldout_images']} held-out digits | {metrics['fd']:.2f} [{metrics['fd_interval'][0]:.2f}, {metrics['fd_interval'][1]:.2f}] |
| precision / recall (k-NN, held-out) | {metrics['precision']:.3f} / {metrics['recall']:.3f} |
| class agreement (digits-features classifier, the row's digit) | {metrics['class_agreement']:.3f} |
| sampling time for {metrics['num_samples']} images (one CPU thread) | {metrics['sampling_seconds']} s |

`tests/test_text_to_image.py` re-measures the two copy rates on fewer samples.

```json
{json.dumps({k: round(metrics[k], 4) for k in (
    'memorized_prompts_copy_rate', 'other_prompts_copy_rate', 'copy_rate', 'fd',
    'class_agreement')})}
```
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    metrics = measure(args.checkpoint)
    atomic_write_text(args.checkpoint / "MODEL_CARD.md", render(args.checkpoint, metrics))
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                     indent=1))


if __name__ == "__main__":
    main()
