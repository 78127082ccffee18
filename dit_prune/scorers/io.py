"""Save and load scores: `scores.safetensors` (tensors) + `scores.json` (units, scorer, options).

Example:
    >>> import tempfile, torch
    >>> from dit_prune.units import Unit
    >>> units = [Unit("head", 0, 1), Unit("neuron", 2, 5)]
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = save_scores(d, units, torch.tensor([0.5, -1.0]), {"scorer": "random"})
    ...     saved = load_scores(d)
    >>> saved.units == units, saved.scores.tolist(), saved.config["scorer"]
    (True, [0.5, -1.0], 'random')
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dit_prune.checkpoint import atomic_write_text, atomic_write_with
from dit_prune.errors import DitPruneError
from dit_prune.units import Unit

SCORES_NAME = "scores.safetensors"
SIDECAR_NAME = "scores.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SavedScores:
    units: list[Unit]
    scores: torch.Tensor  # (U,) float64
    raw: torch.Tensor | None  # (U,) float64
    config: dict[str, Any]  # scorer name, options, and anything else recorded
    extra: dict[str, Any] = field(default_factory=dict)


def save_scores(
    directory: str | os.PathLike[str],
    units: list[Unit],
    scores: torch.Tensor,
    config: dict[str, Any],
    raw: torch.Tensor | None = None,
    extra: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
) -> Path:
    """Write scores (and raw scores) + the JSON sidecar into `directory`, each file atomically.

    `model` identifies the scored model: {"weights_sha256": its weights file's hash (the hash
    in the scoring cache key), "checkpoint": where it was loaded from (for messages)}.
    `dit-prune prune` refuses scores that do not record it (`check_scored_model`)."""
    directory = Path(directory)
    if len(scores) != len(units) or (raw is not None and len(raw) != len(units)):
        raise DitPruneError(f"{len(scores)} scores for {len(units)} units")
    tensors = {"scores": scores.detach().to(torch.float64).cpu().contiguous()}
    if raw is not None:
        tensors["raw"] = raw.detach().to(torch.float64).cpu().contiguous()
    sidecar = {
        "format": FORMAT_VERSION,
        "num_units": len(units),
        "units": [u.to_json() for u in units],
        **config,
        **({"model": dict(model)} if model is not None else {}),
        "extra": extra or {},
    }
    atomic_write_with(directory / SCORES_NAME, lambda tmp: save_file(tensors, str(tmp)))
    text = json.dumps({**sidecar, "units": "@units"}, indent=1, default=str)
    units_json = json.dumps(sidecar["units"], separators=(",", ":"))  # one line
    atomic_write_text(directory / SIDECAR_NAME, text.replace('"@units"', units_json, 1))
    return directory


def load_scores(directory: str | os.PathLike[str]) -> SavedScores:
    """Read what `save_scores` wrote; one-line errors for missing, corrupt or mismatched files."""
    directory = Path(directory)
    weights, sidecar_path = directory / SCORES_NAME, directory / SIDECAR_NAME
    for path in (weights, sidecar_path):
        if not path.is_file():
            raise DitPruneError(f"scores file missing: {path}")
    try:
        sidecar = json.loads(sidecar_path.read_text())
        units = [Unit.from_json(item) for item in sidecar.pop("units")]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DitPruneError(f"corrupt scores sidecar {sidecar_path}: {exc}") from None
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise DitPruneError(f"corrupt scores file {weights}: {exc}") from None
    if "scores" not in tensors or len(tensors["scores"]) != len(units):
        raise DitPruneError(f"{weights} does not hold one score per unit of {sidecar_path}")
    extra = sidecar.pop("extra", {})
    return SavedScores(units, tensors["scores"], tensors.get("raw"), sidecar, extra)


def scored_model(saved: SavedScores) -> dict[str, Any] | None:
    """The scored model's identity ({"weights_sha256", "checkpoint"}), or None when the scores
    do not record it. `dit-prune score` outputs written before the "model" field record it in
    "extra" (weights_sha256, checkpoint), which is read too."""
    for record in (saved.config.get("model"), saved.extra):
        if isinstance(record, dict) and isinstance(record.get("weights_sha256"), str) \
                and record["weights_sha256"]:
            return {"weights_sha256": record["weights_sha256"],
                    "checkpoint": str(record.get("checkpoint") or "an unnamed checkpoint")}
    return None


def check_scored_model(saved: SavedScores, where: str, checkpoint: str, weights_sha256: str,
                       ancestors: tuple[str, ...] = ()) -> None:
    """Refuse (one line) scores computed on another model than checkpoint `checkpoint`
    (weights hash `weights_sha256`), or on none of its `ancestors` (the models it was pruned
    from: their scores name units, and the ones pruning already removed are dropped), and
    scores that do not record their model at all (they cannot be checked: re-score).

    Example:
        >>> saved = SavedScores([], torch.zeros(0), None, {"model": {"weights_sha256": "ab12",
        ...                     "checkpoint": "ck/a"}})
        >>> check_scored_model(saved, "runs/s", "ck/a", "ab12")  # the same model: fine
        >>> check_scored_model(saved, "runs/s", "ck/b", "cd34")
        Traceback (most recent call last):
        ...
        dit_prune.errors.DitPruneError: the scores in runs/s were computed on ck/a (weights \
sha256 ab12), not on ck/b (weights sha256 cd34) or a model it was pruned from; score ck/b with \
dit-prune score
    """
    scored = scored_model(saved)
    if scored is None:
        raise DitPruneError(f"the scores in {where} do not record which model they were "
                            f"computed on (older or hand-written scores), so they cannot be "
                            f"checked against {checkpoint}; re-score it with dit-prune score")
    if scored["weights_sha256"] in (weights_sha256, *ancestors):
        return
    raise DitPruneError(f"the scores in {where} were computed on {scored['checkpoint']} "
                        f"(weights sha256 {scored['weights_sha256'][:12]}), not on {checkpoint} "
                        f"(weights sha256 {weights_sha256[:12]}) or a model it was pruned from; "
                        f"score {checkpoint} with dit-prune score")


def scoring_code_fingerprint() -> str:
    """A short digest of the source that decides scores (scorers, hooks, units, sampling, the
    prediction types, and the caption conditioning of text-to-image models).

    Cached scores are keyed on it, so scores computed by older code are never reused.

    Example:
        >>> len(scoring_code_fingerprint())
        16
    """
    import hashlib

    package = Path(__file__).resolve().parent.parent  # dit_prune/
    files = sorted([*(package / "scorers").glob("*.py"), *(package / "units").glob("*.py"),
                    package / "hooks.py", package / "sampling.py", package / "prediction.py",
                    package / "pipelines" / "caption_labels.py",
                    package / "pipelines" / "text_encoding.py"])
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]
