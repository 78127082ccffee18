"""CogView3-Plus (`CogView3PlusTransformer2DModel`, blocks `CogView3PlusTransformerBlock`).

The anatomy and inputs of CogView4 (`dit_prune.units.families.cogview4`): text and image tokens
share one attention and one feed-forward per block; the parameter-free per-head LayerNorms are
left as they are.

Kinds:
- head: `transformer_blocks[i].attn1`: rows of to_q/k/v, columns of to_out[0]
- neuron: `transformer_blocks[i].ff`
"""

from __future__ import annotations

from dataclasses import replace

from dit_prune.units.families.cogview4 import ANATOMY as COGVIEW4

ANATOMY = replace(COGVIEW4, family="CogView3PlusTransformer2DModel")
