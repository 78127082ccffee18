"""Save and reload (pruned) diffusers pipelines.

`pipe.save_pretrained(path)` works on a pruned pipeline, but diffusers' `from_pretrained`
builds the transformer from its unpruned config and fails on the smaller weights.
`load_pruned_pipeline` rebuilds the transformer from the `dit_prune_structure` key of its config
(as `load_dit` does) and lets diffusers load every other component around it; an unpruned
directory loads through diffusers alone.

Example:
    >>> import diffusers, tempfile
    >>> from dit_prune.models import new_dit
    >>> from dit_prune.pipelines import pixel_dit_pipeline, prune_pipeline
    >>> from dit_prune.units import Unit
    >>> pipe = pixel_dit_pipeline(new_dit("tiny", 10, 8, 1), diffusers.DDIMScheduler())
    >>> pruned = prune_pipeline(pipe, [Unit("head", 2, 0)])
    >>> path = tempfile.mkdtemp() + "/pruned"
    >>> _ = save_pipeline(pruned, path)
    >>> load_pruned_pipeline(path).transformer.transformer_blocks[2].attn1.heads
    3
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import diffusers
import torch

from dit_prune.checkpoint import STRUCTURE_KEY, atomic_directory, load_dit
from dit_prune.errors import DitPruneError
from dit_prune.models import disable_block_label_dropout
from dit_prune.pipelines.prune import _transformer, sync_structure_config

MODEL_INDEX = "model_index.json"


def save_pipeline(pipe: Any, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """`pipe.save_pretrained` into `path` atomically, with the transformer's structure recorded.

    A non-empty `path` is refused unless `overwrite`; on error nothing is left behind.
    """
    sync_structure_config(_transformer(pipe))
    target = Path(path)
    with atomic_directory(target, overwrite) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
    return target


def load_pruned_pipeline(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", **from_pretrained: Any
) -> Any:
    """Load a pipeline directory whose transformer may be pruned; returns a diffusers pipeline.

    `path` is a `save_pretrained` directory (`model_index.json`); one of our transformer +
    scheduler checkpoints (no `model_index.json`) becomes a pixel-space DiTPipeline with
    `IdentityVAE`. Extra keyword arguments go to the pipeline class's `from_pretrained` for the
    other components; a `torch_dtype` is applied to the rebuilt transformer as well.
    """
    root = Path(path)
    if not root.is_dir():
        raise DitPruneError(f"pipeline directory not found: {root}")
    if not (root / MODEL_INDEX).is_file():
        if (root / "transformer").is_dir():
            from dit_prune.pipelines.dit import dit_pipeline_from_checkpoint

            return dit_pipeline_from_checkpoint(root, device=device)
        raise DitPruneError(f"{root} has neither {MODEL_INDEX} nor a transformer/ directory")
    index = _read_json(root / MODEL_INDEX)
    cls = getattr(diffusers, str(index.get("_class_name")), None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.DiffusionPipeline):
        raise DitPruneError(f"{root / MODEL_INDEX} names no diffusers pipeline: "
                            f"{index.get('_class_name')!r}")
    if "transformer" not in index:
        raise DitPruneError(f"{root / MODEL_INDEX} lists no transformer component")
    components: dict[str, Any] = {}
    if _is_pruned(root):  # diffusers cannot build it: rebuild from dit_prune_structure
        transformer = load_dit(root).model
        dtype = from_pretrained.get("torch_dtype")
        if isinstance(dtype, torch.dtype):
            transformer = transformer.to(dtype)
        sync_structure_config(transformer)  # keep the structure in the config for the next save
        components["transformer"] = transformer
    for name, entry in index.items():  # components saved as absent (SD3 without T5): None
        if isinstance(entry, list) and entry[:1] == [None] and name not in from_pretrained:
            components.setdefault(name, None)
    try:
        with _quiet_identity_vae(index):
            pipe = cls.from_pretrained(str(root), **components, **from_pretrained)
    except (OSError, ValueError, TypeError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DitPruneError(f"cannot load the pipeline components of {root}: {first}") from None
    # as every DiT of ours: docs/definitions.md#class-conditioning-and-label-dropout
    disable_block_label_dropout(pipe.transformer)
    return pipe.to(device)


def _is_pruned(root: Path) -> bool:
    """True when the transformer config records a pruned structure (unpruned ones, including
    hub layouts such as `Transformer2DModel` configs, load through diffusers itself)."""
    config_file = root / "transformer" / "config.json"
    if not config_file.is_file():
        raise DitPruneError(f"transformer config missing: {config_file}")
    return STRUCTURE_KEY in _read_json(config_file)


@contextmanager
def _quiet_identity_vae(index: dict[str, Any]) -> Iterator[None]:
    """Mute diffusers' "expected AutoencoderKL" warning while loading an IdentityVAE pipeline."""
    if list(index.get("vae") or [])[-1:] != ["IdentityVAE"]:
        yield
        return
    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers.utils.logging.set_verbosity(level)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DitPruneError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(index, dict):
        raise DitPruneError(f"{path} is not a JSON object")
    return index
