"""Scorers: rank every head and MLP neuron by how much it drives copying.

`get_scorer(name, **options)` returns a scorer; ``scorer.score(model, units, data)`` gives a
(U,) tensor aligned with `units`, higher = contributes more to memorization = prune first.
Options are the shared `ScorerOptions` fields plus the scorer's own (see docs/scorers.md).

Example:
    >>> from dit_prune.data import digits_split
    >>> from dit_prune.models import new_dit
    >>> from dit_prune.units import enumerate_units
    >>> s = digits_split()
    >>> data = CalibrationData(s.pool_images[:8], s.pool_labels[:8],
    ...                        s.heldout_images[:8], s.heldout_labels[:8])
    >>> model = new_dit("tiny", 10, 8, 1)
    >>> scorer = get_scorer("ye2025", batches=1, progress=False)
    >>> scorer.score(model, enumerate_units(model, ["head"]), data).shape
    torch.Size([16])
    >>> sorted(SCORERS)[:3]
    ['ablation-gap', 'activation-contrast', 'cond-gap']
"""

from __future__ import annotations

from dataclasses import fields
from types import MappingProxyType
from typing import Any

from dit_prune.errors import DitPruneError
from dit_prune.scorers.ablation import AblationGap
from dit_prune.scorers.base import Scorer, ScoreResult, ScoringContext
from dit_prune.scorers.baselines import Magnitude, Random
from dit_prune.scorers.calibration import CalibrationData
from dit_prune.scorers.condgap import CondGap
from dit_prune.scorers.contrast import ActivationContrast
from dit_prune.scorers.given import Given
from dit_prune.scorers.io import SavedScores, load_scores, save_scores, scoring_code_fingerprint
from dit_prune.scorers.iterative import Iterative
from dit_prune.scorers.learned_gates import LearnedGates
from dit_prune.scorers.normalize import NORMALIZATIONS, normalize_scores
from dit_prune.scorers.options import ScorerOptions, TimestepDistribution
from dit_prune.scorers.sensitivity import Sensitivity
from dit_prune.scorers.taylor import TaylorGap, Ye2025

__all__ = [
    "NORMALIZATIONS", "SCORERS", "CalibrationData", "SavedScores", "ScoreResult", "Scorer",
    "ScorerOptions", "ScoringContext", "TimestepDistribution", "get_scorer", "load_scores",
    "normalize_scores", "save_scores", "scoring_code_fingerprint",
]

SCORERS: MappingProxyType[str, type[Scorer]] = MappingProxyType({
    cls.name: cls
    for cls in (TaylorGap, AblationGap, ActivationContrast, CondGap, Ye2025, Sensitivity,
                Magnitude, Random, LearnedGates, Iterative, Given)
})
SHARED_OPTIONS = tuple(f.name for f in fields(ScorerOptions))


def get_scorer(name: str, **options: Any) -> Scorer:
    """The scorer `name` configured with shared options (ScorerOptions) and its own options."""
    if name not in SCORERS:
        raise DitPruneError(f"unknown scorer {name!r}; choose one of {', '.join(SCORERS)}")
    cls = SCORERS[name]
    own = scorer_options(name)
    unknown = sorted(set(options) - set(SHARED_OPTIONS) - set(own))
    if unknown:
        valid = ", ".join(SHARED_OPTIONS + own)
        raise DitPruneError(f"unknown option(s) {unknown} for scorer {name!r} (valid: {valid})")
    shared = ScorerOptions(**{k: v for k, v in options.items() if k in SHARED_OPTIONS})
    try:
        return cls(options=shared, **{k: v for k, v in options.items() if k in own})
    except TypeError as exc:
        raise DitPruneError(f"bad options for scorer {name!r}: {exc}") from None


def scorer_options(name: str) -> tuple[str, ...]:
    """Names of the options specific to scorer `name` (besides the shared ones)."""
    return tuple(f.name for f in fields(SCORERS[name]) if f.name != "options")
