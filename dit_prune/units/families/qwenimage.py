"""Qwen-Image (`QwenImageTransformer2DModel`, blocks `QwenImageTransformerBlock`).

Kinds:
- joint_head: `transformer_blocks[i].attn`: rows of to_q/k/v and add_q/k/v_proj, columns of
  to_out[0] and to_add_out
- neuron: `transformer_blocks[i].img_mlp` (image stream)
- context_neuron: `transformer_blocks[i].txt_mlp` (text stream)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dit_prune.units.anatomy import Anatomy, BlockList
from dit_prune.units.families.common import ff_neurons, first_param, joint_heads, randn, timesteps
from dit_prune.units.unit import CONTEXT_NEURON, JOINT_HEAD, NEURON

TEXT_TOKENS = 4
DEFAULT_SIDE = 4  # token grid side of the example input


def example_inputs(model: nn.Module, batch: int = 1, seed: int = 0,
                   side: int | None = None) -> dict[str, Any]:
    """Packed latents (B, S·S, in_channels), text (B, 4, joint_attention_dim) with its mask,
    t = 0.5, image shapes [(1, S, S)] per example."""
    param, config = first_param(model), model.config
    gen = torch.Generator().manual_seed(seed)
    size = int(side or DEFAULT_SIDE)
    inputs: dict[str, Any] = {
        "hidden_states": randn(gen, param, batch, size * size, config.in_channels),
        "encoder_hidden_states": randn(gen, param, batch, TEXT_TOKENS, config.joint_attention_dim),
        "encoder_hidden_states_mask": torch.ones(batch, TEXT_TOKENS, device=param.device,
                                                 dtype=torch.long),  # (B, L)
        "timestep": timesteps(param, batch, 0.5),  # (B,)
        "img_shapes": [[(1, size, size)]] * batch,
    }
    if config.guidance_embeds:
        inputs["guidance"] = timesteps(param, batch, 3.5)
    return inputs


ANATOMY = Anatomy(
    family="QwenImageTransformer2DModel",
    block_lists=(BlockList("transformer_blocks", (
        joint_heads(JOINT_HEAD, "attn"),
        ff_neurons(NEURON, "img_mlp", "img_mlp: row of net[0].proj, column of net[2]"),
        ff_neurons(CONTEXT_NEURON, "txt_mlp", "txt_mlp: row of net[0].proj, column of net[2]"),
    )),),
    default_kinds=(JOINT_HEAD, NEURON, CONTEXT_NEURON),
    inputs=example_inputs,
)
