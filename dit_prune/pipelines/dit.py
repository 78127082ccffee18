"""Class-conditional DiT pipelines: pixel-space ones from our checkpoints, and the null class.

diffusers' `DiTPipeline` hard-codes the unconditional label as 1000 (ImageNet). A DiT with N
classes has its null class at index N (`num_embeds_ada_norm`); `dit_null_class` makes guided
calls of the stock pipeline use it.

Example:
    >>> import diffusers, torch
    >>> from dit_prune.models import new_dit
    >>> pipe = pixel_dit_pipeline(new_dit("tiny", 10, 8, 1), diffusers.DDIMScheduler())
    >>> pipe.set_progress_bar_config(disable=True)
    >>> gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    >>> with dit_null_class(pipe):
    ...     out = pipe([3, 7], guidance_scale=2.0, generator=gens, num_inference_steps=2,
    ...                output_type="pt")
    >>> out.images.shape
    torch.Size([2, 1, 8, 8])
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import DiTPipeline
from torch import nn

from dit_prune.errors import DitPruneError
from dit_prune.legacy import family_name
from dit_prune.models import disable_block_label_dropout
from dit_prune.pipelines.vae import IdentityVAE

DIFFUSERS_NULL_CLASS = 1000  # what DiTPipeline puts in the unconditional half of a guided batch


def pixel_dit_pipeline(transformer: nn.Module, scheduler: Any) -> DiTPipeline:
    """A stock `DiTPipeline` around a pixel-space DiT, decoding with `IdentityVAE`.

    diffusers' per-block label dropout is switched off on `transformer` (as `load_dit` does).
    """
    if family_name(transformer) != "DiTTransformer2DModel":
        raise DitPruneError(f"expected a DiTTransformer2DModel, got {type(transformer).__name__}")
    disable_block_label_dropout(transformer)
    param = next(transformer.parameters())
    vae = IdentityVAE().to(param.device)
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)


def dit_pipeline_from_checkpoint(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> DiTPipeline:
    """Load one of our checkpoints (pruned or not) with `load_dit` and wrap it in a DiTPipeline.

    A directory with `model_index.json` and a `vae/` keeps its VAE (via `load_pruned_pipeline`);
    a transformer + scheduler directory becomes a pixel-space pipeline with `IdentityVAE`.
    """
    from dit_prune.checkpoint import load_dit
    from dit_prune.pipelines.io import load_pruned_pipeline, remember_source

    if os.path.isfile(os.path.join(path, "model_index.json")):
        return load_pruned_pipeline(path, device=device)
    model, scheduler, _ = load_dit(path, device=device)
    return remember_source(pixel_dit_pipeline(model, scheduler), path)  # save_pipeline's input


def num_classes(pipe: Any) -> int:
    """Number of real classes of a class-conditional pipeline's transformer."""
    classes = getattr(pipe.transformer.config, "num_embeds_ada_norm", None)
    if not classes:
        raise DitPruneError(f"{type(pipe.transformer).__name__} is not class-conditional")
    return int(classes)


@contextmanager
def dit_null_class(pipe: Any) -> Iterator[None]:
    """While inside, guided `DiTPipeline` calls use the model's own null class, not 1000.

    DiTPipeline builds a guided batch as [labels, 1000 x B]; a hook on the transformer rewrites
    label 1000 to `num_embeds_ada_norm` (for fewer than 1000 classes 1000 is no real class). With
    more than 1000 classes, where 1000 is a real class, only a second half made entirely of 1000
    is rewritten: use it around guided calls only. Nothing stays behind on exit.
    """
    null = num_classes(pipe)
    if null == DIFFUSERS_NULL_CLASS:
        yield
        return
    handle = pipe.transformer.register_forward_pre_hook(_null_class_hook(null), with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _null_class_hook(null: int):
    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        labels = kwargs.get("class_labels")  # (2B,) when guided
        if labels is None:
            return None
        if null < DIFFUSERS_NULL_CLASS:  # 1000 is no real class here: rewrite it (no sync)
            fixed = torch.where(labels == DIFFUSERS_NULL_CLASS, null, labels)  # (2B,)
            return args, {**kwargs, "class_labels": fixed}
        half = len(labels) // 2
        if len(labels) % 2 or not bool((labels[half:] == DIFFUSERS_NULL_CLASS).all()):
            return None
        fixed = labels.clone()  # (2B,)
        fixed[half:] = null
        return args, {**kwargs, "class_labels": fixed}

    return hook
