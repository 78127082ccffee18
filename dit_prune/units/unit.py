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
JOINT_HEAD = "joint_head"  # head of a joint image + text attention (SD3, Flux, Qwen-Image)
DUAL_HEAD = "dual_head"  # head of SD3.5's second (dual) image attention, attn2
CONTEXT_NEURON = "context_neuron"  # neuron of the text stream's feed-forward
SINGLE_HEAD = "single_head"  # head of a Flux single-stream block
SINGLE_NEURON = "single_neuron"  # MLP neuron of a Flux single-stream block
UNIT_KINDS = (HEAD, NEURON, CROSS_HEAD, JOINT_HEAD, DUAL_HEAD, CONTEXT_NEURON, SINGLE_HEAD,
              SINGLE_NEURON)


@dataclass(frozen=True, order=True)
class Unit:
    """`kind` is 'head', 'neuron', 'cross_head' or a family's own kind (`UNIT_KINDS`,
    docs/families.md); `block` the transformer block index (across a family's block lists);
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
