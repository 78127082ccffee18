"""The unit of pruning: one attention head or one MLP neuron of one transformer block.

Example:
    >>> Unit("head", 2, 1)
    Unit(kind='head', block=2, index=1)
    >>> Unit("neuron", 0, 5) < Unit("neuron", 1, 0)
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dit_prune.errors import DitPruneError

HEAD = "head"
NEURON = "neuron"
CROSS_HEAD = "cross_head"  # cross-attention (attn2) head, text-conditioned models only
UNIT_KINDS = (HEAD, NEURON, CROSS_HEAD)


@dataclass(frozen=True, order=True)
class Unit:
    """`kind` is 'head', 'neuron' (or 'cross_head'); `block` the transformer block index;
    `index` the head or neuron index in the *unpruned* numbering of that block."""

    kind: str
    block: int
    index: int

    def __post_init__(self) -> None:
        if self.kind not in UNIT_KINDS:
            raise DitPruneError(f"unknown unit kind {self.kind!r}; choose one of {UNIT_KINDS}")
        if self.block < 0 or self.index < 0:
            raise DitPruneError(f"unit {self} has a negative block or index")

    def to_json(self) -> list[Any]:
        return [self.kind, self.block, self.index]

    @classmethod
    def from_json(cls, item: Any) -> Unit:
        if isinstance(item, dict):
            return cls(str(item["kind"]), int(item["block"]), int(item["index"]))
        kind, block, index = item
        return cls(str(kind), int(block), int(index))
