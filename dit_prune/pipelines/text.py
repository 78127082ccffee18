"""Scoring data for text-conditioned transformers (PixArt-α): images with encoded captions.

Scorers feed the transformer noisy model-space images and a condition. For a class-conditional
DiT the condition is a label; for PixArt it is the caption encoded by the pipeline's tokenizer
and T5 encoder. `TextCalibrationData` holds both splits (training images, whose copying we
want to find, and held-out images) already in the transformer's input space, with their
encoded captions.

The scorers (`dit_prune.scorers`) call `model(x_t, timestep=t, class_labels=y)` on a
`CalibrationData`. For text, each image's "label" is the row of its caption in one caption
table (training captions, then held-out ones, then the empty caption as the null condition at
the label the scorers use for it, `num_embeds_ada_norm`); `text_conditioning(model, data)`
turns those labels back into `encoder_hidden_states` / `encoder_attention_mask` on every call.

Example:
    >>> data = text_calibration_data(pipe, train_images, train_captions,
    ...                              heldout_images, heldout_captions)  # doctest: +SKIP
    >>> with text_conditioning(pipe.transformer, data):  # doctest: +SKIP
    ...     scores = scorer.score(pipe.transformer, units, data.calibration_data(pipe.transformer))
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dit_prune.errors import DitPruneError
from dit_prune.legacy import family_name
from dit_prune.pipelines.vae import encode_images

SPLITS = ("train", "heldout")
TEXT_MASK_FAMILIES = ("PixArtTransformer2DModel", "SanaTransformer2DModel")


@dataclass(frozen=True)
class EncodedCaptions:
    """Text-encoder states of a list of captions, padded to one length."""

    embeds: torch.Tensor  # (N, L, D_txt)
    mask: torch.Tensor  # (N, L) 1 for real tokens, 0 for padding
    captions: tuple[str, ...]


@dataclass(frozen=True)
class TextCalibrationData:
    """Training and held-out images (transformer input space) with their encoded captions.

    `train_images[i]` goes with `train_text.embeds[i]`; likewise for held-out. `null_text` is
    the empty caption (PixArt's unconditional input), one row. `pixel_size` is the image side
    PixArt's resolution micro-conditions refer to (used only by models that take them).
    """

    train_images: torch.Tensor  # (N, C, h, w)
    train_text: EncodedCaptions
    heldout_images: torch.Tensor  # (M, C, h, w)
    heldout_text: EncodedCaptions
    null_text: EncodedCaptions
    pixel_size: int

    def __post_init__(self) -> None:
        for split in SPLITS:
            images, text = self.images(split), self.text(split)
            if len(images) == 0:
                raise DitPruneError(f"the {split} split of the calibration data is empty")
            if len(images) != len(text.embeds):
                raise DitPruneError(
                    f"{split}: {len(images)} images but {len(text.embeds)} captions"
                )

    def images(self, split: str) -> torch.Tensor:
        """Model-space images of `split` ('train' or 'heldout'), (N, C, h, w)."""
        return self.train_images if _split(split) == "train" else self.heldout_images

    def text(self, split: str) -> EncodedCaptions:
        return self.train_text if _split(split) == "train" else self.heldout_text

    def model_kwargs(
        self, split: str, index: torch.Tensor, unconditional: bool = False
    ) -> dict[str, Any]:
        """Keyword arguments (besides hidden_states, timestep) of a transformer call on the
        images `index` of `split`; with `unconditional` the empty caption replaces theirs."""
        index = torch.as_tensor(index, dtype=torch.long).flatten()  # (B,)
        text = self.null_text if unconditional else self.text(split)
        rows = torch.zeros_like(index) if unconditional else index  # (B,)
        embeds = text.embeds[rows]  # (B, L, D_txt)
        return {
            "encoder_hidden_states": embeds,
            "encoder_attention_mask": text.mask[rows],  # (B, L)
            "added_cond_kwargs": self.micro_conditions(len(index), embeds),
        }

    def micro_conditions(self, batch: int, like: torch.Tensor) -> dict[str, Any]:
        """PixArt's resolution / aspect-ratio inputs (None unless the model uses them)."""
        size = torch.full((batch, 2), float(self.pixel_size), dtype=like.dtype, device=like.device)
        aspect = torch.ones(batch, 1, dtype=like.dtype, device=like.device)  # (B, 1)
        return {"resolution": size, "aspect_ratio": aspect}  # (B, 2), (B, 1)

    def caption_table(self) -> EncodedCaptions:
        """Training captions, then held-out captions, then the empty caption (last row)."""
        texts = (self.train_text, self.heldout_text, self.null_text)
        width = max(t.embeds.shape[1] for t in texts)
        return EncodedCaptions(
            torch.cat([_pad(t.embeds, width) for t in texts]),  # (N + M + 1, L, D_txt)
            torch.cat([_pad(t.mask, width) for t in texts]),  # (N + M + 1, L)
            self.train_text.captions + self.heldout_text.captions + self.null_text.captions,
        )

    def calibration_data(self, model: nn.Module) -> Any:
        """A `dit_prune.scorers.CalibrationData` whose labels are caption labels of `model`
        (see module docstring); score inside `text_conditioning(model, self)`."""
        from dit_prune.scorers.calibration import CalibrationData

        null = null_label(model)
        n, m = len(self.train_images), len(self.heldout_images)
        rows = torch.arange(n + m)  # (N + M,)
        labels = rows + (rows >= null).long()  # (N + M,) caption row -> label, skipping null
        return CalibrationData(self.train_images, labels[:n], self.heldout_images, labels[n:])

    def to(self, device: str | torch.device) -> TextCalibrationData:
        """A copy with every tensor on `device`."""
        return TextCalibrationData(
            self.train_images.to(device), _text_to(self.train_text, device),
            self.heldout_images.to(device), _text_to(self.heldout_text, device),
            _text_to(self.null_text, device), self.pixel_size,
        )


def null_label(model: nn.Module) -> int:
    """The label scorers use for the unconditional input (the empty caption here)."""
    return int(getattr(model.config, "num_embeds_ada_norm", None) or 0)


@contextmanager
def text_conditioning(model: nn.Module, data: TextCalibrationData) -> Iterator[None]:
    """While inside, `model(x, timestep=t, class_labels=y)` runs with the captions of labels y.

    A forward pre-hook replaces `class_labels` by the caption rows' `encoder_hidden_states`,
    `encoder_attention_mask` and PixArt's micro-conditions; the null label gives the empty
    caption. Calls that pass `encoder_hidden_states` themselves are left alone. No hook stays
    behind on exit, even on error.
    """
    if family_name(model) not in TEXT_MASK_FAMILIES:
        raise DitPruneError(f"text conditioning needs a PixArt or Sana transformer, got "
                            f"{type(model).__name__} (others: dit_prune.pipelines."
                            "caption_labels)")
    param = next(model.parameters())
    table = data.caption_table()
    embeds = table.embeds.to(param.device, param.dtype)  # (R, L, D_txt)
    mask = table.mask.to(param.device)  # (R, L)
    pixart = family_name(model) == "PixArtTransformer2DModel"
    handle = model.register_forward_pre_hook(
        _caption_hook(data, embeds, mask, null_label(model), pixart), with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _caption_hook(data: TextCalibrationData, embeds: torch.Tensor, mask: torch.Tensor,
                  null: int, pixart: bool):
    last = len(embeds) - 1  # the empty caption's row

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        labels = kwargs.get("class_labels")  # (B,)
        if labels is None or kwargs.get("encoder_hidden_states") is not None:
            return None
        labels = labels.to(embeds.device)
        rows = torch.where(labels == null, last, labels - (labels > null).long())  # (B,)
        if bool(((rows < 0) | (rows > last)).any()):
            raise DitPruneError(f"caption label out of range: {int(labels.max())} "
                                f"({last} captions)")
        new = {k: v for k, v in kwargs.items() if k != "class_labels"}
        new["encoder_hidden_states"] = embeds[rows]  # (B, L, D_txt)
        new["encoder_attention_mask"] = mask[rows]  # (B, L)
        if pixart:
            new["added_cond_kwargs"] = data.micro_conditions(len(rows), embeds)
        return args, new

    return hook


@torch.no_grad()
def encode_captions(
    pipe: Any, captions: Sequence[str], max_sequence_length: int = 120
) -> EncodedCaptions:
    """Tokenize and encode `captions` with the pipeline's tokenizer and text encoder.

    Same padding and truncation as the pipeline itself (its own `encode_prompt`, no caption
    cleaning; PixArt and Sana, whose transformers take embeddings and a mask).
    """
    from dit_prune.pipelines.text_encoding import PIXART, SANA, CaptionCache, text_family

    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise DitPruneError("captions must be a list of strings")
    if not captions:
        raise DitPruneError("no captions to encode")
    if getattr(pipe, "text_encoder", None) is None or not hasattr(pipe, "encode_prompt"):
        raise DitPruneError(f"{type(pipe).__name__} has no text encoder to encode captions with")
    if text_family(pipe) not in (PIXART, SANA):
        raise DitPruneError(f"{type(pipe).__name__} also takes pooled projections: use "
                            "dit_prune.pipelines.caption_labels (CaptionLabels, "
                            "caption_conditioning) for it")
    cache = CaptionCache.build(pipe, list(captions), max_sequence_length)
    kwargs = cache.model_kwargs(cache.rows(list(captions)))
    return EncodedCaptions(kwargs["encoder_hidden_states"],  # (N, L, D_txt)
                           kwargs["encoder_attention_mask"], tuple(captions))  # (N, L)


def text_calibration_data(
    pipe: Any,
    train_images: torch.Tensor,
    train_captions: Sequence[str],
    heldout_images: torch.Tensor,
    heldout_captions: Sequence[str],
    max_sequence_length: int = 120,
) -> TextCalibrationData:
    """Encode images in [-1, 1] (N, 3, H, W) with the VAE and captions with the text encoder."""
    for name, images, captions in (("train", train_images, train_captions),
                                   ("heldout", heldout_images, heldout_captions)):
        if len(images) != len(captions):
            raise DitPruneError(f"{name}: {len(images)} images but {len(captions)} captions")
    device = pipe.transformer.device
    null = encode_captions(pipe, [""], max_sequence_length)
    return TextCalibrationData(
        train_images=encode_images(pipe, train_images),  # (N, C, h, w)
        train_text=encode_captions(pipe, train_captions, max_sequence_length),
        heldout_images=encode_images(pipe, heldout_images),  # (M, C, h, w)
        heldout_text=encode_captions(pipe, heldout_captions, max_sequence_length),
        null_text=null,
        pixel_size=int(train_images.shape[-1]),
    ).to(device)


def _split(split: str) -> str:
    if split not in SPLITS:
        raise DitPruneError(f"unknown split {split!r}; choose one of {SPLITS}")
    return split


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad dim 1 of a (N, L, ...) tensor to `width` (masks pad with 0 = no token)."""
    if x.shape[1] == width:
        return x
    pad = x.new_zeros((x.shape[0], width - x.shape[1], *x.shape[2:]))
    return torch.cat([x, pad], 1)


def _text_to(text: EncodedCaptions, device: str | torch.device) -> EncodedCaptions:
    return EncodedCaptions(text.embeds.to(device), text.mask.to(device), text.captions)
