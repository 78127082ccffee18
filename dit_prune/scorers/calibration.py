"""Calibration data (training and held-out images) and the noised examples scorers run on.

Every calibration batch k of split s draws its timesteps and noise from its own random stream
(seed, s, k) for all images of the split at once; forward passes then take `batch_size` examples
at a time. So the examples, and the scores, do not depend on the batch size.

Example:
    >>> import torch
    >>> from dit_prune.data import digits_split
    >>> split = digits_split()
    >>> data = CalibrationData(split.pool_images[:16], split.pool_labels[:16],
    ...                        split.heldout_images[:32], split.heldout_labels[:32])
    >>> data.num_train, data.num_heldout
    (16, 32)
    >>> CalibrationData(split.pool_images[:4], None, split.pool_images[3:5], None)
    Traceback (most recent call last):
    ...
    dit_prune.errors.DitPruneError: held-out image 0 is an exact duplicate of training image 3 \
(1 of 2 held-out images duplicate the training set): held-out images must not overlap it
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dit_prune.errors import DitPruneError
from dit_prune.prediction import EPSILON, Prediction
from dit_prune.scorers.options import ScorerOptions, TimestepDistribution

TRAIN, HELDOUT = "train", "heldout"
SPLIT_IDS = {TRAIN: 0, HELDOUT: 1}


@dataclass(frozen=True)
class CalibrationData:
    """Training images (+ labels) and held-out images (+ labels), (N, C, H, W) each.

    Labels are None for unconditional data (the model's null class is used). Raises a one-line
    DitPruneError when a set is empty, shapes disagree, or a held-out image duplicates a
    training image exactly.
    """

    train_images: torch.Tensor  # (N, C, H, W)
    train_labels: torch.Tensor | None  # (N,) int64
    heldout_images: torch.Tensor  # (M, C, H, W)
    heldout_labels: torch.Tensor | None  # (M,) int64

    def __post_init__(self) -> None:
        for what, images, labels in (("training", self.train_images, self.train_labels),
                                     ("held-out", self.heldout_images, self.heldout_labels)):
            if not isinstance(images, torch.Tensor) or images.ndim != 4:
                shape = tuple(getattr(images, "shape", ()))
                raise DitPruneError(f"{what} images must be a (N, C, H, W) tensor, got {shape}")
            if len(images) == 0:
                raise DitPruneError(f"empty calibration set: no {what} images")
            if not torch.isfinite(images).all():
                raise DitPruneError(f"{what} images contain NaN or infinite values")
            if labels is not None and tuple(labels.shape) != (len(images),):
                raise DitPruneError(
                    f"{len(images)} {what} images but labels of shape {tuple(labels.shape)}"
                )
        if self.train_images.shape[1:] != self.heldout_images.shape[1:]:
            raise DitPruneError(
                f"training images are {tuple(self.train_images.shape[1:])} but held-out images "
                f"are {tuple(self.heldout_images.shape[1:])}"
            )
        refuse_heldout_duplicates(self.train_images, self.heldout_images)

    @property
    def num_train(self) -> int:
        return len(self.train_images)

    @property
    def num_heldout(self) -> int:
        return len(self.heldout_images)

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(images, labels) of 'train' or 'heldout'."""
        if name == TRAIN:
            return self.train_images, self.train_labels
        return self.heldout_images, self.heldout_labels


def refuse_heldout_duplicates(train: torch.Tensor, heldout: torch.Tensor) -> None:
    """Raise DitPruneError when a held-out image (N, C, H, W) is bit-identical to a training
    image: the held-out images calibrate τ and stand for unseen data, and one copy of a training
    image among them sets τ to ~1 (every copy then goes uncounted)."""
    seen = {_image_key(img): i for i, img in enumerate(train)}
    hits = [(j, seen[key]) for j, img in enumerate(heldout) if (key := _image_key(img)) in seen]
    if hits:
        j, i = hits[0]
        raise DitPruneError(
            f"held-out image {j} is an exact duplicate of training image {i} ({len(hits)} of "
            f"{len(heldout)} held-out images duplicate the training set): held-out images must "
            "not overlap it"
        )


def _image_key(image: torch.Tensor) -> bytes:
    return image.detach().to(torch.float32).cpu().contiguous().numpy().tobytes()


@dataclass(frozen=True)
class ExampleChunk:
    """A chunk of noised calibration examples (at most `batch_size` of them)."""

    x0: torch.Tensor  # (B, C, H, W) clean images
    labels: torch.Tensor  # (B,) class labels (null class when unconditional)
    timesteps: torch.Tensor  # (B,) int64
    noise: torch.Tensor  # (B, C, H, W)
    direction: torch.Tensor | None  # (B, C, H, W) extra Gaussian draw, when asked for


def split_images(
    data: CalibrationData, split: str, options: ScorerOptions
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The split's images and labels, reduced to a seeded subset of `max_images` if set."""
    images, labels = data.split(split)
    if options.max_images is None or options.max_images >= len(images):
        return images, labels
    rng = np.random.default_rng([options.seed, SPLIT_IDS[split], 1_000_003])
    keep = torch.from_numpy(np.sort(rng.choice(len(images), options.max_images, replace=False)))
    return images[keep], (labels[keep] if labels is not None else None)


def count_examples(data: CalibrationData, split: str, options: ScorerOptions,
                   timesteps: TimestepDistribution) -> int:
    images, _ = split_images(data, split, options)
    return options.batches * len(images) * timesteps.repeats()


def iterate_examples(
    data: CalibrationData,
    split: str,
    options: ScorerOptions,
    timesteps: TimestepDistribution,
    num_train_timesteps: int,
    null_label: int,
    device: torch.device,
    with_direction: bool = False,
) -> Iterator[ExampleChunk]:
    """Chunks of (x0, label, t, noise[, direction]) for every calibration batch of `split`."""
    images, labels = split_images(data, split, options)
    repeats = timesteps.repeats()
    if labels is None:
        labels = torch.full((len(images),), null_label, dtype=torch.long)  # (N,)
    images = images.repeat_interleave(repeats, 0)  # (N * L, C, H, W)
    labels = labels.to(torch.long).repeat_interleave(repeats, 0)  # (N * L,)
    shape = tuple(images.shape)
    for k in range(options.batches):
        rng = np.random.default_rng([options.seed, SPLIT_IDS[split], k])
        t = torch.from_numpy(timesteps.sample(rng, len(images) // repeats, num_train_timesteps))
        noise = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))  # (N*L, C, H, W)
        direction = (torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
                     if with_direction else None)
        for start in range(0, len(images), options.batch_size):
            part = slice(start, start + options.batch_size)
            yield ExampleChunk(
                x0=images[part].to(device),
                labels=labels[part].to(device),
                timesteps=t[part].to(device),
                noise=noise[part].to(device),
                direction=direction[part].to(device) if direction is not None else None,
            )


def as_prediction(schedule: Prediction | torch.Tensor) -> Prediction:
    """A `Prediction`, or the ε-prediction of an `alphas_cumprod` tensor (T,)."""
    if isinstance(schedule, Prediction):
        return schedule
    return Prediction(EPSILON, torch.as_tensor(schedule, dtype=torch.float64).cpu())


def noised(chunk: ExampleChunk, schedule: Prediction | torch.Tensor) -> torch.Tensor:
    """The model input x_t of the chunk, (B, C, H, W): sqrt(ā) x0 + sqrt(1 - ā) noise for ε / v
    (or an `alphas_cumprod` tensor), (1 - σ) x0 + σ noise for flow matching."""
    return as_prediction(schedule).noisy(chunk.x0, chunk.noise, chunk.timesteps)


def null_label(model: nn.Module) -> int:
    """The unconditional label: the class count of a class-conditional DiT (0 when none)."""
    return int(getattr(model.config, "num_embeds_ada_norm", None) or 0)


def predict_eps(model: nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
    """The model's epsilon prediction (first C channels when it also learns sigma), float32.

    `x_t` is cast to the model's dtype (bf16/fp16 models take half-precision inputs); the
    prediction comes back in float32, so losses and scores are computed in float32.
    """
    dtype = next(model.parameters()).dtype
    out = model(x_t.to(dtype), timestep=timesteps, class_labels=labels).sample  # (B, C', H, W)
    return out[:, : x_t.shape[1]].float()  # (B, C, H, W)


def per_example_loss(model: nn.Module, chunk: ExampleChunk,
                     schedule: Prediction | torch.Tensor) -> torch.Tensor:
    """Denoising loss of each example against the scheduler's own target (ε, v or ε - x0),
    mean over pixels: (B,)."""
    prediction = as_prediction(schedule)
    pred = predict_eps(model, prediction.noisy(chunk.x0, chunk.noise, chunk.timesteps),
                       prediction.model_time(chunk.timesteps), chunk.labels)  # (B, C, H, W)
    target = prediction.target(chunk.x0, chunk.noise, chunk.timesteps)  # (B, C, H, W)
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
