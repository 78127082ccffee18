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

CAPTION_TOKENS = 4  # length of the dummy caption for text-conditioned models


def example_inputs(model: nn.Module, batch: int = 1, seed: int = 0) -> dict[str, Any]:
    """Keyword inputs for `model(**inputs)`: (batch, C, H, W) noise, a timestep, a condition."""
    param = next(model.parameters())
    config = model.config
    size = int(config.sample_size)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, int(config.in_channels), size, size, generator=gen)  # (B, C, H, W)
    inputs: dict[str, Any] = {
        "hidden_states": noise.to(device=param.device, dtype=param.dtype),
        "timestep": torch.full((batch,), 500, dtype=torch.long, device=param.device),  # (B,)
    }
    if type(model).__name__ == "PixArtTransformer2DModel":
        caption = torch.randn(batch, CAPTION_TOKENS, int(config.caption_channels), generator=gen)
        inputs["encoder_hidden_states"] = caption.to(param.device, param.dtype)  # (B, L, C_txt)
        inputs["added_cond_kwargs"] = _pixart_conditions(model, batch, size, param)
    else:
        inputs["class_labels"] = torch.zeros(batch, dtype=torch.long, device=param.device)  # (B,)
    return inputs


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
