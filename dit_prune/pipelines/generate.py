"""Decoded images from a diffusers pipeline, one random generator per image.

Memorization of a latent model is measured on decoded images, so generation goes through the
pipeline itself (its VAE, its text encoder) with `output_type="pt"`. Image i depends only on
(pipeline, condition i, seed i): each image has its own `torch.Generator`, and the default DDIM
sampler adds no step noise.

Example:
    >>> import diffusers
    >>> from dit_prune.models import new_dit
    >>> from dit_prune.pipelines import pixel_dit_pipeline
    >>> pipe = pixel_dit_pipeline(new_dit("tiny", 10, 8, 1), diffusers.DDPMScheduler())
    >>> images = generate_decoded(pipe, [3, 7], seeds=[0, 1], steps=2, guidance_scale=2.0)
    >>> images.shape, bool(images.min() >= 0 and images.max() <= 1)
    (torch.Size([2, 1, 8, 8]), True)
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from tqdm.auto import tqdm

from dit_prune.errors import DitPruneError
from dit_prune.pipelines.dit import dit_null_class, num_classes
from dit_prune.sampling import (
    check_guidance_scale,
    check_steps,
    make_sampling_scheduler,
    seed_generators,
)

SAMPLERS = ("ddim", "pipeline")  # a fresh DDIM from the pipeline's schedule, or its own scheduler


def pipeline_kind(pipe: Any) -> str:
    """'class' for class-conditional DiT pipelines, 'text' for text-to-image (PixArt-like)."""
    if getattr(pipe, "transformer", None) is None or getattr(pipe, "vae", None) is None:
        raise DitPruneError(
            f"unsupported pipeline {type(pipe).__name__}: needs a transformer and a vae"
        )
    if hasattr(pipe, "encode_prompt") and getattr(pipe, "text_encoder", None) is not None:
        return "text"
    if getattr(pipe.transformer.config, "num_embeds_ada_norm", None):
        return "class"
    raise DitPruneError(f"unsupported pipeline {type(pipe).__name__}: no labels or text encoder")


@torch.no_grad()
def generate_decoded(
    pipe: Any,
    conditions: Sequence[int] | Sequence[str] | torch.Tensor,
    seeds: Sequence[int],
    steps: int = 50,
    guidance_scale: float = 1.0,
    sampler: str = "ddim",
    batch_size: int = 64,
    progress: bool = False,
    **call_kwargs: Any,
) -> torch.Tensor:
    """Decoded images (N, C, H, W) in [0, 1] on the CPU, one per (condition, seed).

    `conditions` are class labels for a DiTPipeline and prompts for a text-to-image pipeline.
    Guided class-conditional calls use the model's own null class (`dit_null_class`).
    `sampler="ddim"` swaps in a DDIM scheduler built from the pipeline's noise schedule for the
    call (deterministic given the seeds); a flow-matching scheduler is kept (a fresh copy, its
    Euler steps are deterministic). `"pipeline"` keeps the pipeline's own scheduler (note
    that DiTPipeline draws stochastic step noise from the global RNG, not from the generators).
    Text-to-image calls get `text_call_defaults`; extra keyword arguments go to the pipeline
    call and override them.
    """
    kind = pipeline_kind(pipe)
    items = _conditions(pipe, kind, conditions)
    seeds = [int(s) for s in seeds]
    if len(items) != len(seeds):
        raise DitPruneError(f"{len(items)} conditions but {len(seeds)} seeds: need one per image")
    if not seeds:
        raise DitPruneError("no images requested: pass at least one condition and seed")
    if batch_size < 1:
        raise DitPruneError(f"batch_size must be >= 1, got {batch_size}")
    check_steps(steps, pipe.scheduler)  # in [1, the schedule's training steps]
    check_guidance_scale(guidance_scale)  # finite
    if sampler not in SAMPLERS:
        raise DitPruneError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    out: list[torch.Tensor] = []
    bar = tqdm(total=len(seeds), desc="generating", disable=not progress)
    with ExitStack() as stack:
        stack.enter_context(_quiet(pipe))
        if sampler == "ddim":
            ddim = make_sampling_scheduler(pipe.scheduler, "ddim", steps)
            stack.enter_context(_scheduler(pipe, ddim))
        if kind == "class" and guidance_scale > 1:
            stack.enter_context(dit_null_class(pipe))
        for start in range(0, len(seeds), batch_size):
            chunk = items[start : start + batch_size]
            gens = seed_generators(seeds[start : start + batch_size])
            images = _call(pipe, kind, chunk, gens, steps, guidance_scale, call_kwargs)
            out.append(images.float().cpu())  # (B, C, H, W) in [0, 1]
            bar.update(len(chunk))
    bar.close()
    return torch.cat(out)


def _conditions(pipe: Any, kind: str, conditions: Any) -> list[Any]:
    if kind == "text":
        if isinstance(conditions, str) or not all(isinstance(c, str) for c in conditions):
            raise DitPruneError("a text-to-image pipeline takes a list of prompt strings")
        return list(conditions)
    labels = _class_labels(pipe, conditions)  # (N,)
    classes = num_classes(pipe)
    bad = [label for label in labels if not 0 <= label < classes]
    if bad:
        raise DitPruneError(f"class labels must lie in [0, {classes - 1}], got {bad[:3]}")
    return labels


def _class_labels(pipe: Any, conditions: Any) -> list[int]:
    """`conditions` as a flat list of integer class labels; prompts (strings) or anything that
    is not whole numbers is a one-line DitPruneError saying what the pipeline takes.

    Example:
        >>> import diffusers
        >>> from dit_prune.models import new_dit
        >>> from dit_prune.pipelines import pixel_dit_pipeline
        >>> pipe = pixel_dit_pipeline(new_dit("tiny", 10, 8, 1), diffusers.DDIMScheduler())
        >>> _class_labels(pipe, ["a cat"])
        Traceback (most recent call last):
        ...
        dit_prune.errors.DitPruneError: DiTPipeline is class-conditional: it takes class labels \
(ints in [0, 9]), not prompts such as 'a cat'
    """
    takes = f"class labels (ints in [0, {num_classes(pipe) - 1}])"
    items = [conditions] if isinstance(conditions, str) else conditions
    if not isinstance(items, torch.Tensor):
        try:
            items = list(items)
        except TypeError:
            raise DitPruneError(f"{type(pipe).__name__} takes a list of {takes}, got "
                                f"{type(conditions).__name__}") from None
        prompt = next((c for c in items if isinstance(c, str)), None)
        if prompt is not None:
            raise DitPruneError(f"{type(pipe).__name__} is class-conditional: it takes {takes}, "
                                f"not prompts such as {prompt[:40]!r}")
    try:
        values = torch.as_tensor(items).flatten()  # (N,)
    except (TypeError, ValueError, RuntimeError):
        raise DitPruneError(f"{type(pipe).__name__} takes {takes}, got {conditions!r:.60}") \
            from None
    whole = not values.is_floating_point() or bool((values == values.round()).all())
    if values.is_complex() or values.dtype == torch.bool or not whole:
        raise DitPruneError(f"{type(pipe).__name__} takes {takes}, got {values.dtype} values")
    return values.long().tolist()


def _call(
    pipe: Any,
    kind: str,
    chunk: list[Any],
    gens: list[torch.Generator],
    steps: int,
    guidance_scale: float,
    call_kwargs: dict[str, Any],
) -> torch.Tensor:
    if kind == "class":
        return pipe(class_labels=chunk, guidance_scale=guidance_scale, generator=gens,
                    num_inference_steps=steps, output_type="pt", **call_kwargs).images
    options = {**text_call_defaults(pipe), **call_kwargs}
    return pipe(prompt=chunk, guidance_scale=guidance_scale, generator=gens,
                num_inference_steps=steps, output_type="pt", **options).images


def text_call_defaults(pipe: Any) -> dict[str, Any]:
    """Keyword arguments a text-to-image call gets unless the caller sets them, each only when
    the pipeline's `__call__` takes it: no caption cleaning and no resolution binning (PixArt,
    Sana), the model's own image side as height and width (Sana defaults to 1024 whatever the
    model), and the caption length `CaptionCache` encodes with (the tokenizer's when shorter).
    """
    from dit_prune.pipelines.text_encoding import _default_length, text_family

    params = inspect.signature(pipe.__call__).parameters
    options: dict[str, Any] = {"clean_caption": False, "use_resolution_binning": False}
    side = getattr(pipe.transformer.config, "sample_size", None)
    scale = getattr(pipe, "vae_scale_factor", None)
    if isinstance(side, int) and isinstance(scale, int):
        options["height"] = options["width"] = side * scale
    options["max_sequence_length"] = _default_length(pipe, text_family(pipe))
    return {k: v for k, v in options.items() if k in params}


@contextmanager
def _scheduler(pipe: Any, scheduler: Any) -> Iterator[None]:
    """Use `scheduler` for the duration of the block, then put the pipeline's own one back."""
    original = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield
    finally:
        pipe.scheduler = original


@contextmanager
def _quiet(pipe: Any) -> Iterator[None]:
    """Silence the pipeline's per-step progress bar, restoring the user's setting afterwards."""
    had = hasattr(pipe, "_progress_bar_config")
    saved = dict(pipe._progress_bar_config) if had else None
    pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        if had:
            pipe._progress_bar_config = saved
        else:
            del pipe._progress_bar_config
