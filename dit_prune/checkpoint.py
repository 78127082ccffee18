"""Load and save DiT checkpoints (diffusers layout, safetensors only).

Every family of `dit_prune.units.families` loads (DiT, PixArt-α/Σ, SD3/3.5, Flux, Qwen-Image,
Sana, HunyuanDiT, CogView4, Lumina2). Layouts `load_dit` understands:
  * a run/checkpoint directory of ours: `transformer/` + `scheduler/` (+ `dit_prune.json`);
  * a diffusers pipeline directory: `model_index.json` with `transformer/`, `scheduler/`, `vae/`
    (the layout of `facebook/DiT-XL-2-256`);
  * a single-model directory: `config.json` + `diffusion_pytorch_model.safetensors`;
  * a hub id (`org/name`) for users who are online.

A `"_class_name": "Transformer2DModel"` config (the hub's DiT-XL-2 and PixArt-α/Σ) is read as
diffusers reads it: by `norm_type`, as a DiT or a PixArt (`dit_prune.legacy`).

A pruned model records its per-block widths in the transformer config under
`dit_prune_structure` and is rebuilt from that, without the base checkpoint.

Example:
    >>> loaded = load_dit("checkpoints/digits-memorized")  # doctest: +SKIP
    >>> model, scheduler, meta = loaded  # doctest: +SKIP
    >>> meta.image_size, meta.num_classes, meta.null_class  # doctest: +SKIP
    (8, 10, 10)
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import warnings
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
from dit_prune.legacy import LEGACY_CLASS, accepted_keys, resolve_class_name, saved_config
from dit_prune.models import disable_block_label_dropout
from dit_prune.structure import is_uniform, read_structure, resize_to_structure
from dit_prune.units.families import ANATOMIES

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
META_NAME = "dit_prune.json"
STRUCTURE_KEY = "dit_prune_structure"
SUPPORTED_CLASSES = tuple(ANATOMIES)  # every family of docs/families.md


@dataclass(frozen=True)
class DitMeta:
    """What callers need to know about a loaded DiT besides its weights."""

    image_size: int  # model input side (latent side; 0 for packed-token families: Flux, Qwen)
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
    """Load a DiT (base or pruned) with its noise scheduler and metadata; see module docstring.

    Every malformed input is a one-line DitPruneError naming the file: a config that is not a
    JSON object or lacks the sizes, a malformed `dit_prune_structure` or `dit_prune.json`,
    weights holding NaN/inf, an unknown scheduler class or `beta_schedule`, a device that does
    not exist here.
    """
    target = check_device(device)
    root = _resolve(path)
    transformer_dir = root / "transformer" if (root / "transformer").is_dir() else root
    config_file = transformer_dir / CONFIG_NAME
    config = _read_json(config_file, "transformer config")
    if not config.get("_class_name"):
        raise DitPruneError(f"{path} is not a diffusion transformer checkpoint (no _class_name "
                            f"in {config_file.name}); expected a DiT checkpoint or pipeline "
                            "directory")
    class_name = resolve_class_name(config)
    if class_name not in SUPPORTED_CLASSES:
        raise DitPruneError(f"{config_file} {_describe(config)}, not a DiT "
                            f"(supported: {', '.join(SUPPORTED_CLASSES)})")
    keys = ("sample_size", "in_channels") if "sample_size" in config or class_name.startswith(
        ("DiT", "PixArt")) else ("in_channels",)  # Flux and Qwen-Image take packed tokens
    sizes = {key: _config_int(config, key, config_file) for key in keys}
    try:
        model = build_transformer(config, empty=True)  # no random init, no second copy
    except DitPruneError as exc:
        raise DitPruneError(f"{config_file}: {exc}") from None
    weights_file = transformer_dir / WEIGHTS_NAME
    state = _read_safetensors(weights_file)
    _refuse_non_finite(state, weights_file)
    missing, unexpected = _load_state(model, state, weights_file)
    if missing or unexpected:
        raise DitPruneError(
            f"{weights_file} does not match its config: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in state.values()):
        nn.Module.to(model, torch.float32)  # float32 as every model of ours (values exact)
    try:
        model.to(target).eval()
    except (RuntimeError, AssertionError) as exc:  # e.g. out of device memory
        raise DitPruneError(f"cannot move the model to {target}: {_first_line(exc)}") from None
    scheduler = _load_scheduler(root)
    num_classes = int(config.get("num_embeds_ada_norm") or 0) if class_name.startswith("DiT") else 0
    extra = _read_meta(root / META_NAME) if (root / META_NAME).is_file() else {}
    meta = DitMeta(
        image_size=sizes.get("sample_size", 0),
        channels=sizes["in_channels"],
        num_classes=num_classes,
        null_class=num_classes if num_classes else None,
        model_class=class_name,
        source=str(path),
        weights_sha256=file_sha256(weights_file),
        pipeline_dir=str(root) if (root / "model_index.json").is_file() else None,
        extra=extra,
    )
    return LoadedDiT(model, scheduler, meta)


def build_transformer(config: dict[str, Any], empty: bool = False) -> nn.Module:
    """Instantiate the transformer a config describes (pruned widths included), weights random.

    With `empty`, parameters are created on the meta device (buffers are computed as usual),
    to be replaced by `load_state_dict(..., assign=True)`: no random initialisation and no
    second copy of the weights, which matters for multi-billion-parameter models.

    Example:
        >>> build_transformer({"_class_name": "DiTTransformer2DModel", STRUCTURE_KEY: "x"})
        Traceback (most recent call last):
        ...
        dit_prune.errors.DitPruneError: malformed dit_prune_structure: expected an object with \
'kept': {kind: [[unit indices] per block]}, got "x"
    """
    if not isinstance(config, dict):
        raise DitPruneError(f"a transformer config must be a JSON object, got "
                            f"{type(config).__name__}")
    config = dict(config)
    structure = config.pop(STRUCTURE_KEY, None)
    if structure is not None:
        _check_structure(structure)
    legacy = config.get("_class_name") == LEGACY_CLASS
    config["_class_name"] = resolve_class_name(config)  # legacy Transformer2DModel mapped
    if config["_class_name"] not in SUPPORTED_CLASSES:
        raise DitPruneError(f"the config {_describe(config)}, not a DiT "
                            f"(supported: {', '.join(SUPPORTED_CLASSES)})")
    cls = getattr(diffusers, config["_class_name"])
    clean = {k: v for k, v in config.items() if not k.startswith("_")}
    if legacy:
        clean = accepted_keys(clean, cls)
    try:
        if empty:
            from accelerate import init_empty_weights

            with init_empty_weights(include_buffers=False):
                model = cls.from_config(clean)
        else:
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
        config = saved_config(model)  # a legacy Transformer2DModel under its mapped class
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
        with io_errors_named(target):
            yield tmp
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private
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
    """`writer(tmp)`, then the temporary file is renamed onto `path` with the permissions a
    plain `open` would give it (mkstemp makes it private). safetensors' own I/O errors (a full
    disk) become OSErrors naming `path`, which the command line reports in one line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with io_errors_named(path):
            writer(tmp)
        tmp.chmod(0o666 & ~_umask())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def io_errors_named(path: Path) -> Iterator[None]:
    """Inside: safetensors' own I/O errors (a full disk) become OSErrors, and an OSError that
    names no file names `path`, so the command line reports them in one line with the path.

    Example:
        >>> with io_errors_named(Path("out/x.safetensors")):
        ...     raise OSError(28, "No space left on device")
        Traceback (most recent call last):
        ...
        OSError: [Errno 28] No space left on device: 'out/x.safetensors'
    """
    try:
        yield
    except SafetensorError as exc:
        if "I/O error" not in str(exc):
            raise
        raise OSError(errno.EIO, "cannot write: " + " ".join(str(exc).split()),
                      str(path)) from exc
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror or " ".join(str(exc).split()), str(path)) from exc


def _umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, or a one-line error when it is no device of this machine.

    Example:
        >>> check_device("cpu")
        device(type='cpu')
        >>> check_device("gpu0")
        Traceback (most recent call last):
        ...
        dit_prune.errors.DitPruneError: unknown device 'gpu0' (use cpu, cuda, cuda:N or mps)
    """
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DitPruneError(f"unknown device {device!r} (use cpu, cuda, cuda:N or mps)") from None
    if target.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DitPruneError(f"device {device!r}: no CUDA GPU is available on this machine")
        if target.index is not None and target.index >= count:
            raise DitPruneError(f"device {device!r}: this machine has {count} CUDA GPU(s)")
    elif target.type == "mps" and not torch.backends.mps.is_available():
        raise DitPruneError(f"device {device!r}: MPS is not available on this machine")
    elif target.type not in ("cpu", "cuda", "mps", "meta"):
        raise DitPruneError(f"unsupported device {device!r} (use cpu, cuda, cuda:N or mps)")
    return target


def _describe(config: dict[str, Any]) -> str:
    """'describes X', naming the norm_type of a legacy Transformer2DModel diffusers keeps as is."""
    name = config.get("_class_name")
    if name == LEGACY_CLASS:
        return (f"describes {name!r} with norm_type {config.get('norm_type')!r} (diffusers builds "
                f"a DiT for 'ada_norm_zero' and a PixArt for 'ada_norm_single')")
    return f"describes {name!r}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`; missing, invalid JSON or not an object is one line."""
    if not path.is_file():
        raise DitPruneError(f"{what} missing: {path}")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DitPruneError(f"{what} is not valid JSON: {path}: {exc}") from None
    if not isinstance(value, dict):
        raise DitPruneError(f"{what} {path} must hold a JSON object, not a "
                            f"{type(value).__name__}")
    return value


def _config_int(config: dict[str, Any], key: str, path: Path) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DitPruneError(f"{path}: {key} must be a positive integer, got {value!r}")
    return value


def _read_meta(path: Path) -> dict[str, Any]:
    """dit_prune.json: an object whose `data` (if any) is an object, `pool_indices` a list of
    non-negative integers."""
    meta = _read_json(path, "metadata")
    data = meta.get("data")
    if data is None:
        return meta
    if not isinstance(data, dict):
        raise DitPruneError(f"{path}: 'data' must be an object, got {type(data).__name__}")
    indices = data.get("pool_indices")
    if indices is not None and not (
        isinstance(indices, list)
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices)
    ):
        raise DitPruneError(f"{path}: data.pool_indices must be a list of non-negative integers")
    return meta


def _check_structure(structure: Any) -> None:
    """A `dit_prune_structure` must map 'kept' to {kind: [[int, ...] per block]}."""
    kept = structure.get("kept") if isinstance(structure, dict) else None
    valid = isinstance(kept, dict) and all(
        isinstance(kind, str) and isinstance(per_block, list) and all(
            isinstance(indices, list)
            and all(isinstance(i, int) and not isinstance(i, bool) for i in indices)
            for indices in per_block)
        for kind, per_block in kept.items())
    if not valid:
        shown = json.dumps(structure, default=str)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise DitPruneError(f"malformed {STRUCTURE_KEY}: expected an object with 'kept': "
                            f"{{kind: [[unit indices] per block]}}, got {shown}")


def _refuse_non_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    """One line naming the file and the first tensor that holds NaN or inf."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise DitPruneError(f"{path}: weight {name} holds {bad} NaN or infinite values")


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
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise DitPruneError(f"{path} does not match its config: {detail}") from None
    return list(result.missing_keys), list(result.unexpected_keys)


def _load_scheduler(root: Path) -> Any:
    config_file = root / "scheduler" / SCHEDULER_CONFIG_NAME
    if not config_file.is_file():
        warnings.warn(f"{root} has no scheduler/{SCHEDULER_CONFIG_NAME}: sampling assumes "
                      "diffusers' default DDPMScheduler (1000 linear-beta steps); save the "
                      "training noise schedule there if it was another", stacklevel=2)
        return diffusers.DDPMScheduler(num_train_timesteps=1000)
    config = _read_json(config_file, "scheduler config")
    name = config.get("_class_name", "DDPMScheduler")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise DitPruneError(f"unknown scheduler class in {config_file}: {name!r}")
    steps = config.get("num_train_timesteps", 1000)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DitPruneError(f"{config_file}: num_train_timesteps must be a positive integer, "
                            f"got {steps!r}")
    try:
        return cls.from_config(config)
    except (NotImplementedError, ValueError, TypeError, KeyError) as exc:  # e.g. beta_schedule
        raise DitPruneError(f"cannot build {name} from {config_file}: {_first_line(exc)}"
                            ) from None
