"""PixArt-α/Σ (`PixArtTransformer2DModel`, and a legacy `Transformer2DModel` with
`ada_norm_single`).

Kinds:
- head: `transformer_blocks[i].attn1` (self-attention)
- cross_head: `transformer_blocks[i].attn2` (caption cross-attention): rows of to_q/k/v, columns
  of to_out[0]
- neuron: `transformer_blocks[i].ff`
"""

from __future__ import annotations

from dit_prune.units.anatomy import CROSS_HEAD_CATEGORY, Anatomy, BlockList
from dit_prune.units.families.common import ff_neurons, heads
from dit_prune.units.unit import CROSS_HEAD, HEAD, NEURON

ANATOMY = Anatomy(
    family="PixArtTransformer2DModel",
    block_lists=(BlockList("transformer_blocks", (
        heads(HEAD, "attn1"),
        ff_neurons(NEURON, "ff"),
        heads(CROSS_HEAD, "attn2", category=CROSS_HEAD_CATEGORY),
    )),),
    default_kinds=(HEAD, NEURON),
    graph_check=True,
)
