"""Stable Diffusion 3 / 3.5 (`SD3Transformer2DModel`, blocks `JointTransformerBlock`).

Kinds:
- joint_head: `transformer_blocks[i].attn`: rows of to_q/k/v and add_q/k/v_proj, columns of
  to_out[0] (image stream) and to_add_out (text stream; the last block is `context_pre_only` and
  has none)
- dual_head: `transformer_blocks[i].attn2` (SD3.5 dual attention, image stream only)
- neuron: `transformer_blocks[i].ff` (image stream)
- context_neuron: `transformer_blocks[i].ff_context` (text stream; absent in the last block)

The per-head qk RMSNorms of SD3.5 (`qk_norm="rms_norm"`) span one head and are not sliced.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dit_prune.units.anatomy import Anatomy, BlockList
from dit_prune.units.families.common import (
    config_side,
    ff_neurons,
    first_param,
    heads,
    joint_heads,
    randn,
    timesteps,
)
from dit_prune.units.unit import CONTEXT_NEURON, DUAL_HEAD, JOINT_HEAD, NEURON

TEXT_TOKENS = 4


def example_inputs(model: nn.Module, batch: int = 1, seed: int = 0,
                   side: int | None = None) -> dict[str, Any]:
    """Latents (B, C, S, S), text (B, 4, joint_attention_dim), pooled text, t = 500."""
    param, config = first_param(model), model.config
    gen = torch.Generator().manual_seed(seed)
    size = config_side(model, side)
    return {
        "hidden_states": randn(gen, param, batch, config.in_channels, size, size),
        "encoder_hidden_states": randn(gen, param, batch, TEXT_TOKENS, config.joint_attention_dim),
        "pooled_projections": randn(gen, param, batch, config.pooled_projection_dim),
        "timestep": timesteps(param, batch, 500.0),  # (B,)
    }


ANATOMY = Anatomy(
    family="SD3Transformer2DModel",
    block_lists=(BlockList("transformer_blocks", (
        joint_heads(JOINT_HEAD, "attn"),
        heads(DUAL_HEAD, "attn2"),
        ff_neurons(NEURON, "ff"),
        ff_neurons(CONTEXT_NEURON, "ff_context"),
    )),),
    default_kinds=(JOINT_HEAD, DUAL_HEAD, NEURON, CONTEXT_NEURON),
    inputs=example_inputs,
)
