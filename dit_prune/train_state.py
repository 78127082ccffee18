"""Resumable training state: weights, EMA, optimizer and data-generator state, saved every N steps.

The state lives in one directory (`<out>.train-state/` for `dit-prune train`), written atomically
with safetensors (tensors) and JSON (everything else), never pickle. A run resumed from it takes
exactly the same steps as an uninterrupted run: same batches, same noise, same weights.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model, ema = nn.Linear(2, 2), nn.Linear(2, 2)
    >>> opt = torch.optim.AdamW(model.parameters())
    >>> gen = torch.Generator().manual_seed(0)
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()) / "state"
    >>> save_train_state(d, TrainState(5, [0.1] * 5, [], "key"), model, ema, opt, gen)
    >>> load_train_state(d, "key", model, ema, opt, gen).step
    5
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dit_prune.checkpoint import atomic_directory
from dit_prune.errors import DitPruneError

STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"


@dataclass
class TrainState:
    """Where a training run stands: steps done, their losses, probes, and the run's identity."""

    step: int
    losses: list[float]
    probes: list[dict[str, float]] = field(default_factory=list)
    run_key: str = ""  # digest of the config and the data; a state with another key is refused
    seconds: float = 0.0


def save_train_state(path: Path, state: TrainState, model: nn.Module, ema: nn.Module,
                     optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
    """Write the state atomically into directory `path` (replacing an older state there)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        tensors[f"model.{name}"] = value.detach().cpu().contiguous()
    for name, value in ema.state_dict().items():
        tensors[f"ema.{name}"] = value.detach().cpu().contiguous()
    opt = optimizer.state_dict()
    for pid, slots in opt["state"].items():
        for slot, value in slots.items():
            tensors[f"opt.{pid}.{slot}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["generator"] = generator.get_state()
    meta = {"train": asdict(state), "param_groups": opt["param_groups"]}
    with atomic_directory(Path(path), overwrite=True) as tmp:
        save_file(tensors, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(meta))


def load_train_state(path: Path, run_key: str, model: nn.Module, ema: nn.Module,
                     optimizer: torch.optim.Optimizer, generator: torch.Generator) -> TrainState:
    """Restore everything `save_train_state` wrote; refuse a state of another run (one line)."""
    path = Path(path)
    try:
        meta = json.loads((path / STATE_JSON).read_text())
        tensors = load_file(str(path / STATE_TENSORS))
        state = TrainState(**meta["train"])
    except (OSError, json.JSONDecodeError, SafetensorError, KeyError, TypeError) as exc:
        raise DitPruneError(f"training state {path} is unreadable ({exc}); delete it to start "
                            "over") from None
    if state.run_key != run_key:
        raise DitPruneError(f"training state {path} belongs to a run with other options or data; "
                            "delete it or pass the same options")
    model.load_state_dict(_prefixed(tensors, "model."))
    ema.load_state_dict(_prefixed(tensors, "ema."))
    slots: dict[int, dict[str, Any]] = {}
    for key, value in _prefixed(tensors, "opt.").items():
        pid, slot = key.split(".", 1)
        slots.setdefault(int(pid), {})[slot] = value
    optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
    generator.set_state(tensors["generator"])
    return state


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
