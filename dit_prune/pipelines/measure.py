"""Memorization of a pipeline, measured on decoded images (what a user of a latent model sees).

Example:
    >>> import diffusers
    >>> from dit_prune.models import new_dit
    >>> from dit_prune.pipelines import pixel_dit_pipeline
    >>> pipe = pixel_dit_pipeline(new_dit("tiny", 10, 8, 1), diffusers.DDIMScheduler())
    >>> train = torch.rand(5, 1, 8, 8) * 2 - 1  # (5, 1, 8, 8) in [-1, 1]
    >>> images, report = measure_memorization(pipe, [1, 2], [0, 1], train, steps=2)
    >>> images.shape, report.num_samples
    (torch.Size([2, 1, 8, 8]), 2)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dit_prune.errors import DitPruneError
from dit_prune.pipelines.generate import generate_decoded


def measure_memorization(
    pipe: Any,
    conditions: Sequence[int] | Sequence[str] | torch.Tensor,
    seeds: Sequence[int],
    train_images: torch.Tensor,
    steps: int = 50,
    guidance_scale: float = 1.0,
    **generate: Any,
) -> tuple[torch.Tensor, Any]:
    """Generate decoded images and run the ratio test against `train_images` (pixels, [-1, 1]).

    Returns the images in [0, 1] (N, C, H, W) and the `MemorizationReport` (computed on the
    [-1, 1] scale of the training images).
    """
    from dit_prune.metrics.memorization import memorization_report

    images = generate_decoded(pipe, conditions, seeds, steps, guidance_scale, **generate)
    if tuple(train_images.shape[1:]) != tuple(images.shape[1:]):
        raise DitPruneError(
            f"training images are {tuple(train_images.shape[1:])} but the pipeline decodes "
            f"{tuple(images.shape[1:])} images"
        )
    report = memorization_report(images * 2 - 1, train_images.float().cpu())  # [-1, 1] scale
    return images, report
