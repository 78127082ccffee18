"""Sana (`SanaTransformer2DModel`, blocks `SanaTransformerBlock`).

Kinds:
- head: `transformer_blocks[i].attn1` (linear attention; heads independent): rows of to_q/k/v,
  columns of to_out[0]
- cross_head: `transformer_blocks[i].attn2` (caption cross-attention)
- neuron: `transformer_blocks[i].ff` (GLUMBConv): output channels j and H + j of conv_inverted
  and of the depthwise conv_depth, input channel j of conv_point (channel dimension 1)

With `qk_norm="rms_norm_across_heads"` (Sana 1.5 / Sprint) `norm_q`/`norm_k` span every head:
their weights are sliced with the head, and ablation renormalises over the kept heads, so that
removal and ablation agree exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dit_prune.units.anatomy import (
    CROSS_HEAD_CATEGORY,
    NEURON_CATEGORY,
    Anatomy,
    BlockList,
    Site,
    UnitKind,
)
from dit_prune.units.families.common import config_side, first_param, heads, randn, timesteps
from dit_prune.units.unit import CROSS_HEAD, HEAD, NEURON

TEXT_TOKENS = 4


def example_inputs(model: nn.Module, batch: int = 1, seed: int = 0,
                   side: int | None = None) -> dict[str, Any]:
    """Latents (B, C, S, S), caption (B, 4, caption_channels), t = 500."""
    param, config = first_param(model), model.config
    gen = torch.Generator().manual_seed(seed)
    size = config_side(model, side)
    inputs = {
        "hidden_states": randn(gen, param, batch, config.in_channels, size, size),
        "encoder_hidden_states": randn(gen, param, batch, TEXT_TOKENS, config.caption_channels),
        "timestep": timesteps(param, batch, 500.0),  # (B,)
    }
    if config.guidance_embeds:
        inputs["guidance"] = timesteps(param, batch, 4.5)
    return inputs


GLUMBCONV_NEURONS = UnitKind(
    NEURON,
    ups=(Site("ff.conv_inverted", glu=True), Site("ff.conv_depth", glu=True)),
    downs=(Site("ff.conv_point"),),
    where="ff (GLUMBConv): channels j and H + j of conv_inverted and conv_depth, input j of "
          "conv_point",
    category=NEURON_CATEGORY,
)

ANATOMY = Anatomy(
    family="SanaTransformer2DModel",
    block_lists=(BlockList("transformer_blocks", (
        heads(HEAD, "attn1", norms=True),
        GLUMBCONV_NEURONS,
        heads(CROSS_HEAD, "attn2", norms=True, category=CROSS_HEAD_CATEGORY),
    )),),
    default_kinds=(HEAD, NEURON, CROSS_HEAD),
    inputs=example_inputs,
)
