"""The validated configuration of one `dit-prune run` (everything is checked before long work).

Example:
    >>> cfg = RunConfig(checkpoint="checkpoints/digits-memorized", out="runs/x", budgets=(0.1,))
    >>> cfg.labels()[:12].tolist()
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dit_prune.errors import DitPruneError
from dit_prune.pruning.recovery import RECOVERY_METHODS
from dit_prune.pruning.selection import BUDGET_MODES as SELECTION_MODES
from dit_prune.sampling import SAMPLERS, format_seeds, parse_seeds

RECOVERIES = RECOVERY_METHODS
# `dit-prune run` handles class-conditional DiTs, which have no cross-attention heads
BUDGET_MODES = tuple(mode for mode in SELECTION_MODES if mode != "cross_heads")


@dataclass(frozen=True)
class RunConfig:
    """Options of `dit-prune run`; see `dit-prune run --help` for each."""

    checkpoint: str
    out: str
    scorer: str = "taylor-gap"
    budgets: tuple[float, ...] = (0.2,)
    budget_mode: str = "heads"
    seeds: str = "0-999"
    steps: int = 50
    sampler: str = "ddim"
    guidance_scale: float = 1.0
    num_classes: int = 10
    scorer_options: dict[str, Any] = field(default_factory=dict)
    recover: str = "none"
    recover_steps: int = 200
    recover_data: str = "train"  # train, unused (pool digits the model never saw) or a folder
    seed: int = 0
    train: str | None = None  # image folder; default: the checkpoint's recorded digits subset
    heldout: str | None = None  # image folder; default: the digits held-out set
    features: str | None = None  # feature network for FD (TorchScript file or our directory)
    copy_detector: str | None = None
    device: str = "auto"
    batch_size: int = 250
    shard_size: int = 250

    def __post_init__(self) -> None:
        if not self.budgets:
            raise DitPruneError("give at least one budget")
        for budget in self.budgets:
            if not 0.0 < budget < 1.0:
                raise DitPruneError(f"budget {budget} must lie strictly between 0 and 1")
        if self.budget_mode not in BUDGET_MODES:
            raise DitPruneError(f"unknown budget mode {self.budget_mode!r}; use {BUDGET_MODES}")
        if self.recover not in RECOVERIES:
            raise DitPruneError(f"unknown recovery {self.recover!r}; use {RECOVERIES}")
        if self.sampler not in SAMPLERS:
            raise DitPruneError(f"unknown sampler {self.sampler!r}; use {SAMPLERS}")
        if self.steps < 1 or self.batch_size < 1 or self.shard_size < 1:
            raise DitPruneError("steps, batch size and shard size must be positive")
        if self.guidance_scale < 1.0:
            raise DitPruneError(f"guidance scale must be >= 1, got {self.guidance_scale}")
        parse_seeds(self.seeds)

    def seed_list(self) -> list[int]:
        return parse_seeds(self.seeds)

    def labels(self) -> torch.Tensor:
        """Class-balanced labels: the image of seed s gets class s mod num_classes."""
        return torch.tensor([s % self.num_classes for s in self.seed_list()])  # (N,)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["budgets"] = list(self.budgets)
        data["seeds"] = format_seeds(self.seed_list())
        return data
