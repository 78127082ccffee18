"""Options shared by every scorer, and the diffusion-timestep distribution they calibrate on.

Example:
    >>> opts = ScorerOptions(timesteps="beta:0.8,2", batches=2, seed=3)
    >>> opts.timestep_distribution("uniform").describe()
    'beta:0.8,2'
    >>> TimestepDistribution.parse("10,50,100").values
    (10, 50, 100)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dit_prune.errors import DitPruneError
from dit_prune.scorers.normalize import NORMALIZATIONS


@dataclass(frozen=True)
class TimestepDistribution:
    """Where calibration examples are noised: 'uniform' over [low, high) (high None = T),
    'beta' (t = floor(u * T), u ~ Beta(a, b)), or a fixed 'list' (every image at every t)."""

    kind: str
    params: tuple[float, ...] = ()
    values: tuple[int, ...] = ()

    @classmethod
    def parse(cls, spec: str | int | Sequence[int]) -> TimestepDistribution:
        """'uniform', 'uniform:0,100', 'beta:0.8,2', '10,50,100', one int or a list of ints."""
        if isinstance(spec, int) and not isinstance(spec, bool):
            return cls._from_list([spec], str(spec))
        if not isinstance(spec, str | list | tuple):
            raise DitPruneError(f"cannot parse timesteps {spec!r}: use 'uniform', "
                                "'uniform:LOW,HIGH', 'beta:A,B' or a list such as '10,50,100'")
        if not isinstance(spec, str):
            return cls._from_list(list(spec), str(spec))
        text = spec.strip().lower()
        name, _, rest = text.partition(":")
        try:
            numbers = [float(v) for v in rest.split(",")] if rest else []
            if name == "uniform" and len(numbers) in (0, 2):
                if numbers and not 0 <= numbers[0] < numbers[1]:
                    raise ValueError
                return cls("uniform", tuple(numbers))
            if name == "beta" and len(numbers) == 2 and min(numbers) > 0:
                return cls("beta", tuple(numbers))
            if not rest:
                return cls._from_list([int(v) for v in text.split(",")], spec)
        except ValueError:
            pass
        raise DitPruneError(
            f"cannot parse timesteps {spec!r}: use 'uniform', 'uniform:LOW,HIGH', 'beta:A,B' "
            "(A, B > 0) or a list such as '10,50,100'"
        )

    @classmethod
    def _from_list(cls, values: list[Any], spec: str) -> TimestepDistribution:
        if not values or any(isinstance(v, bool) or not isinstance(v, int | float)
                             or int(v) != v or v < 0 for v in values):
            raise DitPruneError(f"timestep list {spec!r} must hold non-negative integers")
        return cls("list", (), tuple(int(v) for v in values))

    def describe(self) -> str:
        if self.kind == "list":
            return ",".join(str(v) for v in self.values)
        if not self.params:
            return self.kind
        return f"{self.kind}:" + ",".join(f"{p:g}" for p in self.params)

    def repeats(self) -> int:
        """Examples per image per calibration batch (the list length for a fixed list)."""
        return len(self.values) if self.kind == "list" else 1

    def check(self, num_train_timesteps: int) -> None:
        """Refuse timesteps outside the scheduler's [0, num_train_timesteps)."""
        T = num_train_timesteps
        if self.kind == "list" and max(self.values) >= T:
            raise DitPruneError(f"timestep {max(self.values)} is outside [0, {T}) (the "
                                "scheduler's training steps)")
        if self.kind == "uniform" and self.params and self.params[1] > T:
            low, high = self.params
            raise DitPruneError(f"timestep range [{low:g}, {high:g}) exceeds [0, {T}) (the "
                                "scheduler's training steps)")

    def sample(self, rng: np.random.Generator, count: int, num_train_timesteps: int) -> np.ndarray:
        """(count * repeats,) int64 timesteps in [0, T); image-major for a fixed list."""
        T = num_train_timesteps
        self.check(T)
        if self.kind == "list":
            return np.tile(np.asarray(self.values, dtype=np.int64), count)
        if self.kind == "beta":
            u = rng.beta(self.params[0], self.params[1], count)  # (count,) in (0, 1)
            return np.minimum(np.floor(u * T), T - 1).astype(np.int64)
        low, high = (self.params or (0, T))
        return rng.integers(int(low), int(high), count).astype(np.int64)


@dataclass(frozen=True)
class ScorerOptions:
    """Options every scorer takes (see docs/scorers.md).

    timesteps: the timestep distribution; None takes the scorer's own default.
    batches: calibration batches; each gives every calibration image one timestep and one
        noise draw (its own random stream), so the examples do not depend on `batch_size`.
    batch_size: examples per forward pass (memory only; scores do not depend on it).
    seed: the seed of every random draw (noise, timesteps, subsets, sampling seeds).
    device: where to run ('cpu', 'cuda', 'auto'); None keeps the model where it is.
    max_images: score on at most this many images of each split (a seeded subset).
    normalize: how scores of different unit kinds are made comparable (normalize.py).
    quality_weight: weight of the quality penalty (first-order rise of held-out loss), 0 = off.
    progress: show tqdm progress bars.
    """

    timesteps: str | tuple[int, ...] | None = None
    batches: int = 4
    batch_size: int = 64
    seed: int = 0
    device: str | None = None
    max_images: int | None = None
    normalize: str = "robust-z"
    quality_weight: float = 0.0
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.timesteps, list):
            object.__setattr__(self, "timesteps", tuple(self.timesteps))
        if isinstance(self.timesteps, int) and not isinstance(self.timesteps, bool):
            object.__setattr__(self, "timesteps", (self.timesteps,))
        if self.timesteps is not None:
            TimestepDistribution.parse(self.timesteps)
        if not isinstance(self.batches, int) or self.batches < 1:
            raise DitPruneError(f"batches must be a positive integer, got {self.batches!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise DitPruneError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise DitPruneError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.normalize, str) or not isinstance(self.quality_weight, int | float):
            raise DitPruneError(f"normalize must be a name and quality_weight a number, got "
                                f"{self.normalize!r} and {self.quality_weight!r}")
        if self.max_images is not None and (not isinstance(self.max_images, int)
                                            or self.max_images < 1):
            raise DitPruneError(f"max_images must be a positive integer, got {self.max_images!r}")
        if self.normalize not in NORMALIZATIONS:
            raise DitPruneError(
                f"unknown normalization {self.normalize!r}; choose one of {NORMALIZATIONS}"
            )
        if not 0 <= self.quality_weight < float("inf"):
            raise DitPruneError(f"quality_weight must be >= 0, got {self.quality_weight!r}")
        if self.device not in (None, "auto", "cpu") and not str(self.device).startswith(
            ("cuda", "mps", "xpu")
        ):
            raise DitPruneError(f"unknown device {self.device!r}")

    def timestep_distribution(self, default: str) -> TimestepDistribution:
        return TimestepDistribution.parse(self.timesteps if self.timesteps is not None else default)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if isinstance(self.timesteps, tuple):
            data["timesteps"] = list(self.timesteps)
        return data
