"""Load and save DiT checkpoints (diffusers layout, safetensors only).

Layouts `load_dit` understands:
  * a run/checkpoint directory of ours: `transformer/` + `scheduler/` (+ `dit_prune.json`);
  * a diffusers pipeline directory: `model_index.json` with `transformer/`, `scheduler/`, `vae/`
    (the layout of `facebook/DiT-XL-2-256`);
  * a single-model directory: `config.json` + `diffusion_pytorch_model.safetensors`;
  * a hub id (`org/name`) for users who are online.

A pruned model records its per-block widths in the transformer config under
`dit_prune_structure` and is rebuilt from that, without the base checkpoint.

Example:
    >>> loaded = load_dit("checkpoints/digits-memorized")  # doctest: +SKIP
    >>> model, scheduler, meta = loaded
    >>> meta.image_size, meta.num_classes, meta.null_class  # doctest: +SKIP
    (8, 10, 10)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import diffusers
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dit_prune.errors import DitPruneError
from dit_prune.models import disable_block_label_dropout
from dit_prune.structure import is_uniform, read_structure, resize_to_structure

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
META_NAME = "dit_prune.json"
STRUCTURE_KEY = "dit_prune_structure"
SUPPORTED_CLASSES = ("DiTTransformer2DModel", "PixArtTransformer2DModel")


@dataclass(frozen=True)
class DitMeta:
    """What callers need to know about a loaded DiT besides its weights."""

    image_size: int  # model input side (latent side for latent models)
    channels: int  # model input channels
    num_classes: int  # 0 for text-conditioned or unconditional models
    null_class: int | None  # label of the unconditional class, None when not class-conditional
    model_class: str
    source: str  # the path or hub id it was loaded from
    weights_sha256: str  # hash of the transformer weights file
    pipeline_dir: str | None = None  # set when loaded from a full pipeline (has a VAE etc.)
    extra: dict[str, Any] = field(default_factory=dict)  # contents of dit_prune.json, if any

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LoadedDiT(NamedTuple):
    model: nn.Module
    scheduler: Any
    meta: DitMeta


def load_dit(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedDiT:
    """Load a DiT (base or pruned) with its noise scheduler and metadata; see module docstring."""
    root = _resolve(path)
    transformer_dir = root / "transformer" if (root / "transformer").is_dir() else root
    config = _read_json(transformer_dir / CONFIG_NAME, "transformer config")
    class_name = config.get("_class_name")
    if class_name not in SUPPORTED_CLASSES:
        raise DitPruneError(
            f"{transformer_dir / CONFIG_NAME} describes {class_name!r}, not a DiT "
            f"(supported: {', '.join(SUPPORTED_CLASSES)})"
        )
    model = build_transformer(config)
    weights_file = transformer_dir / WEIGHTS_NAME
    state = _read_safetensors(weights_file)
    missing, unexpected = _load_state(model, state, weights_file)
    if missing or unexpected:
        raise DitPruneError(
            f"{weights_file} does not match its config: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    model.to(device).eval()
    scheduler = _load_scheduler(root)
    num_classes = int(config.get("num_embeds_ada_norm") or 0) if class_name.startswith("DiT") else 0
    extra = _read_json(root / META_NAME, "metadata") if (root / META_NAME).is_file() else {}
    meta = DitMeta(
        image_size=int(config["sample_size"]),
        channels=int(config["in_channels"]),
        num_classes=num_classes,
        null_class=num_classes if num_classes else None,
        model_class=class_name,
        source=str(path),
        weights_sha256=file_sha256(weights_file),
        pipeline_dir=str(root) if (root / "model_index.json").is_file() else None,
        extra=extra,
    )
    return LoadedDiT(model, scheduler, meta)


def build_transformer(config: dict[str, Any]) -> nn.Module:
    """Instantiate the transformer a config describes (pruned widths included), weights random."""
    config = dict(config)
    structure = config.pop(STRUCTURE_KEY, None)
    cls = getattr(diffusers, config["_class_name"])
    clean = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        model = cls.from_config(clean)
    except (TypeError, ValueError) as exc:
        name = config["_class_name"]
        raise DitPruneError(f"cannot build {name} from its config: {exc}") from None
    disable_block_label_dropout(model)
    if structure is not None:
        resize_to_structure(model, structure)
    return model


def save_checkpoint(
    model: nn.Module,
    scheduler: Any,
    path: str | os.PathLike[str],
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` (pruned or not) + scheduler + metadata atomically into directory `path`.

    The directory is built in a temporary sibling and renamed into place; a non-empty target is
    refused unless `overwrite`. Pruned widths are read off the model and stored in its config.
    """
    target = Path(path)
    with atomic_directory(target, overwrite) as tmp:
        transformer_dir = tmp / "transformer"
        transformer_dir.mkdir()
        config = dict(model.config)
        config["_class_name"] = type(model).__name__
        if not is_uniform(model):
            config[STRUCTURE_KEY] = read_structure(model)
        (transformer_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str))
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(transformer_dir / WEIGHTS_NAME))
        if scheduler is not None:
            scheduler.save_pretrained(str(tmp / "scheduler"))
        if extra:
            (tmp / META_NAME).write_text(json.dumps(extra, indent=2, default=str))
    return target


@contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces `target` only if the block succeeds."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise DitPruneError(f"output {target} exists and is not empty (pass overwrite to replace)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file via a temporary sibling and rename, so readers never see half a file."""
    _atomic_write(Path(path), lambda tmp: tmp.write_text(text))


def atomic_write_with(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    """Call `writer(tmp_path)` then rename the temporary file onto `path`."""
    _atomic_write(Path(path), writer)


def _atomic_write(path: Path, writer: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        writer(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _resolve(path: str | os.PathLike[str]) -> Path:
    local = Path(path)
    if local.exists():
        if not local.is_dir():
            raise DitPruneError(f"checkpoint must be a directory: {local}")
        return local
    text = str(path)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise DitPruneError(f"checkpoint not found: {local}")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
        )
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one line
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DitPruneError(
            f"checkpoint not found locally and hub download of {text!r} failed: {first_line}"
        ) from None


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise DitPruneError(f"{what} missing: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DitPruneError(f"{what} is not valid JSON: {path}: {exc}") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DitPruneError(f"weights missing: {path} (only safetensors is accepted)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise DitPruneError(f"corrupt or truncated weights file {path}: {exc}") from None


def _load_state(
    model: nn.Module, state: dict[str, torch.Tensor], path: Path
) -> tuple[list[str], list[str]]:
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise DitPruneError(f"{path} does not match its config: {detail}") from None
    return list(result.missing_keys), list(result.unexpected_keys)


def _load_scheduler(root: Path) -> Any:
    config_file = root / "scheduler" / SCHEDULER_CONFIG_NAME
    if not config_file.is_file():
        return diffusers.DDPMScheduler(num_train_timesteps=1000)
    config = _read_json(config_file, "scheduler config")
    cls = getattr(diffusers, config.get("_class_name", "DDPMScheduler"), None)
    if cls is None:
        name = config.get("_class_name")
        raise DitPruneError(f"unknown scheduler class in {config_file}: {name}")
    return cls.from_config(config)
