"""Building blocks shared by the family anatomies: attention heads and feed-forward neurons
as diffusers lays them out, and the random example inputs every family's forward takes.

Example:
    >>> heads("head", "attn1").ups[0].path, ff_neurons("neuron", "ff").downs[0].path
    ('attn1.to_q', 'ff.net.2')
"""

from __future__ import annotations

import torch
from torch import nn

from dit_prune.units.anatomy import HEAD_CATEGORY, NEURON_CATEGORY, Site, UnitKind

QKV = ("to_q", "to_k", "to_v")
ADDED_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")


def heads(name: str, attn: str, where: str = "", norms: bool = False,
          category: str = HEAD_CATEGORY) -> UnitKind:
    """Heads of a diffusers `Attention` at `attn`: rows of to_q/k/v, columns of to_out[0].
    With `norms`, `norm_q`/`norm_k` are declared as 1-D sites (sliced only when they span
    every head, e.g. `qk_norm="rms_norm_across_heads"`). `category`: "head" (self-attention,
    the default) or "cross_head" (cross-attention to the text)."""
    return UnitKind(
        name,
        ups=tuple(Site(f"{attn}.{p}") for p in QKV),
        downs=(Site(f"{attn}.to_out.0"),),
        attention=attn,
        norms=(Site(f"{attn}.norm_q", optional=True), Site(f"{attn}.norm_k", optional=True))
        if norms else (),
        where=where or f"{attn}: rows of to_q/to_k/to_v, columns of to_out[0]",
        category=category,
    )


def joint_heads(name: str, attn: str, where: str = "") -> UnitKind:
    """Heads of a joint (image + text stream) attention: rows of the six up-projections,
    columns of `to_out[0]` (image stream) and `to_add_out` (text stream, absent when the
    block is `context_pre_only`); category "head" (the `heads` budget mode)."""
    return UnitKind(
        name,
        ups=tuple(Site(f"{attn}.{p}") for p in QKV + ADDED_QKV),
        downs=(Site(f"{attn}.to_out.0"), Site(f"{attn}.to_add_out", optional=True)),
        attention=attn,
        where=where or (f"{attn}: rows of to_q/k/v and add_q/k/v_proj, columns of to_out[0] "
                        f"and to_add_out"),
        category=HEAD_CATEGORY,
    )


def ff_neurons(name: str, ff: str, where: str = "") -> UnitKind:
    """Neurons of a diffusers `FeedForward` at `ff`: row j of `net[0].proj` (GEGLU/SwiGLU:
    rows j and inner + j), column j of `net[2]`; category "neuron"."""
    return UnitKind(
        name,
        ups=(Site(f"{ff}.net.0.proj", glu="auto"),),
        downs=(Site(f"{ff}.net.2"),),
        where=where or f"{ff}: row of net[0].proj (two for GEGLU/SwiGLU), column of net[2]",
        category=NEURON_CATEGORY,
    )


def randn(gen: torch.Generator, param: torch.Tensor, *shape: int) -> torch.Tensor:
    """Standard normal noise of `shape` from `gen`, on the parameter's device and dtype."""
    return torch.randn(*shape, generator=gen).to(device=param.device, dtype=param.dtype)


def first_param(model: nn.Module) -> torch.Tensor:
    return next(model.parameters())


def timesteps(param: torch.Tensor, batch: int, value: float) -> torch.Tensor:
    """(B,) float timesteps on the parameter's device (flow-matching families take floats)."""
    return torch.full((batch,), value, device=param.device, dtype=param.dtype)


def config_side(model: nn.Module, side: int | None, fallback: int = 4) -> int:
    """`side`, or the config's `sample_size`, or `fallback`."""
    if side is not None:
        return int(side)
    return int(getattr(model.config, "sample_size", None) or fallback)
