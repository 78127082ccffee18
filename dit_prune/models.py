"""A size registry of class-conditional DiTs (diffusers `DiTTransformer2DModel`).

Example:
    >>> model = new_dit("tiny", num_classes=10, sample_size=8, channels=1)
    >>> sum(p.numel() for p in model.parameters())
    1424772
"""

from __future__ import annotations

from collections.abc import Callable

from diffusers import DiTTransformer2DModel
from torch import nn

from dit_prune.errors import DitPruneError


def _dit_config(layers: int, heads: int, head_dim: int) -> dict[str, int]:
    return {"num_layers": layers, "num_attention_heads": heads, "attention_head_dim": head_dim}


# name -> factory of the depth/width part of the config (as in facebookresearch/DiT models.py)
DIT_SIZES: dict[str, Callable[[], dict[str, int]]] = {
    "tiny": lambda: _dit_config(4, 4, 32),  # the embedded digits default, ~1.4 M parameters
    "small": lambda: _dit_config(12, 6, 64),  # DiT-S
    "base": lambda: _dit_config(12, 12, 64),  # DiT-B
    "large": lambda: _dit_config(24, 16, 64),  # DiT-L
    "xl": lambda: _dit_config(28, 16, 72),  # DiT-XL
}


def new_dit(
    size: str,
    num_classes: int,
    sample_size: int,
    channels: int,
    patch_size: int = 2,
    learn_sigma: bool = False,
) -> DiTTransformer2DModel:
    """A freshly initialised class-conditional DiT with diffusers' per-block label dropout off.

    Labels are dropped once per example by the trainer instead (to the null class, index
    `num_classes`); see docs/definitions.md#class-conditioning-and-label-dropout.
    """
    if size not in DIT_SIZES:
        raise DitPruneError(f"unknown DiT size {size!r}; choose one of {sorted(DIT_SIZES)}")
    if sample_size % patch_size:
        raise DitPruneError(
            f"sample size {sample_size} is not divisible by patch size {patch_size}")
    model = DiTTransformer2DModel(
        **DIT_SIZES[size](),
        in_channels=channels,
        out_channels=2 * channels if learn_sigma else channels,
        sample_size=sample_size,
        patch_size=patch_size,
        num_embeds_ada_norm=num_classes,
        norm_num_groups=1,
    )
    disable_block_label_dropout(model)
    return model


def disable_block_label_dropout(model: nn.Module) -> None:
    """Set every block's label-embedding dropout to 0 (diffusers drops per block, independently)."""
    for module in model.modules():
        if type(module).__name__ == "LabelEmbedding":
            module.dropout_prob = 0.0


def null_class(model: DiTTransformer2DModel) -> int:
    """Index of the unconditional ("null") class: the number of real classes."""
    return int(model.config.num_embeds_ada_norm)


def null_label(model: nn.Module) -> int:
    """The label the class-label code paths pass for "unconditional": the class count of a
    class-conditional DiT (`null_class`), 0 for a transformer without class embeddings (caption
    models, whose label 0 is the empty caption)."""
    return int(getattr(model.config, "num_embeds_ada_norm", None) or 0)
