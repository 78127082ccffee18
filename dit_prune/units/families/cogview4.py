"""CogView4 (`CogView4Transformer2DModel`, blocks `CogView4TransformerBlock`).

Text and image tokens share one attention and one feed-forward per block.

Kinds:
- head: `transformer_blocks[i].attn1`: rows of to_q/k/v, columns of to_out[0]
- neuron: `transformer_blocks[i].ff`

The per-head LayerNorms `attn1.norm_q`/`norm_k` have no parameters and span one head: they
are left as they are (torch-pruning's DependencyGraph would shrink them to size 0).
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
    randn,
    timesteps,
)
from dit_prune.units.unit import HEAD, NEURON

TEXT_TOKENS = 4


def example_inputs(model: nn.Module, batch: int = 1, seed: int = 0,
                   side: int | None = None) -> dict[str, Any]:
    """Latents (B, C, S, S), text (B, 4, text_embed_dim), t = 500, sizes (B, 2) = 8·S."""
    param, config = first_param(model), model.config
    gen = torch.Generator().manual_seed(seed)
    size = config_side(model, side)
    pixels = torch.full((batch, 2), size * 8, device=param.device, dtype=param.dtype)  # (B, 2)
    return {
        "hidden_states": randn(gen, param, batch, config.in_channels, size, size),
        "encoder_hidden_states": randn(gen, param, batch, TEXT_TOKENS, config.text_embed_dim),
        "timestep": timesteps(param, batch, 500.0),  # (B,)
        "original_size": pixels,
        "target_size": pixels.clone(),
        "crop_coords": torch.zeros_like(pixels),
    }


ANATOMY = Anatomy(
    family="CogView4Transformer2DModel",
    block_lists=(BlockList("transformer_blocks", (
        heads(HEAD, "attn1"), ff_neurons(NEURON, "ff"))),),
    default_kinds=(HEAD, NEURON),
    inputs=example_inputs,
)
