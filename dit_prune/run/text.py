"""`dit-prune run` on a text-to-image pipeline: prompts from the training captions.

The run's machinery (sampling, scorers, re-trigger attack, evaluator, random and noise
controls) works on labels. A text-to-image run gives every distinct caption a label
(`dit_prune.pipelines.caption_labels`) and conditions each transformer it calls on those labels
(`TextRun.condition`), so the same code measures it and the same verdict judges it.

* Training rows: `--train FOLDER` (images + `metadata.jsonl`, `dit_prune.text_data`), or for the
  embedded model the digits rows its `dit_prune.json` records. A file listed on several rows is
  one training image with copies.
* Seeds: seed s samples the caption of training row π(s mod R), R rows, π a fixed seeded
  permutation (`row_order`): seeds 0..R-1 give one sample per training row (so a caption
  repeated with its image k times gets k samples), and any run of consecutive seeds, such as
  the default 0-999, draws rows evenly from the whole training set.
* Copies are counted against the distinct training images; for the embedded model the
  memorized-prompt images are the run's duplicated target (as `--duplicate` digits are).
* Class agreement is measured only when each row's class is known (the embedded digits).
* Recovery (`--recover finetune|distill`, `dit_prune.pruning.caption_recovery`) trains on the
  distinct training images with their captions (`--recover-data train`), the held-out rows
  (`heldout`) or a caption folder, in the transformer's input space, on caption labels.
* Latent pipelines (a VAE other than `IdentityVAE`: SD3, Sana, a latent PixArt): the images of
  the caption folders are the decoded space, where samples (decoded by the pipeline's VAE,
  `decode_latents`), copies and FD are measured; the scorers and the re-trigger attack work on
  their latents (`encode_images`, computed once), the attack comparing decoded samples.
  Flux runs on its 2×2-packed latents (`flux_model_space`), unpacked before decoding; its image
  size is the caption folders' (sides divisible by twice the VAE's scale factor).

Example:
    >>> inputs = text_run_inputs(cfg, load_dit(cfg.checkpoint))  # doctest: +SKIP
    >>> inputs.text.seed_labels([0, 1]), inputs.text.prompt_of_seed(0)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dit_prune.errors import DitPruneError
from dit_prune.pipelines.caption_labels import (
    CaptionLabels,
    caption_conditioning,
    flux_model_space,
)
from dit_prune.text_data import (
    CaptionedImages,
    digits_text_classes,
    digits_text_heldout,
    digits_text_rows,
    load_caption_folder,
)

MODEL_INDEX = "model_index.json"
ROW_ORDER_SEED = 0


def is_text_checkpoint(path: str | Path) -> bool:
    """True for a pipeline directory whose pipeline has a text encoder (text-to-image)."""
    index_file = Path(path) / MODEL_INDEX
    if not index_file.is_file():
        return False
    try:
        index = json.loads(index_file.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(index, dict) and bool(index.get("text_encoder")) and \
        list(index.get("text_encoder") or [None])[0] is not None


@dataclass(frozen=True)
class TextRun:
    """The text side of a run: the pipeline, its caption labels and the training rows.

    `unique` maps each training row to its distinct image (R,); `row_classes` holds each row's
    class (R,) when known, for class agreement.
    """

    pipe: Any
    labels: CaptionLabels
    rows: CaptionedImages
    unique: torch.Tensor  # (R,) long: row -> position among the distinct training images
    row_classes: torch.Tensor | None  # (R,) long, or None
    memorized_captions: tuple[str, ...] = ()
    # latent pipelines: the distinct training and the held-out images in the transformer's
    # input space, (N, c, h, w) and (K, c, h, w); None for pixel-space pipelines
    model_train: torch.Tensor | None = None
    model_heldout: torch.Tensor | None = None
    packed: bool = False  # Flux: model space = latents with each 2×2 patch as channels

    @property
    def latent(self) -> bool:
        """True when the pipeline samples latents that its VAE decodes."""
        return self.model_train is not None

    @property
    def model_shape(self) -> tuple[int, int, int]:
        """(c, h, w) of one transformer input (latent pipelines)."""
        if self.model_train is None:
            raise DitPruneError("a pixel-space run has no separate model space")
        return tuple(int(v) for v in self.model_train.shape[1:])  # type: ignore[return-value]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space samples (B, c, h, w) -> images (B, C, H, W) in about [-1, 1], through the
        pipeline's VAE (`dit_prune.pipelines.vae.decode_latents`; differentiable)."""
        from dit_prune.pipelines.vae import decode_latents

        if self.packed:
            latents = torch.nn.functional.pixel_shuffle(latents, 2)  # (B, C, 2h, 2w)
        return decode_latents(self.pipe, latents)

    def seed_rows(self, seeds: Sequence[int]) -> torch.Tensor:
        """Training row of each seed (N,): π(s mod R) (module docstring)."""
        order = row_order(len(self.rows))  # (R,)
        return order[torch.tensor([int(s) % len(self.rows) for s in seeds], dtype=torch.long)]

    def seed_labels(self, seeds: Sequence[int]) -> torch.Tensor:
        """Caption label of each seed's prompt (N,)."""
        rows = self.seed_rows(seeds)
        return self.labels.of([self.rows.captions[int(r)] for r in rows])

    def seed_classes(self, seeds: Sequence[int]) -> torch.Tensor | None:
        """Class of each seed's training row (N,), or None when classes are unknown."""
        if self.row_classes is None:
            return None
        return self.row_classes[self.seed_rows(seeds)]

    def prompt_of_seed(self, seed: int) -> str:
        return self.rows.captions[int(self.seed_rows([seed])[0])]

    def condition(self, model: nn.Module) -> AbstractContextManager[None]:
        """Context in which `model(x, timestep=t, class_labels=y)` runs on caption labels."""
        return caption_conditioning(model, self.labels)

    def with_transformer(self, model: nn.Module) -> Any:
        """A pipeline of the same class around `model` (sharing every other component)."""
        components = dict(self.pipe.components)
        components["transformer"] = model
        return type(self.pipe)(**components)


def row_order(count: int, seed: int = ROW_ORDER_SEED) -> torch.Tensor:
    """The fixed permutation π of `count` training rows that seeds walk through, (R,) long.

    Example:
        >>> sorted(row_order(5).tolist())
        [0, 1, 2, 3, 4]
    """
    return torch.from_numpy(np.random.default_rng([seed, count]).permutation(count)).long()


def text_run_inputs(cfg: Any, loaded: Any) -> Any:
    """The `RunInputs` of a text-to-image run (its `text` is the `TextRun`); one-line
    DitPruneError on bad input."""
    from dit_prune.commands.common import pick_device
    from dit_prune.run.experiment import RunInputs

    extra = loaded.meta.extra if isinstance(loaded.meta.extra, dict) else {}
    rows, classes, memorized, record = _training_rows(cfg, extra)  # caption folders first:
    heldout = _heldout_rows(cfg, extra)  # their errors come before the pipeline loads
    recovery_folder = _recovery_folder(cfg)  # a caption folder, or None
    pipe = _quiet_load(cfg.checkpoint)
    unique, positions = _distinct(rows)
    train_images = rows.images[positions]  # (N, C, H, W) distinct images
    model = pipe.transformer
    packed = type(model).__name__ == "FluxTransformer2DModel"
    latent = pipe.vae is not None and type(pipe.vae).__name__ != "IdentityVAE"
    channels = int(getattr(pipe.vae.config, "in_channels", 3)) if latent else \
        int(model.config.in_channels)
    if packed:  # no sample size: the folders' size, in whole 2×2 latent patches
        side = int(train_images.shape[-1])
        if not latent or side % (2 * _vae_scale(pipe)):
            raise DitPruneError(f"Flux images must be square with sides divisible by "
                                f"{2 * _vae_scale(pipe)} (its VAE scale and 2×2 packing), got "
                                f"{tuple(train_images.shape[1:])}")
        expected = (channels, side)
    elif not getattr(model.config, "sample_size", None):
        raise DitPruneError(f"{type(model).__name__} has no sample size to sample at")
    else:
        expected = (channels, int(model.config.sample_size) * _vae_scale(pipe))
    train_from = f"--train {cfg.train}" if cfg.train else "the checkpoint's digits"
    heldout_from = f"--heldout {cfg.heldout}" if cfg.heldout else "the held-out digits"
    checked = [(f"training images ({train_from})", train_images),
               (f"held-out images ({heldout_from})", heldout.images)]
    if recovery_folder is not None:
        checked.append((f"recovery images (--recover-data {cfg.recover_data})",
                        recovery_folder.images))
    for what, images in checked:
        if tuple(images.shape[1:]) != (expected[0], expected[1], expected[1]):
            raise DitPruneError(f"{what} are {tuple(images.shape[1:])} but the pipeline makes "
                                f"{(expected[0], expected[1], expected[1])} (C, H, W)")
    extra_captions = list(recovery_folder.captions) if recovery_folder is not None else []
    with quiet_libraries():  # the text encoders' library warnings
        labels = CaptionLabels.build(pipe, list(rows.captions) + list(heldout.captions)
                                     + extra_captions)
    null = labels.null
    if null and labels.num_labels > null:
        raise DitPruneError(f"{labels.num_labels} distinct captions, but this transformer's "
                            f"label space holds {null}: use fewer distinct captions")
    row_labels = labels.of(list(rows.captions))  # (R,)
    train_labels = row_labels[positions]  # (N,) the first caption of each distinct image
    meta = dataclasses.replace(loaded.meta, extra={**extra, "data": record})
    device = pick_device(cfg.device)
    model_train = model_heldout = None
    if latent:  # encoded once, deterministically (the VAE's mode), for scorers
        pipe.vae.to(device).eval()
        model_train = _model_space(pipe, train_images, packed)  # (N, c, h, w)
        model_heldout = _model_space(pipe, heldout.images, packed)  # (K, c, h, w)
    text = TextRun(pipe, labels, rows, unique, classes, memorized, model_train, model_heldout,
                   packed)
    heldout_labels = labels.of(list(heldout.captions))  # (K,)
    recovery, recovery_labels = None, None  # in the transformer's input space
    if cfg.recover != "none":
        recovery, recovery_labels = {
            "train": (train_images if model_train is None else model_train, train_labels),
            "heldout": (heldout.images if model_heldout is None else model_heldout,
                        heldout_labels),
        }.get(cfg.recover_data, (None, None))
        if recovery_folder is not None:
            recovery = recovery_folder.images  # (P, C, H, W)
            if latent:
                recovery = _model_space(pipe, recovery, packed)  # (P, c, h, w)
            recovery_labels = labels.of(list(recovery_folder.captions))  # (P,)
    store = None  # --train-store: a store of the distinct training images, as in class runs
    if cfg.train_store:
        from dit_prune.store.format import open_store
        from dit_prune.store.reuse import check_store

        store = open_store(cfg.train_store)
        check_store(store, train_images)
    return RunInputs(loaded._replace(meta=meta), train_images, train_labels, heldout.images,
                     heldout_labels, device, recovery, recovery_labels, text=text,
                     train_store=store)


def _model_space(pipe: Any, images: torch.Tensor, packed: bool) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] -> the transformer's input space: the VAE's latents
    (`encode_images`, (N, c, h, w)), for Flux with each 2×2 patch as channels
    (`flux_model_space`, (N, 4c, h/2, w/2))."""
    from dit_prune.pipelines.vae import encode_images

    latents = encode_images(pipe, images)  # (N, c, h, w)
    return flux_model_space(latents) if packed else latents


TEXT_RECOVERIES = ("none", "finetune", "distill")
TEXT_RECOVERY_DATA = ("train", "heldout")  # or a caption folder


def _recovery_folder(cfg: Any) -> CaptionedImages | None:
    """Check the recovery of a text-to-image run (finetune or distill, on the training rows,
    the held-out rows or a caption folder); returns the folder's rows, or None."""
    if cfg.recover not in TEXT_RECOVERIES:
        raise DitPruneError(f"--recover {cfg.recover} is not supported on text-to-image runs "
                            "(its attack conditions on class embeddings); use finetune or "
                            "distill")
    if cfg.recover == "none" or cfg.recover_data in TEXT_RECOVERY_DATA:
        return None
    from dit_prune.pruning.recovery_data import RECOVERY_SOURCES

    if cfg.recover_data in RECOVERY_SOURCES:
        raise DitPruneError(f"--recover-data {cfg.recover_data} is not available on "
                            "text-to-image runs; use train, heldout or a caption folder "
                            "(images with metadata.jsonl)")
    return load_caption_folder(cfg.recover_data)


def _quiet_load(path: str | Path) -> Any:
    """The pipeline, loaded without diffusers' "Loading pipeline components" and transformers'
    "Loading weights" progress bars, and without the libraries' warnings and log messages
    (e.g. "`CLIPImageProcessor` requires torchvision" for SD3's and Sana's unused processors);
    `quiet_libraries` restores every setting afterwards."""
    from dit_prune.pipelines.io import load_pruned_pipeline

    with quiet_libraries():
        return load_pruned_pipeline(path)


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Inside the block: diffusers' and transformers' progress bars off, their loggers at error
    level and Python warnings ignored; every setting is restored on exit."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libs = (diffusers_logging, transformers_logging)
    enabled = [(lib, lib.is_progress_bar_enabled(), lib.get_verbosity()) for lib in libs]
    for lib in libs:
        lib.disable_progress_bar()
        lib.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lib, was, verbosity in enabled:
            lib.set_verbosity(verbosity)
            if was:
                lib.enable_progress_bar()


def _vae_scale(pipe: Any) -> int:
    return int(getattr(pipe, "vae_scale_factor", 1) or 1)


def _training_rows(cfg: Any, extra: dict) -> tuple[CaptionedImages, torch.Tensor | None,
                                                   tuple[str, ...], dict]:
    """Rows, their classes (or None), the memorized captions and the run's data record."""
    if cfg.train:
        rows = load_caption_folder(cfg.train)
        return rows, None, (), {"source": str(cfg.train), "num_rows": len(rows)}
    data = extra.get("data")
    if extra.get("kind") != "text-to-image" or not isinstance(data, dict) or \
            data.get("source") != "digits":
        raise DitPruneError(f"{cfg.checkpoint} records no training captions: pass --train "
                            "FOLDER (images with metadata.jsonl)")
    rows, record = digits_text_rows(data)
    classes = digits_text_classes(data)  # (R,)
    positions = list(record.get("memorized_positions", []))
    duplicated = {"train_positions": positions, "copies": record.get("copies", 1)}
    memorized = tuple(record.get("memorized_captions", []))
    return rows, classes, memorized, {**data, **record, "duplicated": duplicated}


def _heldout_rows(cfg: Any, extra: dict) -> CaptionedImages:
    if cfg.heldout:
        return load_caption_folder(cfg.heldout)
    if cfg.train:
        raise DitPruneError("a text-to-image run with --train needs --heldout FOLDER too")
    return digits_text_heldout()


def _distinct(rows: CaptionedImages) -> tuple[torch.Tensor, list[int]]:
    """(row -> distinct image position (R,), the first row of each distinct image)."""
    keys = rows.files if rows.files else tuple(str(i) for i in range(len(rows)))
    first: dict[str, int] = {}
    unique = []
    for key in keys:
        if key not in first:
            first[key] = len(first)
        unique.append(first[key])
    positions = [0] * len(first)
    for i in reversed(range(len(keys))):
        positions[unique[i]] = i
    return torch.tensor(unique, dtype=torch.long), positions
