"""Legacy diffusers class names: `Transformer2DModel` read as the class diffusers builds for it.

diffusers split `Transformer2DModel` into pipeline-specific classes, but hub checkpoints such as
`facebook/DiT-XL-2-256` and PixArt-α/Σ still say `"_class_name": "Transformer2DModel"` in
`transformer/config.json`. diffusers decides by the config's `norm_type` alone
(`_CLASS_REMAPPING_DICT` in `diffusers/models/model_loading_utils.py`, applied by
`LegacyModelMixin.from_pretrained` and `LegacyConfigMixin.from_config`): `ada_norm_zero` gives
`DiTTransformer2DModel`, `ada_norm_single` gives `PixArtTransformer2DModel`, any other
`norm_type` keeps the legacy class, which is no DiT here. The same rule is applied to configs
(`resolve_class_name`) and to `Transformer2DModel` instances built directly (`family_name`).

Example:
    >>> resolve_class_name({"_class_name": "Transformer2DModel", "norm_type": "ada_norm_zero"})
    'DiTTransformer2DModel'
    >>> resolve_class_name({"_class_name": "Transformer2DModel", "norm_type": "layer_norm"})
    'Transformer2DModel'
    >>> resolve_class_name({"_class_name": "PixArtTransformer2DModel"})
    'PixArtTransformer2DModel'
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

LEGACY_CLASS = "Transformer2DModel"


def legacy_target(norm_type: Any) -> str | None:
    """The class diffusers builds for a `Transformer2DModel` with this `norm_type`, or None."""
    return {"ada_norm_zero": "DiTTransformer2DModel",
            "ada_norm_single": "PixArtTransformer2DModel"}.get(norm_type)


def resolve_class_name(config: Mapping[str, Any]) -> Any:
    """The config's `_class_name`, with a legacy `Transformer2DModel` mapped as diffusers maps it.

    A legacy name whose `norm_type` diffusers does not remap is returned unchanged.
    """
    name = config.get("_class_name")
    if name == LEGACY_CLASS:
        return legacy_target(config.get("norm_type")) or name
    return name


def accepted_keys(config: Mapping[str, Any], cls: type) -> dict[str, Any]:
    """The entries of `config` that `cls.__init__` takes: a legacy config's other keys
    (`use_linear_projection`, `num_vector_embeds`, ...) mean nothing to the mapped class, and
    diffusers ignores them too, with a warning this avoids.

    Example:
        >>> from diffusers import DiTTransformer2DModel
        >>> accepted_keys({"num_layers": 2, "num_vector_embeds": None}, DiTTransformer2DModel)
        {'num_layers': 2}
    """
    names = inspect.signature(cls.__init__).parameters
    return {key: value for key, value in config.items() if key in names}


def family_name(model: nn.Module) -> str:
    """The class name `model` counts as: its own, or for a `Transformer2DModel` instance over
    patches (`patch_size` set) the class diffusers would build from its config.

    Example:
        >>> from diffusers import Transformer2DModel
        >>> legacy = Transformer2DModel(num_attention_heads=2, attention_head_dim=4,
        ...     in_channels=1, num_layers=1, sample_size=4, patch_size=2, norm_num_groups=1,
        ...     num_embeds_ada_norm=3, norm_type="ada_norm_zero")
        >>> family_name(legacy)
        'DiTTransformer2DModel'
    """
    name = type(model).__name__
    config = getattr(model, "config", None)
    if name != LEGACY_CLASS or config is None or getattr(config, "patch_size", None) is None:
        return name
    return legacy_target(getattr(config, "norm_type", None)) or name


def is_legacy(model: nn.Module) -> bool:
    """True for a `Transformer2DModel` instance that counts as a DiT or PixArt."""
    return type(model).__name__ == LEGACY_CLASS and family_name(model) != LEGACY_CLASS


def saved_config(model: nn.Module) -> dict[str, Any]:
    """`model.config` as a dict to write next to its weights, under the class it counts as.

    For a legacy instance `_class_name` becomes the mapped class, only the keys that class
    takes are kept, and `_use_default_values` is dropped: it lists keys that took
    `Transformer2DModel`'s defaults, and diffusers would fill them with the mapped class's
    defaults instead (e.g. `attention_bias`).
    """
    config = dict(model.config)
    if is_legacy(model):
        import diffusers

        private = {k: v for k, v in config.items()
                   if k.startswith("_") and k != "_use_default_values"}
        config = {**private, **accepted_keys(config, getattr(diffusers, family_name(model)))}
    config["_class_name"] = family_name(model)
    return config
