"""Lumina-Image 2.0 (`Lumina2Transformer2DModel`, blocks `Lumina2TransformerBlock`).

Blocks are numbered in forward order: `noise_refiner`, then `context_refiner`, then `layers`.

Kinds:
- head: `attn`: query rows of to_q, columns of to_out[0]; a key/value head (rows of to_k/to_v)
  goes when its whole group of query heads goes
- neuron: `feed_forward` (SwiGLU): rows j of linear_1 and linear_3, column j of linear_2

Grouped-query attention repeats key/value head g over query heads `[g·n, (g+1)·n)`. A removal
is valid when every group that keeps heads keeps the same number (balanced removals within
groups, or whole groups); anything else is refused with one line before anything changes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dit_prune.units.anatomy import (
    HEAD_CATEGORY,
    NEURON_CATEGORY,
    Anatomy,
    BlockList,
    Site,
    UnitKind,
)
from dit_prune.units.families.common import config_side, first_param, randn, timesteps
from dit_prune.units.unit import HEAD, NEURON

TEXT_TOKENS = 4

GQA_HEADS = UnitKind(
    HEAD,
    ups=(Site("attn.to_q"),),
    downs=(Site("attn.to_out.0"),),
    attention="attn",
    kv_ups=(Site("attn.to_k"), Site("attn.to_v")),
    where="attn: query rows of to_q, columns of to_out[0]; to_k/to_v rows with a whole group",
    category=HEAD_CATEGORY,
)
SWIGLU_NEURONS = UnitKind(
    NEURON,
    ups=(Site("feed_forward.linear_1"), Site("feed_forward.linear_3")),
    downs=(Site("feed_forward.linear_2"),),
    where="feed_forward: rows of linear_1 and linear_3, column of linear_2",
    category=NEURON_CATEGORY,
)
KINDS = (GQA_HEADS, SWIGLU_NEURONS)


def example_inputs(model: nn.Module, batch: int = 1, seed: int = 0,
                   side: int | None = None) -> dict[str, Any]:
    """Latents (B, C, S, S), caption (B, 4, cap_feat_dim) with an all-true mask, t = 0.5."""
    param, config = first_param(model), model.config
    gen = torch.Generator().manual_seed(seed)
    size = config_side(model, side)
    return {
        "hidden_states": randn(gen, param, batch, config.in_channels, size, size),
        "timestep": timesteps(param, batch, 0.5),  # (B,)
        "encoder_hidden_states": randn(gen, param, batch, TEXT_TOKENS, config.cap_feat_dim),
        "encoder_attention_mask": torch.ones(batch, TEXT_TOKENS, device=param.device,
                                             dtype=torch.bool),  # (B, L)
    }


ANATOMY = Anatomy(
    family="Lumina2Transformer2DModel",
    block_lists=(BlockList("noise_refiner", KINDS), BlockList("context_refiner", KINDS),
                 BlockList("layers", KINDS)),
    default_kinds=(HEAD, NEURON),
    inputs=example_inputs,
    refused=("unbalanced query-head removals within key/value groups",),
)
