"""HunyuanDiT (`HunyuanDiT2DModel`, blocks `HunyuanDiTBlock` under `blocks`).

Kinds:
- head: `blocks[i].attn1` (self-attention)
- cross_head: `blocks[i].attn2` (cross-attention to the CLIP + T5 text)
- neuron: `blocks[i].ff`

The long skip connections (`skip_linear`, `skip_norm`) act on the residual width only and are
not touched. The per-head qk LayerNorms span one head and are not sliced.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dit_prune.units.anatomy import CROSS_HEAD_CATEGORY, Anatomy, BlockList
from dit_prune.units.families.common import (
    config_side,
    ff_neurons,
    first_param,
    heads,
    randn,
    timesteps,
)
from dit_prune.units.unit import CROSS_HEAD, HEAD, NEURON


def example_inputs(model: nn.Module, batch: int = 1, seed: int = 0,
                   side: int | None = None) -> dict[str, Any]:
    """Latents (B, C, S, S), CLIP text (B, text_len, cross_attention_dim) and T5 text
    (B, text_len_t5, cross_attention_dim_t5) with all-ones masks, t = 500, image meta sizes
    and style 0 when the config uses them."""
    param, config = first_param(model), model.config
    gen = torch.Generator().manual_seed(seed)
    size = config_side(model, side)
    ones = {"device": param.device, "dtype": torch.long}
    inputs: dict[str, Any] = {
        "hidden_states": randn(gen, param, batch, config.in_channels, size, size),
        "timestep": timesteps(param, batch, 500.0),  # (B,)
        "encoder_hidden_states": randn(gen, param, batch, config.text_len,
                                       config.cross_attention_dim),
        "text_embedding_mask": torch.ones(batch, config.text_len, **ones),  # (B, L)
        "encoder_hidden_states_t5": randn(gen, param, batch, config.text_len_t5,
                                          config.cross_attention_dim_t5),
        "text_embedding_mask_t5": torch.ones(batch, config.text_len_t5, **ones),  # (B, L5)
    }
    if config.use_style_cond_and_image_meta_size:
        pixels = float(size * 8)
        inputs["image_meta_size"] = torch.tensor(
            [[pixels, pixels, pixels, pixels, 0.0, 0.0]] * batch,
            device=param.device, dtype=param.dtype)  # (B, 6)
        inputs["style"] = torch.zeros(batch, **ones)  # (B,)
    return inputs


ANATOMY = Anatomy(
    family="HunyuanDiT2DModel",
    block_lists=(BlockList("blocks", (
        heads(HEAD, "attn1"),
        ff_neurons(NEURON, "ff"),
        heads(CROSS_HEAD, "attn2", category=CROSS_HEAD_CATEGORY),
    )),),
    default_kinds=(HEAD, NEURON, CROSS_HEAD),
    inputs=example_inputs,
)
