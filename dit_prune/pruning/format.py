"""The pruned-model format: a checkpoint directory plus `plan.json`.

Layout (everything written in a temporary sibling and renamed into place):

    OUT/
      transformer/config.json                       # diffusers config + `dit_prune_structure`
      transformer/diffusion_pytorch_model.safetensors
      scheduler/scheduler_config.json               # when a scheduler is given
      dit_prune.json                                # metadata (`extra`), when given
      plan.json                                     # what was removed and from which base

`load_dit(OUT)` rebuilds the model from the config alone (no base checkpoint needed);
`load_pruned(OUT)` does the same and also checks `plan.json` against the rebuilt model.

Example:
    >>> from dit_prune.models import new_dit
    >>> from dit_prune.units import Unit
    >>> from dit_prune.pruning.structural import prune_units
    >>> model = new_dit("tiny", 10, 8, 1)
    >>> plan = prune_units(model, [Unit("head", 1, 0)])
    >>> out = save_pruned(model, "/tmp/pruned-example", plan=plan, overwrite=True)
    >>> (loaded, info) = load_pruned(out)
    >>> info["removed"]
    [['head', 1, 0]]
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dit_prune.checkpoint import (
    LoadedDiT,
    atomic_directory,
    atomic_write_text,
    load_dit,
    save_checkpoint,
)
from dit_prune.errors import DitPruneError
from dit_prune.legacy import family_name
from dit_prune.pruning.structural import PrunePlan, count_parameters
from dit_prune.structure import original_counts
from dit_prune.units import Unit, adapter_for

PLAN_NAME = "plan.json"
PLAN_FORMAT = "dit_prune.pruned/1"


def describe_pruning(
    model: nn.Module,
    plans: Sequence[PrunePlan] = (),
    base_hash: str | None = None,
) -> dict[str, Any]:
    """The contents of plan.json: every unit missing from `model`, its origin and the plans."""
    adapter = adapter_for(model)
    full = original_counts(model)
    blocks = adapter.blocks(model)
    removed: list[Unit] = []
    for kind, per_block in full.items():
        for b, count in enumerate(per_block):
            kept = set(adapter.kept(blocks[b], kind))
            removed.extend(Unit(kind, b, i) for i in range(count) if i not in kept)
    counts: dict[str, int] = {}
    for unit in removed:
        counts[unit.kind] = counts.get(unit.kind, 0) + 1
    return {
        "format": PLAN_FORMAT,
        "model_class": family_name(model),  # a legacy Transformer2DModel as diffusers maps it
        "base_sha256": base_hash,
        "original_counts": full,
        "removed": [u.to_json() for u in sorted(removed)],
        "counts": counts,
        "params": count_parameters(model),
        "plans": [p.to_json() for p in plans],
    }


def save_pruned(
    model: nn.Module,
    path: str | os.PathLike[str],
    scheduler: Any = None,
    plan: PrunePlan | Sequence[PrunePlan] | None = None,
    base_hash: str | None = None,
    overwrite: bool = False,
    extra: Mapping[str, Any] | None = None,
    files: Mapping[str, str] | None = None,
    on_staged: Callable[[Path], None] | None = None,
) -> Path:
    """Write a pruned (or unpruned) model as a self-describing directory; returns its path.

    `plan` is the PrunePlan (or the list of plans, oldest first) that led here; `base_hash` the
    SHA-256 of the base checkpoint's weights; `extra` goes to dit_prune.json; `files` are extra
    text files (name -> text) and `on_staged(tmp_dir)` may add more before the rename.
    A non-empty target is refused unless `overwrite`.
    """
    plans = [plan] if isinstance(plan, PrunePlan) else list(plan or [])
    description = describe_pruning(model, plans, base_hash)
    target = Path(path)
    with atomic_directory(target, overwrite) as tmp:
        staged = save_checkpoint(model, scheduler, tmp / "checkpoint", extra=dict(extra or {}))
        for child in staged.iterdir():
            child.rename(tmp / child.name)
        staged.rmdir()
        atomic_write_text(tmp / PLAN_NAME, json.dumps(description, indent=2))
        for name, text in (files or {}).items():
            atomic_write_text(tmp / name, text)
        if on_staged is not None:
            on_staged(tmp)
    return target


def load_pruned(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[LoadedDiT, dict[str, Any] | None]:
    """`load_dit(path)` plus its checked plan.json (None when the directory has none)."""
    loaded = load_dit(path, device=device)
    plan_file = Path(path) / PLAN_NAME
    info = read_plan(plan_file, loaded.model) if plan_file.is_file() else None
    return loaded, info


def read_plan(path: str | os.PathLike[str], model: nn.Module | None = None) -> dict[str, Any]:
    """Read plan.json; with `model`, check that it names exactly the units the model lacks."""
    file = Path(path)
    try:
        info = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DitPruneError(f"cannot read pruning plan {file}: {exc}") from None
    if not isinstance(info, dict) or info.get("format") != PLAN_FORMAT:
        raise DitPruneError(f"{file} is not a dit_prune plan (format {PLAN_FORMAT!r} expected)")
    try:
        removed = [Unit.from_json(u) for u in info["removed"]]
        full = {str(k): [int(c) for c in v] for k, v in dict(info["original_counts"]).items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise DitPruneError(f"malformed pruning plan {file}: {type(exc).__name__}: {exc}") from None
    for unit in removed:
        counts = full.get(unit.kind)
        if counts is None or unit.block >= len(counts) or unit.index >= counts[unit.block]:
            raise DitPruneError(f"{file} names {unit}, which the unpruned model does not have")
    if model is not None:
        _check_against_model(file, model, removed, full)
    return info


def _check_against_model(
    file: Path, model: nn.Module, removed: list[Unit], full: dict[str, list[int]]
) -> None:
    if original_counts(model) != full:
        raise DitPruneError(f"{file}: original unit counts disagree with the model's config")
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    for kind, per_block in full.items():
        for b, count in enumerate(per_block):
            kept = set(adapter.kept(blocks[b], kind))
            gone = {u.index for u in removed if u.kind == kind and u.block == b}
            if kept & gone or (kept | gone) != set(range(count)):
                raise DitPruneError(
                    f"{file}: removed {kind}s of block {b} disagree with the model's structure"
                )
