"""Score and structurally prune the transformer of a diffusers pipeline, in place or in a copy.

After pruning, the transformer's config carries its pruned structure under
`dit_prune_structure` (the key `save_checkpoint` / `build_transformer` use), so
`pipe.save_pretrained(path)` writes a directory that `load_pruned_pipeline(path)` rebuilds.
The config's own `num_attention_heads` etc. keep describing the unpruned base model.

Example:
    >>> import diffusers
    >>> from dit_prune.models import new_dit
    >>> from dit_prune.pipelines import pixel_dit_pipeline
    >>> from dit_prune.units import Unit
    >>> pipe = pixel_dit_pipeline(new_dit("tiny", 10, 8, 1), diffusers.DDIMScheduler())
    >>> pruned = prune_pipeline(pipe, [Unit("head", 0, 1)])
    >>> pruned.transformer.transformer_blocks[0].attn1.heads, pipe.transformer is pruned.transformer
    (3, False)
    >>> pruned.transformer.config.dit_prune_structure["heads"]
    [3, 4, 4, 4]
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import FrozenDict

from dit_prune.checkpoint import STRUCTURE_KEY
from dit_prune.errors import DitPruneError
from dit_prune.models import disable_block_label_dropout
from dit_prune.structure import is_uniform, read_structure
from dit_prune.units import Unit, adapter_for, enumerate_units


@dataclass(frozen=True)
class PipelinePruneResult:
    """What `score_and_prune_pipeline` did: the pruned pipeline, the units it removed, the
    scores of every candidate unit (aligned with `candidates`) and the structural plan."""

    pipeline: Any
    removed: tuple[Unit, ...]
    candidates: tuple[Unit, ...]
    scores: torch.Tensor  # (U,) higher = contributes more to memorization
    plan: Any  # dit_prune.pruning PrunePlan


def copy_pipeline(pipe: Any) -> Any:
    """A pipeline of the same class with a deep copy of the transformer and a fresh scheduler.

    The other components (VAE, text encoder, tokenizer) are shared, not copied: they are never
    modified by pruning, and sharing them saves memory. The copy keeps the directory the
    pipeline was loaded from (`io.pipeline_source`: what `save_pipeline` never writes into).
    """
    from dit_prune.pipelines.io import pipeline_source, remember_source

    transformer = _transformer(pipe)
    components = dict(pipe.components)
    components["transformer"] = copy.deepcopy(transformer)
    scheduler = components.get("scheduler")
    if scheduler is not None:
        components["scheduler"] = type(scheduler).from_config(scheduler.config)
    twin = type(pipe)(**components)
    if hasattr(pipe, "labels"):  # DiTPipeline's id2label mapping is not a component
        twin.labels = dict(pipe.labels)
    if hasattr(pipe, "_progress_bar_config"):
        twin.set_progress_bar_config(**pipe._progress_bar_config)
    return remember_source(twin, pipeline_source(pipe))


def prune_pipeline(pipe: Any, units: Iterable[Unit], inplace: bool = False) -> Any:
    """Remove `units` structurally from the pipeline's transformer; returns the pipeline.

    With `inplace=False` (default) the input pipeline is left untouched and a copy (see
    `copy_pipeline`) is pruned and returned. Units use the unpruned numbering, so an already
    pruned pipeline can be pruned again. The returned transformer has diffusers' per-block label
    dropout switched off (a DiT from plain `DiTPipeline.from_pretrained` has it on), as every
    DiT `load_dit` returns, so recovery trains it with one label dropout per example.
    """
    from dit_prune.pruning import prune_units

    units = list(units)
    _transformer(pipe)
    if not units:
        raise DitPruneError("no units to prune: pass at least one Unit")
    target = pipe if inplace else copy_pipeline(pipe)
    prune_units(target.transformer, units)
    sync_structure_config(target.transformer)
    disable_block_label_dropout(target.transformer)  # ready for distill / finetune
    return target


def score_and_prune_pipeline(
    pipe: Any,
    scorer: Any,
    budget: float,
    data: Any,
    kinds: Sequence[str] | None = None,
    inplace: bool = False,
    **select_options: Any,
) -> PipelinePruneResult:
    """Score every unit of `kinds` with `scorer` on `data`, select `budget`, prune.

    `kinds` defaults to the family's own prunable kinds (`adapter_for(model).default_kinds`:
    head and neuron for DiT and PixArt, joint_head ... single_neuron for Flux; docs/families.md);
    a kind the family lacks is a one-line DitPruneError naming the family's kinds.

    `scorer` is a name for `dit_prune.get_scorer` or an object with
    `score(model, units, data) -> Tensor`. `data` is what the scorer consumes, with images in
    the transformer's input space: use `encode_images` for a latent class-conditional DiT and
    `text_calibration_data` for PixArt (scored through `text_conditioning`). Extra keyword
    arguments go to `select_units`; its budget mode defaults here to ``both`` (the budget of
    every kind in `kinds`: the kinds scored are the kinds pruned).
    """
    from dit_prune.pruning import prune_units, select_units

    model = _transformer(pipe)
    if isinstance(scorer, str):
        from dit_prune.scorers import get_scorer

        scorer = get_scorer(scorer)
    if not hasattr(scorer, "score"):
        raise DitPruneError(f"scorer must be a name or have .score(), got {type(scorer).__name__}")
    candidates = enumerate_units(model, kinds)  # kinds None: the family's default kinds
    scores = score_units(pipe, scorer, candidates, data)  # (U,)
    select_options.setdefault("model", model)
    select_options.setdefault("mode", "both")
    chosen = list(select_units(candidates, scores, budget, **select_options))
    target = pipe if inplace else copy_pipeline(pipe)
    plan = prune_units(target.transformer, chosen)
    sync_structure_config(target.transformer)
    disable_block_label_dropout(target.transformer)  # ready for distill / finetune
    return PipelinePruneResult(target, tuple(sorted(chosen)), tuple(candidates), scores, plan)


def score_units(pipe: Any, scorer: Any, units: Sequence[Unit], data: Any) -> torch.Tensor:
    """`scorer.score` on the pipeline's transformer: (U,) aligned with `units`.

    A `TextCalibrationData` is turned into caption-labelled scorer data and scored with the
    captions plugged in (`text_conditioning`). Scorers that take a `scheduler` get the
    pipeline's, so noise levels follow the pipeline's schedule.
    """
    from dit_prune.pipelines.text import TextCalibrationData, text_conditioning

    model = _transformer(pipe)
    extra = {}
    if "scheduler" in inspect.signature(scorer.score).parameters:
        extra["scheduler"] = pipe.scheduler
    if isinstance(data, TextCalibrationData):
        with text_conditioning(model, data):
            raw = scorer.score(model, list(units), data.calibration_data(model), **extra)
    else:
        raw = scorer.score(model, list(units), data, **extra)
    scores = torch.as_tensor(raw).flatten()  # (U,)
    if len(scores) != len(units):
        raise DitPruneError(f"scorer returned {len(scores)} scores for {len(units)} units")
    return scores


def sync_structure_config(model: Any) -> None:
    """Record the model's pruned structure in its config (and drop a stale one when unpruned)."""
    adapter_for(model)
    if is_uniform(model):
        if STRUCTURE_KEY in model.config:
            model._internal_dict = FrozenDict(
                {k: v for k, v in model.config.items() if k != STRUCTURE_KEY}
            )
        return
    model.register_to_config(**{STRUCTURE_KEY: read_structure(model)})


def _transformer(pipe: Any) -> Any:
    model = getattr(pipe, "transformer", None)
    if model is None:
        raise DitPruneError(f"{type(pipe).__name__} has no transformer to prune")
    adapter_for(model)
    return model
