"""Quality-aware scoring: penalize units whose removal hurts a quality proxy.

The proxy is the held-out denoising loss over all diffusion times (t uniform in [0, T)), where a
model that generalizes is judged: harm(u) = first-order rise of that loss when u is removed
(the `taylor-gap` machinery, one backward per batch). With ``quality_weight = w > 0`` a scorer
returns ``normalize(raw) - w * normalize(harm)``, both normalized by the same per-kind method,
so a unit that drives copying but also carries general denoising is kept.

Example:
    >>> from dit_prune.scorers import get_scorer
    >>> get_scorer("taylor-gap", quality_weight=0.5).options.quality_weight
    0.5
"""

from __future__ import annotations

from dataclasses import replace

import torch

from dit_prune.scorers.base import ScoringContext
from dit_prune.scorers.calibration import HELDOUT
from dit_prune.scorers.options import TimestepDistribution
from dit_prune.units import Unit

QUALITY_TIMESTEPS = "uniform"


def quality_harm(ctx: ScoringContext, units: list[Unit]) -> torch.Tensor:
    """(U,) float64: first-order rise of the held-out denoising loss (t uniform) per unit."""
    from dit_prune.scorers.taylor import loss_rise

    uniform = replace(ctx, timesteps=TimestepDistribution.parse(QUALITY_TIMESTEPS))
    return loss_rise(uniform, units, HELDOUT).to(torch.float64)
