"""Duplicated training data: some images repeated many times, the regime behind real-world copying.

Models that generalize still copy the images that were duplicated in their training data
(Somepalli et al. 2023, "Understanding and Mitigating Copying in Diffusion Models"; Carlini et al.
2023, "Extracting Training Data from Diffusion Models"). A `DuplicationSpec` names which images of
a training set are repeated and how many copies of each the training multiset holds.

Example:
    >>> import torch
    >>> labels = torch.arange(40) % 10
    >>> spec = DuplicationSpec.parse("10x5", seed=0)
    >>> dup = spec.choose(labels)
    >>> len(dup), sorted(labels[dup].tolist()) == list(range(10))
    (10, True)
    >>> multiset = expand_with_duplicates(torch.arange(40), dup, spec.copies)
    >>> len(multiset)  # 40 originals + 10 images x 4 extra copies
    80
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from dit_prune.data import balanced_subset
from dit_prune.errors import DitPruneError


@dataclass(frozen=True)
class DuplicationSpec:
    """`count` images of the training set, each present `copies` times in the multiset.

    The images are a class-balanced choice by `seed` (`data.balanced_subset`), unless `indices`
    (positions in the training set) names them explicitly.
    """

    count: int
    copies: int
    seed: int = 0
    indices: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.copies < 2:
            raise DitPruneError(f"duplication: copies must be at least 2, got {self.copies}")
        if self.count < 1:
            raise DitPruneError(f"duplication: count must be at least 1, got {self.count}")
        if self.indices is not None:
            if len(self.indices) != self.count or len(set(self.indices)) != self.count:
                raise DitPruneError("duplication: indices must be distinct and number `count`")
            if min(self.indices) < 0:
                raise DitPruneError("duplication: indices must be non-negative")

    @classmethod
    def parse(cls, text: str, seed: int = 0) -> DuplicationSpec:
        """Parse 'COUNTxCOPIES' (e.g. '10x50') or 'i,j,kxCOPIES' (explicit training indices)."""
        head, sep, tail = str(text).strip().rpartition("x")
        try:
            copies = int(tail)
            if "," in head or head.startswith("["):
                idx = tuple(int(i) for i in head.strip("[]").split(",") if i.strip())
                return cls(count=len(idx), copies=copies, seed=seed, indices=idx)
            return cls(count=int(head), copies=copies, seed=seed)
        except ValueError:
            raise DitPruneError(
                f"--duplicate takes COUNTxCOPIES (e.g. 10x50) or INDICESxCOPIES (e.g. 3,17x50), "
                f"got {text!r}") from None

    def choose(self, labels: torch.Tensor) -> np.ndarray:
        """Positions (sorted) in the training set of the images to duplicate."""
        if self.indices is not None:
            idx = np.asarray(sorted(self.indices), dtype=np.int64)
            if idx.max() >= len(labels):
                raise DitPruneError(f"duplication: index {idx.max()} is beyond the "
                                    f"{len(labels)} training images")
            return idx
        return balanced_subset(labels, self.count, self.seed)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["indices"] = list(self.indices) if self.indices is not None else None
        return data


def expand_with_duplicates(items: torch.Tensor, duplicated: np.ndarray,
                           copies: int) -> torch.Tensor:
    """The training multiset: every item once, then `copies - 1` extra copies of each duplicated.

    items: (N, ...) -> (N + len(duplicated) * (copies - 1), ...). Copies are appended in blocks,
    so the first N rows are the original set in its order.
    """
    extra = torch.as_tensor(np.repeat(duplicated, copies - 1), dtype=torch.long)  # (D*(c-1),)
    return torch.cat([items, items[extra]])
