"""Shared plumbing of the small evaluation networks: safetensors directories, threads, batching.

A network directory holds `model.safetensors` (weights) and `config.json` (what to build and how
it was made); nothing is ever pickled.

Example:
    >>> import tempfile
    >>> from torch import nn
    >>> net = nn.Linear(2, 3)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = save_net_dir(net, {"kind": "demo"}, Path(tmp) / "demo")
    ...     state, config = load_net_dir(Path(tmp) / "demo", "demo")
    >>> sorted(state), config["kind"]
    (['bias', 'weight'], 'demo')
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dit_prune.checkpoint import atomic_directory
from dit_prune.errors import DitPruneError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_net_dir(
    net: nn.Module,
    config: dict[str, Any],
    path: str | Path,
    overwrite: bool = False,
    files: dict[str, str] | None = None,
) -> Path:
    """Write weights + config (+ extra text `files`, e.g. a model card) atomically into `path`."""
    target = Path(path)
    with atomic_directory(target, overwrite) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        for file in tmp.iterdir():
            file.chmod(0o644)
        tmp.chmod(0o755)  # mkdtemp makes it private; a shipped checkpoint is world-readable
    return target


def load_net_dir(path: str | Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, config) of a network directory whose config says `"kind": kind`."""
    root = Path(path)
    config_file, weights_file = root / CONFIG_FILE, root / WEIGHTS_FILE
    if not config_file.is_file() or not weights_file.is_file():
        raise DitPruneError(f"{root} is not a {kind} directory (needs {CONFIG_FILE} and "
                            f"{WEIGHTS_FILE})")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DitPruneError(f"{config_file} is not valid JSON: {exc}") from None
    if config.get("kind") != kind:
        raise DitPruneError(f"{root} holds a {config.get('kind')!r} network, expected {kind!r}")
    try:
        state = load_file(str(weights_file))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise DitPruneError(f"corrupt weights file {weights_file}: {exc}") from None
    return state, config


def load_state_strict(net: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """load_state_dict with a one-line error when the weights do not fit the architecture."""
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:200]
        raise DitPruneError(f"{source} does not match its config: {detail}") from None


def weights_fingerprint(net: nn.Module) -> str:
    """Short SHA-256 over parameter names and values: identifies the exact weights."""
    digest = hashlib.sha256()
    for name, value in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (None leaves it alone).

    Training with one thread makes the small nets bit-reproducible and leaves the other core free.
    """
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def apply_batched(
    fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    device: torch.device,
    batch_size: int = 512,
) -> torch.Tensor:
    """fn over batches of `images` moved to `device`; results concatenated on the CPU, float32."""
    outputs = [fn(images[i : i + batch_size].to(device)).float().cpu()
               for i in range(0, len(images), batch_size)]
    if not outputs:
        raise DitPruneError("no images to embed")
    return torch.cat(outputs)


def device_of(net: nn.Module) -> torch.device:
    """Device of a module's first parameter or buffer (CPU when it has none)."""
    for tensor in list(net.parameters()) + list(net.buffers()):
        return tensor.device
    return torch.device("cpu")
