"""Captions as labels: run a text-to-image transformer through the class-label code paths.

Sampling (`dit_prune.sampling`), the scorers and the re-trigger attack call
``model(x_t, timestep=t, class_labels=y)`` and use the model's null label (`num_embeds_ada_norm`,
1000 for PixArt, 0 for transformers without one) for the unconditional branch. `CaptionLabels`
numbers the captions of a `CaptionCache` so that they fit that scheme: caption row r gets label
r, skipping the null label (r + 1 from the null label on), and the empty caption gets the null
label. Inside `caption_conditioning(model, labels)` a forward pre-hook turns `class_labels` into
the family's text keywords (`CaptionCache.model_kwargs`), so guided sampling with the null label
is classifier-free guidance against the empty caption, as the pipelines themselves do.

Example:
    >>> import torch
    >>> from dit_prune.pipelines.digits_text import digits_text_pipeline
    >>> from dit_prune.pipelines.text_encoding import CaptionCache
    >>> pipe = digits_text_pipeline(layers=1, heads=2, head_dim=8)
    >>> labels = CaptionLabels.build(pipe, ["a red dog poster", "a handwritten digit one"])
    >>> labels.of(["a handwritten digit one", ""]).tolist()
    [1, 1000]
    >>> x = torch.zeros(2, 1, 8, 8)
    >>> with caption_conditioning(pipe.transformer, labels):
    ...     out = pipe.transformer(x, timestep=torch.tensor([5, 5]), class_labels=labels.of(
    ...         ["a red dog poster", ""])).sample
    >>> out.shape
    torch.Size([2, 1, 8, 8])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dit_prune.errors import DitPruneError
from dit_prune.models import null_label
from dit_prune.pipelines.text_encoding import CaptionCache


def model_null_label(model: nn.Module) -> int:
    """The label the class-label code paths use for "unconditional" with this model
    (`dit_prune.models.null_label`)."""
    return null_label(model)


@dataclass(frozen=True)
class CaptionLabels:
    """A caption cache and the null label of the model it conditions."""

    cache: CaptionCache
    null: int

    @classmethod
    def build(cls, pipe: Any, captions: Sequence[str],
              max_sequence_length: int | None = None) -> CaptionLabels:
        """Encode the distinct `captions` (and "") with the pipeline's own text encoder."""
        cache = CaptionCache.build(pipe, captions, max_sequence_length)
        return cls(cache, model_null_label(pipe.transformer))

    @property
    def num_labels(self) -> int:
        """Labels of real captions run over [0, num_labels], the null label excepted."""
        return self.cache.null_row

    def of(self, captions: Sequence[str]) -> torch.Tensor:
        """The label of each caption (N,); "" gets the null label."""
        return self.from_rows(self.cache.rows(captions))

    def from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        rows = torch.as_tensor(rows, dtype=torch.long)
        labels = rows + (rows >= self.null).long()  # (N,) skip the null label
        return torch.where(rows == self.cache.null_row, self.null, labels)

    def rows(self, labels: torch.Tensor) -> torch.Tensor:
        """Inverse of `from_rows`: caption rows (N,) of labels (N,); out of range is an error."""
        labels = torch.as_tensor(labels, dtype=torch.long)
        rows = torch.where(labels == self.null, self.cache.null_row,
                           labels - (labels > self.null).long())  # (N,)
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) > self.cache.null_row):
            raise DitPruneError(f"caption label out of range: {labels.tolist()[:4]} "
                                f"({self.cache.null_row} captions)")
        return rows

    def caption(self, label: int) -> str:
        return self.cache.captions[int(self.rows(torch.tensor([label]))[0])]

    def to(self, device: str | torch.device) -> CaptionLabels:
        return CaptionLabels(self.cache.to(device), self.null)


FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale, fed to guidance-distilled models


@contextmanager
def caption_conditioning(model: nn.Module, labels: CaptionLabels) -> Iterator[None]:
    """While inside, ``model(x, timestep=t, class_labels=y)`` runs with the captions of y.

    Calls that pass `encoder_hidden_states` themselves are left alone. A Flux transformer, which
    takes packed tokens, gets x (B, 4C, h, w) in the space of `flux_model_space` as its packed
    tokens (B, h·w, 4C) with their image ids, the time as σ (t / 1000, as `FluxPipeline` passes
    it) and, when guidance-distilled, `FLUX_GUIDANCE`; its output comes back as (B, 4C, h, w).
    The hooks are removed on exit, even on error.
    """
    param = next(model.parameters())
    table = labels.to(param.device)
    flux = type(model).__name__ == "FluxTransformer2DModel"
    handles = [model.register_forward_pre_hook(_hook(table, flux, model), with_kwargs=True)]
    if flux:
        handles.append(model.register_forward_hook(_unpack_hook, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def flux_model_space(latents: torch.Tensor) -> torch.Tensor:
    """Flux latents (B, C, H, W) -> (B, 4C, H/2, W/2): each 2×2 patch as channels, in the
    order `FluxPipeline._pack_latents` packs them (c·4 + 2·i + j), so a Flux transformer's
    tokens are these pixels flattened row by row. Use it on `encode_images` output before
    scoring a Flux pipeline."""
    return torch.nn.functional.pixel_unshuffle(latents, 2)  # (B, 4C, H/2, W/2)


def _hook(labels: CaptionLabels, flux: bool, model: nn.Module):
    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        y = kwargs.get("class_labels")  # (B,)
        if y is None or kwargs.get("encoder_hidden_states") is not None:
            return None
        new = {k: v for k, v in kwargs.items() if k != "class_labels"}
        new.update(labels.cache.model_kwargs(labels.rows(y)))
        if flux:
            args, new = _pack(args, new, model)
        return args, new

    return hook


def _pack(args: tuple, kwargs: dict, model: nn.Module) -> tuple[tuple, dict]:
    """Flux inputs from an image-shaped call (see `caption_conditioning`)."""
    x = args[0] if args else kwargs.pop("hidden_states")  # (B, 4C, h, w)
    b, c, h, w = x.shape
    tokens = x.flatten(2).transpose(1, 2)  # (B, h*w, 4C)
    ids = torch.zeros(h, w, 3, device=x.device, dtype=x.dtype)
    ids[..., 1] += torch.arange(h, device=x.device, dtype=x.dtype)[:, None]
    ids[..., 2] += torch.arange(w, device=x.device, dtype=x.dtype)[None, :]
    t = torch.as_tensor(kwargs["timestep"], device=x.device).float()
    kwargs = {**kwargs, "hidden_states": tokens, "img_ids": ids.reshape(h * w, 3),
              "timestep": t.expand(b) / 1000}
    if getattr(model.config, "guidance_embeds", False):
        kwargs["guidance"] = torch.full((b,), FLUX_GUIDANCE, device=x.device)
    return args[1:], kwargs


def _unpack_hook(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """Flux output tokens (B, h·w, 4C) back to (B, 4C, h, w) for hooked (packed) calls."""
    ids = kwargs.get("img_ids")
    sample = output[0] if isinstance(output, tuple) else output.sample
    if ids is None or sample.ndim != 3:
        return None
    h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    image = sample.transpose(1, 2).reshape(sample.shape[0], -1, h, w)  # (B, 4C, h, w)
    if isinstance(output, tuple):
        return (image, *output[1:])
    return type(output)(sample=image)
