"""Choose which units to prune: the top-scoring ones within a budget.

Budget modes:
  * ``heads``   — a fraction of the (self-attention) heads;
  * ``neurons`` — a fraction of the MLP neurons;
  * ``cross_heads`` — a fraction of the cross-attention heads (text-conditioned models);
  * ``both``    — that fraction of every unit kind in `units`, each kind counted on its own
    (heads and neurons, plus cross-attention heads for text-conditioned models);
  * ``params``  — a fraction of the parameters held by all units (their q/k/v/out or MLP
    slices), filled greedily by score across kinds; needs the model for unit sizes.

A budget is a fraction in (0, 1) or a whole number of units (an int >= 1, e.g. 3 = three heads;
in ``both`` mode that many of each kind; ``params`` takes fractions only). A fraction removes
``round(budget * n)`` units per kind, and a budget that removes no unit is refused, naming the
smallest one that does. Every block keeps at least one unit of each kind
(a unit that would empty its block is skipped and the next-best is taken). Ties are broken by
the order of `units`, so the result is deterministic.

Example:
    >>> import torch
    >>> from dit_prune.units import Unit
    >>> units = [Unit("head", 0, i) for i in range(4)] + [Unit("head", 1, i) for i in range(4)]
    >>> scores = torch.tensor([9.0, 8.0, 7.0, 6.0, 0.0, 0.0, 0.0, 0.0])
    >>> select_units(units, scores, 0.5, mode="heads")
    [Unit(kind='head', block=0, index=0), Unit(kind='head', block=0, index=1), \
Unit(kind='head', block=0, index=2), Unit(kind='head', block=1, index=0)]
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from dit_prune.errors import DitPruneError
from dit_prune.units import CROSS_HEAD, HEAD, NEURON, Unit, adapter_for

BUDGET_MODES = ("heads", "neurons", "both", "params", "cross_heads")
DEFAULT_BUDGET_MODE = "heads"  # the default of select_units, `dit-prune prune` and `run`
MODE_KINDS = {"heads": (HEAD,), "neurons": (NEURON,), "cross_heads": (CROSS_HEAD,)}
Budget = float | int  # a fraction in (0, 1), or a unit count >= 1


def check_budget(budget: Budget | str) -> Budget:
    """A fraction in (0, 1) as a float, or a unit count (an int, or digits) as an int >= 1.

    Example:
        >>> check_budget("0.2"), check_budget("3"), check_budget(2)
        (0.2, 3, 2)
    """
    if isinstance(budget, bool):
        raise DitPruneError(f"budget must be a fraction in (0, 1) or a unit count, got {budget}")
    text = budget.strip() if isinstance(budget, str) else budget
    if isinstance(text, int) or (isinstance(text, str) and text.lstrip("+-").isdigit()):
        count = int(text)
        if count < 1:
            raise DitPruneError(f"budget must lie strictly between 0 and 1 (a fraction) or be "
                                f"a unit count >= 1, got {budget}")
        return count
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise DitPruneError(f"budget must be a fraction in (0, 1) or a unit count, "
                            f"got {budget!r}") from None
    if not (0.0 < value < 1.0) or math.isnan(value):
        raise DitPruneError(f"budget must lie strictly between 0 and 1 (a fraction) or be a "
                            f"unit count >= 1 such as 3, got {budget}")
    return value


def parse_budgets(text: str) -> tuple[Budget, ...]:
    """'0.1,0.2,3' -> (0.1, 0.2, 3): comma-separated budgets, each checked by check_budget."""
    budgets = tuple(check_budget(part) for part in str(text).split(",") if part.strip())
    if not budgets:
        raise DitPruneError(f"give at least one budget, got {text!r}")
    return budgets


def units_to_remove(budget: Budget, count: int, kind: str = "unit") -> int:
    """How many of `count` units of `kind` a budget removes; a one-line error for none or
    more than there are.

    Example:
        >>> units_to_remove(0.2, 16, "head"), units_to_remove(3, 16, "head")
        (3, 3)
    """
    budget = check_budget(budget)
    if isinstance(budget, int):
        if budget > count:
            raise DitPruneError(f"budget of {budget} units exceeds the {count} {kind} units")
        return budget
    target = int(round(budget * count))
    if target < 1:
        smallest = (math.floor(0.5 / count * 1000) + 1) / 1000 if count else 1.0
        raise DitPruneError(f"budget {budget} of {count} {kind} units removes none; the smallest "
                            f"fraction that removes one is {smallest:g} (or give a unit count "
                            "such as --budget 1)")
    return target


def check_budget_for(budget: Budget, mode: str, counts: dict[str, int]) -> None:
    """Refuse, before any work, a budget that removes no unit (or more units than exist) of a
    kind `mode` prunes; `counts` maps unit kind -> number of units (`params`: checked only
    for a unit count, which it refuses)."""
    budget = check_budget(budget)
    if mode not in BUDGET_MODES:
        raise DitPruneError(f"unknown budget mode {mode!r}; choose one of {BUDGET_MODES}")
    if mode == "params":
        if isinstance(budget, int):
            raise DitPruneError(f"budget mode 'params' takes a fraction in (0, 1), not the unit "
                                f"count {budget}")
        return
    for kind in MODE_KINDS.get(mode) or tuple(counts):
        if counts.get(kind):
            units_to_remove(budget, counts[kind], kind)


def select_units(
    units: Sequence[Unit],
    scores: torch.Tensor | Sequence[float],
    budget: Budget,
    mode: str = DEFAULT_BUDGET_MODE,
    model: nn.Module | None = None,
) -> list[Unit]:
    """The units to prune, highest score first, within `budget` (see module docstring).

    `scores` is aligned with `units` (higher = prune first). Block sizes are taken from `model`
    when given, otherwise from `units` (then `units` must list every unit of those blocks).
    """
    budget = check_budget(budget)
    if mode not in BUDGET_MODES:
        raise DitPruneError(f"unknown budget mode {mode!r}; choose one of {BUDGET_MODES}")
    units = list(units)
    values = _scores_array(scores, len(units))
    if len(set(units)) != len(units):
        raise DitPruneError("units contain duplicates; each unit needs exactly one score")
    order = np.argsort(-values, kind="stable")  # highest first; ties keep the order of units
    sizes = _block_sizes(units, model)
    if mode == "params":
        check_budget_for(budget, mode, {})
        return _select_params(units, order, budget, sizes, _unit_costs(units, model, mode))
    kinds = MODE_KINDS.get(mode) or tuple(dict.fromkeys(u.kind for u in units))
    chosen: list[Unit] = []
    for kind in kinds:
        candidates = [int(i) for i in order if units[i].kind == kind]
        if not candidates:
            raise DitPruneError(f"no {kind} units were scored; cannot apply a {mode} budget")
        target = units_to_remove(budget, len(candidates), kind)
        chosen.extend(_take(units, candidates, target, sizes))
    rank = {int(i): r for r, i in enumerate(order)}
    position = {u: i for i, u in enumerate(units)}
    return sorted(chosen, key=lambda u: rank[position[u]])


def _scores_array(scores: torch.Tensor | Sequence[float], n: int) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        values = scores.detach().to("cpu", torch.float64).flatten().numpy()
    else:
        values = np.asarray(list(scores), dtype=np.float64).ravel()
    if len(values) != n:
        raise DitPruneError(f"{len(values)} scores for {n} units: they must be aligned")
    if not np.all(np.isfinite(values)):
        raise DitPruneError(f"{int((~np.isfinite(values)).sum())} scores are NaN or infinite")
    return values


def _block_sizes(units: list[Unit], model: nn.Module | None) -> Counter:
    """(block, kind) -> units present there."""
    if model is None:
        return Counter((u.block, u.kind) for u in units)
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    sizes: Counter = Counter()
    for u in units:
        key = (u.block, u.kind)
        if key not in sizes:
            if u.block >= len(blocks) or u.kind not in adapter.kinds:
                raise DitPruneError(f"{u} does not exist in the model ({len(blocks)} blocks)")
            sizes[key] = adapter.count(blocks[u.block], u.kind)
    return sizes


def _take(units: list[Unit], candidates: list[int], target: int, sizes: Counter) -> list[Unit]:
    taken: list[Unit] = []
    removed: Counter = Counter()
    for i in candidates:
        if len(taken) >= target:
            break
        key = (units[i].block, units[i].kind)
        if removed[key] + 1 >= sizes[key]:
            continue  # keep at least one unit of this kind in the block
        removed[key] += 1
        taken.append(units[i])
    return taken


def _unit_costs(units: list[Unit], model: nn.Module | None, mode: str) -> list[int]:
    if model is None:
        raise DitPruneError(f"budget mode {mode!r} needs the model to size units in parameters")
    from dit_prune.pruning.structural import unit_cost

    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    cache: dict[tuple[int, str], int] = {}
    for u in units:
        if (u.block, u.kind) not in cache:
            cache[(u.block, u.kind)] = unit_cost(adapter, blocks[u.block], u.kind)
    return [cache[(u.block, u.kind)] for u in units]


def _select_params(
    units: list[Unit], order: np.ndarray, budget: float, sizes: Counter, costs: list[int]
) -> list[Unit]:
    """Greedy by score: take each unit whose parameters still fit in the budget."""
    target = budget * sum(costs)
    if costs and min(costs) > target:
        smallest = math.ceil(min(costs) / sum(costs) * 1000) / 1000
        raise DitPruneError(f"budget {budget} of the units' {sum(costs)} parameters removes no "
                            f"unit; the smallest that removes one is {smallest:g}")
    total = 0
    removed: Counter = Counter()
    taken: list[Unit] = []
    for i in (int(j) for j in order):
        key = (units[i].block, units[i].kind)
        if total + costs[i] > target or removed[key] + 1 >= sizes[key]:
            continue
        total += costs[i]
        removed[key] += 1
        taken.append(units[i])
    return taken
