"""`given`: the units a user names, pruned first in the order named.

For judging a selection made elsewhere (an exhaustive search over head subsets, a published
list, an analysis of one's own) with the run's full report: copies and FD before and after,
random pruning at equal quality, the verdict. Units are written `KIND:BLOCK.INDEX`, separated
by commas (or semicolons or spaces, as in a script's comma-separated scorer list); a bare
`BLOCK.INDEX` is a self-attention head (`head`). The first named unit gets the highest score,
every other unit 0, so a budget of k units removes the first k named; a run refuses budgets
beyond the list (`dit_prune.run.config`), since the rest would tie.

Example:
    >>> from dit_prune.units import Unit
    >>> scorer = Given(units="2.2, head:3.0")
    >>> scorer.named
    (Unit(kind='head', block=2, index=2), Unit(kind='head', block=3, index=0))
    >>> scorer.raw_scores_for([Unit("head", 3, 0), Unit("head", 0, 0), Unit("head", 2, 2)]).tolist()
    [1.0, 0.0, 2.0]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from dit_prune.errors import DitPruneError
from dit_prune.scorers.base import Scorer, ScoringContext
from dit_prune.units import HEAD, UNIT_KINDS, Unit


def parse_units(spec: str) -> tuple[Unit, ...]:
    """'head:2.2,neuron:0.17,3.1' -> units (a bare BLOCK.INDEX is a head; commas, semicolons or
    spaces separate them); one-line errors.

    Example:
        >>> parse_units("neuron:0.17")
        (Unit(kind='neuron', block=0, index=17),)
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DitPruneError("scorer 'given' needs units=KIND:BLOCK.INDEX,... (e.g. "
                            "units=head:2.2,head:3.0)")
    units = []
    for item in re.split(r"[,;\s]+", spec.strip()):
        kind, _, place = item.rpartition(":")
        block, dot, index = place.partition(".")
        if not dot or not block.isdigit() or not index.isdigit():
            raise DitPruneError(f"scorer 'given': cannot read unit {item!r}; write "
                                "KIND:BLOCK.INDEX such as head:2.2")
        units.append(Unit(kind or HEAD, int(block), int(index)))
    twice = [u for i, u in enumerate(units) if u in units[:i]]
    if twice:
        raise DitPruneError(f"scorer 'given': unit {twice[0].kind}:{twice[0].block}."
                            f"{twice[0].index} is named twice")
    return tuple(units)


@dataclass(frozen=True)
class Given(Scorer):
    """Scores len(units) - position for the named units (first named = pruned first), 0 for
    every other unit. `units`: 'KIND:BLOCK.INDEX,...' in the unpruned numbering."""

    name: ClassVar[str] = "given"
    kinds: ClassVar[tuple[str, ...]] = UNIT_KINDS
    units: str = ""

    def __post_init__(self) -> None:
        parse_units(self.units)

    @property
    def named(self) -> tuple[Unit, ...]:
        return parse_units(self.units)

    def raw_scores(self, ctx: ScoringContext, units: list[Unit]) -> torch.Tensor:
        return self.raw_scores_for(units)

    def check_budgets(self, budgets: Sequence[float], budget_mode: str) -> None:
        """Budgets beyond the named units, or modes taking units of every kind, would prune
        units that tie at 0."""
        if budget_mode in ("both", "params"):
            raise DitPruneError(f"scorer 'given' prunes the units named, in order: use "
                                f"--budget-mode heads, neurons or cross_heads, not "
                                f"{budget_mode} (which takes units of every kind)")
        named = len(self.named)
        wrong = [b for b in budgets if not isinstance(b, int) or b > named]
        if wrong:
            raise DitPruneError(f"scorer 'given' names {named} unit(s): give budgets as "
                                f"unit counts up to {named}, got {wrong[0]:g}")

    def check_units(self, units: Sequence[Unit]) -> None:
        """Every named unit is among the units the run scores."""
        self.raw_scores_for(list(units))

    def raw_scores_for(self, units: list[Unit]) -> torch.Tensor:
        """(U,) float64 scores aligned with `units`; a named unit missing from them is an
        error (a pruned one, or one of another budget mode's kinds)."""
        named, scored = self.named, set(units)
        missing = [u for u in named if u not in scored]
        if missing:
            u = missing[0]
            raise DitPruneError(f"scorer 'given': unit {u.kind}:{u.block}.{u.index} is not "
                                "among the units scored (wrong kind for the budget mode, or "
                                "no such block/index in this model)")
        rank = {u: float(len(named) - i) for i, u in enumerate(named)}
        return torch.tensor([rank.get(u, 0.0) for u in units], dtype=torch.float64)  # (U,)
