"""What a diffusion transformer predicts, read from its scheduler: ε, v or flow matching.

Everything that noises images, builds a training target or hands a time to the model goes
through a `Prediction`: the trainer's loss, the scorers' losses and timestep distributions, and
the sampling trajectories. Times are indexed by an integer k in [0, T) (T = the scheduler's
`num_train_timesteps`), larger k = more noise, as scorers' timestep distributions draw them;
`model_time(k)` is what the transformer's `timestep` input gets for that noise level.

Definitions:

* ``epsilon`` (DDPM, Ho et al. 2020): x_k = sqrt(ā_k) x0 + sqrt(1 - ā_k) ε, target ε, model time
  k; ā is the scheduler's `alphas_cumprod`.
* ``v_prediction`` (Salimans & Ho 2022): same x_k, target v = sqrt(ā_k) ε - sqrt(1 - ā_k) x0.
* ``flow`` (rectified flow / flow matching as in SD3, Esser et al. 2024, and diffusers'
  `FlowMatchEulerDiscreteScheduler`): x_k = (1 - σ_k) x0 + σ_k ε, target ε - x0 (the velocity
  dx/dσ), model time σ_k · T. σ_k is the k-th smallest of the scheduler's training sigmas, which
  already carry its static `shift` (σ ← shift·σ / (1 + (shift - 1)·σ)); schedulers with dynamic
  shifting (Flux) keep their unshifted training grid, as diffusers' training scripts use it.

Example:
    >>> import diffusers, torch
    >>> p = Prediction.from_scheduler(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    >>> p.kind, p.num_train_timesteps
    ('flow', 1000)
    >>> x0, eps, k = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2), torch.tensor([999])
    >>> p.noisy(x0, eps, k).flatten().tolist(), p.target(x0, eps, k).flatten().tolist()
    ([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0])
    >>> round(float(p.model_time(k)), 3)
    1000.0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dit_prune.errors import DitPruneError

EPSILON, V_PREDICTION, FLOW = "epsilon", "v_prediction", "flow"
KINDS = (EPSILON, V_PREDICTION, FLOW)


@dataclass(frozen=True)
class Prediction:
    """The noising rule, training target and model time of one scheduler (see module doc).

    `schedule` is ā_k (T,) for ``epsilon`` / ``v_prediction`` and σ_k (T,), increasing in k,
    for ``flow``. Build it with `from_scheduler`.
    """

    kind: str
    schedule: torch.Tensor  # (T,) float64: alphas_cumprod, or sigmas in increasing order

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DitPruneError(f"unknown prediction type {self.kind!r}; use one of {KINDS}")
        if self.schedule.ndim != 1 or len(self.schedule) < 1:
            raise DitPruneError("a prediction schedule must be a non-empty 1-D tensor")
        if not bool(((self.schedule >= 0) & (self.schedule <= 1)).all()):
            raise DitPruneError(f"{self.kind} schedule values must lie in [0, 1]")

    @property
    def num_train_timesteps(self) -> int:
        return len(self.schedule)

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> Prediction:
        """The prediction of a diffusers scheduler: flow matching for flow-match schedulers,
        otherwise the config's `prediction_type` (``epsilon`` or ``v_prediction``).

        Raises DitPruneError for ``sample`` prediction or a scheduler with neither
        `alphas_cumprod` nor flow-matching sigmas.
        """
        if is_flow_scheduler(scheduler):
            sigmas = torch.as_tensor(scheduler.sigmas, dtype=torch.float64).flatten()  # (T[+1],)
            steps = int(scheduler.config.num_train_timesteps)
            sigmas = torch.sort(sigmas[:steps]).values  # (T,) increasing
            return cls(FLOW, sigmas)
        kind = str(getattr(scheduler.config, "prediction_type", EPSILON) or EPSILON)
        if kind not in (EPSILON, V_PREDICTION):
            raise DitPruneError(f"{type(scheduler).__name__} predicts {kind!r}; supported: "
                                f"{KINDS}")
        alphas = getattr(scheduler, "alphas_cumprod", None)
        if alphas is None:
            raise DitPruneError(f"{type(scheduler).__name__} has no alphas_cumprod or "
                                "flow-matching sigmas to noise with")
        return cls(kind, torch.as_tensor(alphas, dtype=torch.float64).flatten())

    def coefficients(self, index: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor,
                                                                               torch.Tensor]:
        """(a, b) with x_k = a·x0 + b·ε, each (B, 1, ..., 1) broadcastable to `like`."""
        index = self._index(index, like)  # (B,)
        value = self.schedule.to(like.device)[index]  # (B,) float64
        if self.kind == FLOW:
            a, b = 1 - value, value
        else:
            a, b = value.sqrt(), (1 - value).sqrt()
        shape = (-1,) + (1,) * (like.ndim - 1)
        return a.to(like.dtype).view(shape), b.to(like.dtype).view(shape)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The noised input x_k (B, ...) of clean `x0` and Gaussian `noise` at indices (B,)."""
        a, b = self.coefficients(index, x0)
        return a * x0 + b * noise  # (B, ...)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The regression target (B, ...) of the model at x_k: ε, v or ε - x0."""
        if self.kind == EPSILON:
            return noise
        if self.kind == FLOW:
            return noise - x0  # (B, ...)
        a, b = self.coefficients(index, x0)
        return a * noise - b * x0  # (B, ...) v

    def model_time(self, index: torch.Tensor) -> torch.Tensor:
        """The transformer's `timestep` input (B,): k itself (long) for ε / v, σ_k · T (float32)
        for flow matching."""
        index = torch.as_tensor(index).flatten()
        if self.kind != FLOW:
            return index.to(torch.long)
        sigma = self.schedule.to(index.device)[index.long()]  # (B,)
        return (sigma * self.num_train_timesteps).to(torch.float32)  # (B,)

    def to_epsilon(self, output: torch.Tensor, x_t: torch.Tensor,
                   index: torch.Tensor) -> torch.Tensor:
        """The noise ε implied by a model `output` (B, ...) at x_k: the common unit in which
        guidance gaps of the three kinds are compared."""
        a, b = self.coefficients(index, x_t)
        if self.kind == EPSILON:
            return output
        if self.kind == FLOW:
            return x_t + a * output  # ε = x_t + (1 - σ)·u, u = ε - x0
        return b * x_t + a * output  # ε = sqrt(1-ā) x_t + sqrt(ā) v

    def epsilon_at_time(self, output: torch.Tensor, x_t: torch.Tensor,
                        time: torch.Tensor | float) -> torch.Tensor:
        """`to_epsilon` at a sampler time instead of a training index: `time` (B,) or a scalar
        is what the transformer's `timestep` input got (a sampler's timestep): k for ε / v
        (rounded to the training grid), σ·T for flow matching, where σ = time / T is used as it
        is (a sampler's shifted σ need not lie on the training grid). Returns ε (B, ...) in
        `output`'s dtype.

        Example:
            >>> p = Prediction(FLOW, torch.linspace(0.001, 1, 1000, dtype=torch.float64))
            >>> x, u = torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
            >>> p.epsilon_at_time(u, x, torch.tensor([250.0])).flatten().tolist()
            [1.75]
        """
        time = torch.as_tensor(time, device=x_t.device).flatten().double()  # (B,) or (1,)
        if self.kind != FLOW:
            return self.to_epsilon(output, x_t, time.round().long())
        shape = (-1,) + (1,) * (x_t.ndim - 1)
        keep = (1 - time / self.num_train_timesteps).to(output.dtype).view(shape)  # 1 - σ
        return x_t.to(output.dtype) + keep * output  # (B, ...) ε = x_t + (1 - σ)·u

    def _index(self, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        index = torch.as_tensor(index, device=like.device).flatten().long()  # (B,)
        if len(index) not in (1, len(like)):
            raise DitPruneError(f"{len(index)} timesteps for a batch of {len(like)}")
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= len(self.schedule)):
            raise DitPruneError(f"timestep indices must lie in [0, {len(self.schedule) - 1}], "
                                f"got [{int(index.min())}, {int(index.max())}]")
        return index


def is_flow_scheduler(scheduler: Any) -> bool:
    """True for flow-matching schedulers (diffusers' `FlowMatch*` classes, or any scheduler
    whose name says so and that carries `sigmas` without `alphas_cumprod`)."""
    name = type(scheduler).__name__
    return name.startswith("FlowMatch") or (
        "Flow" in name and hasattr(scheduler, "sigmas")
        and getattr(scheduler, "alphas_cumprod", None) is None)
