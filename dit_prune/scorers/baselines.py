"""Baselines: `magnitude` (smallest weights pruned first) and `random` (seeded).

Neither looks at the calibration images. `random` gives each unit a uniform score from a hash
of (seed, kind, block, index), so a unit's score does not depend on which other units are
scored or in what order.

Example:
    >>> from dit_prune.models import new_dit
    >>> from dit_prune.units import Unit
    >>> model = new_dit("tiny", 10, 8, 1)
    >>> units = [Unit("head", 0, 0), Unit("neuron", 3, 7)]
    >>> a = Random().raw_scores_for(units, seed=0)
    >>> b = Random().raw_scores_for(units[::-1], seed=0)
    >>> bool((a == b.flip(0)).all())
    True
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from dit_prune.scorers.base import Scorer, ScoringContext
from dit_prune.units import UNIT_KINDS, Unit, adapter_for, group_units
from dit_prune.units.slices import unit_squared_norms


@dataclass(frozen=True)
class Magnitude(Scorer):
    """-(L2 norm of the unit's weights over every site of its kind: the rows of each
    up-projection with their biases (both halves of a GLU; conv kernels whole) and the columns
    of each down-projection (a joint head's image and text streams both);
    `dit_prune.units.slices`). Norms across heads and grouped-query key/value rows, shared or
    mere scales, are left out."""

    name: ClassVar[str] = "magnitude"
    kinds: ClassVar[tuple[str, ...]] = UNIT_KINDS  # every family's kinds (docs/families.md)

    def raw_scores(self, ctx: ScoringContext, units: list[Unit]) -> torch.Tensor:
        adapter = adapter_for(ctx.model)
        blocks = adapter.blocks(ctx.model)
        grouped = group_units(ctx.model, units)
        norms: dict[Unit, float] = {}
        for (b, kind), positions in grouped.items():
            block = blocks[b]
            sq = unit_squared_norms(adapter, block, kind)  # (count,)
            kept = adapter.kept(block, kind)
            for p in positions:
                norms[Unit(kind, b, kept[p])] = float(sq[p].sqrt())
        return -torch.tensor([norms[u] for u in units], dtype=torch.float64)  # (U,)


@dataclass(frozen=True)
class Random(Scorer):
    """Uniform [0, 1) scores from a hash of (seed, unit): a seeded random order."""

    name: ClassVar[str] = "random"
    kinds: ClassVar[tuple[str, ...]] = UNIT_KINDS

    def raw_scores(self, ctx: ScoringContext, units: list[Unit]) -> torch.Tensor:
        return self.raw_scores_for(units, self.options.seed)

    @staticmethod
    def raw_scores_for(units: list[Unit], seed: int) -> torch.Tensor:
        values = []
        for u in units:
            digest = hashlib.blake2b(f"{seed}:{u.kind}:{u.block}:{u.index}".encode(),
                                     digest_size=8).digest()
            values.append(int.from_bytes(digest, "little") / 2.0**64)
        return torch.tensor(values, dtype=torch.float64)  # (U,)
