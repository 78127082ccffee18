"""`iterative`: re-score after each removal, so units that stand in for each other are seen.

Round r (r = 1..`rounds`): the units picked so far are ablated (`hooks.ablate`, inside a context
manager, so the model is untouched afterwards), the `inner` scorer scores the remaining units,
and its `group` highest-scoring ones are picked. A one-shot scorer judges every unit with all the
others in place; after a unit is gone, a unit that was its stand-in now carries the effect alone,
and the next round sees it (greedy forward selection on the inner scorer's quantity, as in
iterative pruning, e.g. Molchanov et al. 2017 "Pruning Convolutional Neural Networks for
Resource Efficient Inference", which re-ranks after each removal).

Scores encode the pick order: the first pick gets U, the next U - 1, ..., and the units never
picked follow in their last round's order. So `select_units` with any budget of at most
rounds * group units takes exactly the first picks (per kind for kind budgets; across kinds when
one budget covers several, the inner scorer's normalized scores decided). `raw` holds each
unit's inner score in the round it was picked (the last round's for the rest). Shared options
(timesteps, batches, seed, normalize, quality_weight, ...) go to the inner scorer unchanged;
`inner_options` holds the inner scorer's own options (a dict; on the command line
``--option inner_options='{"order": 2}'``). Cost: `rounds` runs of the inner scorer.

Example:
    >>> from dit_prune.data import digits_split
    >>> from dit_prune.models import new_dit
    >>> from dit_prune.scorers import CalibrationData, get_scorer
    >>> from dit_prune.units import enumerate_units
    >>> s = digits_split()
    >>> data = CalibrationData(s.pool_images[:4], s.pool_labels[:4],
    ...                        s.heldout_images[:4], s.heldout_labels[:4])
    >>> model = new_dit("tiny", 10, 8, 1)
    >>> scorer = get_scorer("iterative", inner="taylor-gap", rounds=2, batches=1, progress=False)
    >>> scores = scorer.score(model, enumerate_units(model, ["head"]), data)
    >>> sorted(scores.tolist(), reverse=True)[:3]  # first pick 16, second 15, then the rest
    [16.0, 15.0, 14.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from dit_prune.errors import DitPruneError
from dit_prune.hooks import ablate
from dit_prune.scorers.base import Scorer, ScoreResult, scoring_mode
from dit_prune.scorers.calibration import CalibrationData
from dit_prune.units import Unit


@dataclass(frozen=True)
class Iterative(Scorer):
    """Greedy re-scoring: pick `group` units per round with the picked ones ablated."""

    name: ClassVar[str] = "iterative"
    inner: str = "taylor-gap"  # the scorer run in every round
    group: int = 1  # units picked per round
    rounds: int = 4  # rounds; rounds * group units are picked in order
    inner_options: dict[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        for key in ("group", "rounds"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DitPruneError(f"{key} must be a positive integer, got {value!r}")
        if self.inner_options is not None and not isinstance(self.inner_options, dict):
            raise DitPruneError(f"inner_options must be a dict of the inner scorer's options, "
                                f"got {self.inner_options!r}")
        self.inner_scorer()  # validates inner and inner_options (one-line errors)

    @property
    def kinds(self) -> tuple[str, ...]:  # type: ignore[override]
        from dit_prune.scorers import SCORERS

        return SCORERS[self.inner].kinds

    @property
    def default_timesteps(self) -> str:  # type: ignore[override]
        from dit_prune.scorers import SCORERS

        return SCORERS[self.inner].default_timesteps

    def inner_scorer(self) -> Scorer:
        """The inner scorer with the shared options (device: kept where the wrapper puts it)."""
        from dit_prune.scorers import SCORERS, SHARED_OPTIONS, get_scorer

        if not isinstance(self.inner, str) or self.inner not in SCORERS or self.inner == self.name:
            choices = ", ".join(n for n in SCORERS if n != self.name)
            raise DitPruneError(f"inner scorer must be one of {choices}, got {self.inner!r}")
        own = dict(self.inner_options or {})
        shared = sorted(set(own) & set(SHARED_OPTIONS))
        if shared:
            raise DitPruneError(f"inner_options {shared} are shared options: give them to the "
                                "iterative scorer itself")
        options = replace(self.options, device=None).to_json()
        return get_scorer(self.inner, **options, **own)

    def compute(self, model: nn.Module, units: Sequence[Unit], data: CalibrationData,
                scheduler: Any = None) -> ScoreResult:
        """Scores encoding the pick order (first pick highest); raw = inner score when picked."""
        units = self._check(model, units, data)
        if len(set(units)) != len(units):
            raise DitPruneError("units contain duplicates; each unit needs exactly one score")
        picks = self.rounds * self.group
        if picks > len(units):
            raise DitPruneError(f"rounds * group = {picks} exceeds the {len(units)} units scored")
        inner = self.inner_scorer()
        order: list[Unit] = []
        raw: dict[Unit, float] = {}
        with scoring_mode(model, self.options.device):
            for _ in range(self.rounds):
                remaining = [u for u in units if u not in raw]
                with ablate(model, order):
                    result = inner.compute(model, remaining, data, scheduler)
                values = result.scores.numpy()  # (R,)
                ranked = np.argsort(-values, kind="stable")  # highest first; ties: unit order
                for i in ranked[: self.group]:
                    order.append(remaining[int(i)])
                    raw[remaining[int(i)]] = float(values[int(i)])
        rest = [remaining[int(i)] for i in ranked[self.group:]]
        raw.update((remaining[int(i)], float(values[int(i)])) for i in ranked[self.group:])
        position = {unit: p for p, unit in enumerate(order + rest)}
        scores = torch.tensor([float(len(units) - position[u]) for u in units],
                              dtype=torch.float64)  # (U,)
        return ScoreResult(units, scores, torch.tensor([raw[u] for u in units],
                                                       dtype=torch.float64))
