"""Read the scores that `dit-prune score` writes: `scores.safetensors` + `scores.json`.

The tensor file holds key "scores" (one value per unit); the JSON sidecar lists the units as
[kind, block, index] and names the scorer. Either the run directory or the .safetensors file
may be given; a sidecar that carries the scores itself (key "scores") also works.

Example:
    >>> loaded = load_scores("runs/score-taylor")  # doctest: +SKIP
    >>> loaded.scorer, len(loaded.units) == len(loaded.scores)  # doctest: +SKIP
    ('taylor', True)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dit_prune.errors import DitPruneError
from dit_prune.units import Unit

SCORES_FILE = "scores.safetensors"
SIDECAR_FILE = "scores.json"


@dataclass(frozen=True)
class LoadedScores:
    units: list[Unit]
    scores: torch.Tensor  # (U,) float64, aligned with units
    scorer: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)  # the sidecar's other keys


def load_scores(path: str | os.PathLike[str]) -> LoadedScores:
    """Units and their scores from a score run directory or its scores.safetensors file."""
    given = Path(path)
    if given.is_dir():
        tensor_file, sidecar = given / SCORES_FILE, given / SIDECAR_FILE
    elif given.is_file():
        tensor_file = given if given.suffix == ".safetensors" else given.with_suffix(".safetensors")
        sidecar = given if given.suffix == ".json" else given.with_suffix(".json")
    else:
        raise DitPruneError(f"scores not found: {given}")
    meta = _read_sidecar(sidecar)
    try:
        units = [Unit.from_json(u) for u in meta.pop("units")]
    except (KeyError, TypeError, ValueError) as exc:
        raise DitPruneError(f"{sidecar} has no valid 'units' list ({exc})") from None
    scores = _read_scores(tensor_file, meta)
    if len(scores) != len(units):
        raise DitPruneError(f"{tensor_file}: {len(scores)} scores for {len(units)} units")
    return LoadedScores(units, scores, str(meta.get("scorer", "unknown")), str(given), meta)


def _read_sidecar(sidecar: Path) -> dict[str, Any]:
    if not sidecar.is_file():
        raise DitPruneError(f"scores sidecar missing: {sidecar} (it lists the units)")
    try:
        meta = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DitPruneError(f"{sidecar} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise DitPruneError(f"{sidecar} must hold a JSON object")
    return meta


def _read_scores(tensor_file: Path, meta: dict[str, Any]) -> torch.Tensor:
    if tensor_file.is_file():
        try:
            tensors = load_file(str(tensor_file))
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise DitPruneError(f"corrupt or truncated scores file {tensor_file}: {exc}") from None
        if "scores" not in tensors:
            raise DitPruneError(f"{tensor_file} has no tensor named 'scores'")
        return tensors["scores"].detach().to(torch.float64).flatten()  # (U,)
    if "scores" in meta:
        return torch.tensor(meta.pop("scores"), dtype=torch.float64).flatten()  # (U,)
    raise DitPruneError(f"scores file missing: {tensor_file}")
