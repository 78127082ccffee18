"""Example model inputs (noise, a timestep, a condition) for graph tracing and MAC counting.

Example:
    >>> from dit_prune.models import new_dit
    >>> inputs = example_inputs(new_dit("tiny", 10, 8, 1))
    >>> sorted(inputs), tuple(inputs["hidden_states"].shape)
    (['class_labels', 'hidden_states', 'timestep'], (1, 1, 8, 8))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dit_prune.legacy import family_name
from dit_prune.units.families import ANATOMIES

CAPTION_TOKENS = 4  # length of the dummy caption for text-conditioned models


def example_inputs(
    model: nn.Module, batch: int = 1, seed: int = 0, side: int | None = None
) -> dict[str, Any]:
    """Keyword inputs for `model(**inputs)`: (batch, C, H, W) noise, a timestep, a condition.

    `side` is H = W (default the model's `sample_size`; diffusers recomputes the position
    embedding for other multiples of the patch size). Other families build their own inputs
    (`Anatomy.inputs` in `dit_prune.units.families`, e.g. Flux's packed tokens).
    """
    anatomy = ANATOMIES.get(family_name(model))
    if anatomy is not None and anatomy.inputs is not None:
        return anatomy.inputs(model, batch=batch, seed=seed, side=side)
    param = next(model.parameters())
    config = model.config
    size = int(config.sample_size) if side is None else int(side)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, int(config.in_channels), size, size, generator=gen)  # (B, C, H, W)
    inputs: dict[str, Any] = {
        "hidden_states": noise.to(device=param.device, dtype=param.dtype),
        "timestep": torch.full((batch,), 500, dtype=torch.long, device=param.device),  # (B,)
    }
    if family_name(model) == "PixArtTransformer2DModel":
        caption = torch.randn(batch, CAPTION_TOKENS, caption_channels(model), generator=gen)
        inputs["encoder_hidden_states"] = caption.to(param.device, param.dtype)  # (B, L, C_txt)
        inputs["added_cond_kwargs"] = _pixart_conditions(model, batch, size, param)
    else:
        inputs["class_labels"] = torch.zeros(batch, dtype=torch.long, device=param.device)  # (B,)
    return inputs


def check_side(model: nn.Module) -> int:
    """A small input side for cheap checks: 2 x 2 patches (or the sample size when smaller)."""
    patch = int(getattr(model.config, "patch_size", None) or 1)
    return min(int(getattr(model.config, "sample_size", None) or 2 * patch), 2 * patch)


def caption_channels(model: nn.Module) -> int:
    """Width of the caption embeddings PixArt takes: `caption_channels`, or, without a caption
    projection (`caption_channels=None`), the input width of the cross-attention keys."""
    if getattr(model, "caption_projection", None) is not None:
        return int(model.caption_projection.linear_1.in_features)
    return int(model.transformer_blocks[0].attn2.to_k.in_features)


def _pixart_conditions(
    model: nn.Module, batch: int, size: int, param: torch.Tensor
) -> dict[str, torch.Tensor | None]:
    if not getattr(model, "use_additional_conditions", False):
        return {"resolution": None, "aspect_ratio": None}
    pixels = float(size * 8)  # latent side -> image side
    resolution = torch.full((batch, 2), pixels, device=param.device, dtype=param.dtype)  # (B, 2)
    aspect = torch.ones(batch, 1, device=param.device, dtype=param.dtype)  # (B, 1)
    return {"resolution": resolution, "aspect_ratio": aspect}


def forward_sample(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """`model(**inputs).sample`; a forward_fn for torch-pruning's graph tracing."""
    return model(**inputs).sample
