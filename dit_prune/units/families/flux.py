"""Flux.1 (`FluxTransformer2DModel`): double-stream blocks, then single-stream blocks.

Blocks are numbered double blocks first (0 .. num_layers - 1), then single blocks.

Kinds:
- joint_head: `transformer_blocks[i].attn`: rows of to_q/k/v and add_q/k/v_proj, columns of
  to_out[0] and to_add_out
- neuron: `transformer_blocks[i].ff` (image stream)
- context_neuron: `transformer_blocks[i].ff_context` (text stream)
- single_head: `single_transformer_blocks[i].attn`: rows of to_q/k/v, columns `[h·d, (h+1)·d)`
  of proj_out
- single_neuron: `single_transformer_blocks[i]`: row j of proj_mlp, column A + j of proj_out (A:
  the current attention width); `mlp_hidden_dim` follows
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
from dit_prune.units.families.common import (
    QKV,
    ff_neurons,
    first_param,
    joint_heads,
    randn,
    timesteps,
)
from dit_prune.units.unit import CONTEXT_NEURON, JOINT_HEAD, NEURON, SINGLE_HEAD, SINGLE_NEURON

TEXT_TOKENS = 4
DEFAULT_SIDE = 4  # token grid side of the example input


def example_inputs(model: nn.Module, batch: int = 1, seed: int = 0,
                   side: int | None = None) -> dict[str, Any]:
    """Packed latents (B, S·S, in_channels), text (B, 4, joint_attention_dim), pooled text,
    zero position ids, t = 0.5 (and guidance 3.5 for guidance-distilled configs)."""
    param, config = first_param(model), model.config
    gen = torch.Generator().manual_seed(seed)
    size = int(side or DEFAULT_SIDE)
    inputs = {
        "hidden_states": randn(gen, param, batch, size * size, config.in_channels),
        "encoder_hidden_states": randn(gen, param, batch, TEXT_TOKENS, config.joint_attention_dim),
        "pooled_projections": randn(gen, param, batch, config.pooled_projection_dim),
        "timestep": timesteps(param, batch, 0.5),  # (B,) in [0, 1]
        "img_ids": _grid_ids(size, param),  # (S·S, 3)
        "txt_ids": torch.zeros(TEXT_TOKENS, 3, device=param.device, dtype=param.dtype),
    }
    if config.guidance_embeds:
        inputs["guidance"] = timesteps(param, batch, 3.5)
    return inputs


def _grid_ids(side: int, param: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(side).repeat_interleave(side)
    cols = torch.arange(side).repeat(side)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], -1)  # (S·S, 3)
    return ids.to(device=param.device, dtype=param.dtype)


SINGLE_HEADS = UnitKind(
    SINGLE_HEAD,
    ups=tuple(Site(f"attn.{p}") for p in QKV),
    downs=(Site("proj_out"),),
    attention="attn",
    where="attn: rows of to_q/k/v; columns [h·d, (h+1)·d) of proj_out",
    category=HEAD_CATEGORY,
)
SINGLE_NEURONS = UnitKind(
    SINGLE_NEURON,
    ups=(Site("proj_mlp"),),
    downs=(Site("proj_out", after="attn.to_q"),),
    count_attr="mlp_hidden_dim",
    where="row j of proj_mlp, column A + j of proj_out (A: current attention width)",
    category=NEURON_CATEGORY,
)

ANATOMY = Anatomy(
    family="FluxTransformer2DModel",
    block_lists=(
        BlockList("transformer_blocks", (
            joint_heads(JOINT_HEAD, "attn"),
            ff_neurons(NEURON, "ff"),
            ff_neurons(CONTEXT_NEURON, "ff_context"),
        )),
        BlockList("single_transformer_blocks", (SINGLE_HEADS, SINGLE_NEURONS)),
    ),
    default_kinds=(JOINT_HEAD, NEURON, CONTEXT_NEURON, SINGLE_HEAD, SINGLE_NEURON),
    inputs=example_inputs,
)
