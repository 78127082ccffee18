"""dit_prune: find the DiT heads and neurons that reproduce training images and prune them.

Public names are imported lazily from their modules (see docs/definitions.md#public-names).

Example:
    >>> import dit_prune
    >>> dit_prune.Unit("head", 0, 1)
    Unit(kind='head', block=0, index=1)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "load_dit": "dit_prune.checkpoint",
    "save_checkpoint": "dit_prune.checkpoint",
    "DitPruneError": "dit_prune.errors",
    "Unit": "dit_prune.units",
    "enumerate_units": "dit_prune.units",
    "ablate": "dit_prune.hooks",
    "capture": "dit_prune.hooks",
    "get_scorer": "dit_prune.scorers",
    "select_units": "dit_prune.pruning",
    "prune_units": "dit_prune.pruning",
    "save_pruned": "dit_prune.pruning",
    "sample_images": "dit_prune.sampling",
    "memorization_report": "dit_prune.metrics.memorization",
    "frechet_distance": "dit_prune.metrics.fid",
    "load_copy_detector": "dit_prune.metrics.copydetect",
    "copy_report": "dit_prune.metrics.copydetect",
    "prune_pipeline": "dit_prune.pipelines",
    "load_pruned_pipeline": "dit_prune.pipelines",
    "generate_decoded": "dit_prune.pipelines",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'dit_prune' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__() -> list[str]:
    return __all__
