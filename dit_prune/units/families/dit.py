"""DiT (`DiTTransformer2DModel`, and a legacy `Transformer2DModel` with `ada_norm_zero`).

Kinds:
- head: `transformer_blocks[i].attn1`: rows of to_q/k/v, columns of to_out[0]
- neuron: `transformer_blocks[i].ff`: row of net[0].proj (two for GEGLU/SwiGLU), column of
  net[2]
"""

from __future__ import annotations

from dit_prune.units.anatomy import Anatomy, BlockList
from dit_prune.units.families.common import ff_neurons, heads
from dit_prune.units.unit import HEAD, NEURON

ANATOMY = Anatomy(
    family="DiTTransformer2DModel",
    block_lists=(BlockList("transformer_blocks", (
        heads(HEAD, "attn1"), ff_neurons(NEURON, "ff"))),),
    default_kinds=(HEAD, NEURON),
    graph_check=True,
)
