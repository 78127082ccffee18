"""Choose which units to prune: the top-scoring ones within a budget.

Budget modes, by the category each family declares for its unit kinds (`UnitKind.category`,
docs/families.md):
  * ``heads``   — a fraction of the self- and joint-attention heads: every kind of category
    "head" (DiT/PixArt/Sana/...: `head`; SD3: `joint_head` + `dual_head`; Flux: `joint_head` +
    `single_head`; Qwen-Image: `joint_head`). Cross-attention heads are not included;
  * ``neurons`` — a fraction of the MLP neurons: every kind of category "neuron" (SD3,
    Qwen-Image: `neuron` + `context_neuron`; Flux: those + `single_neuron`);
  * ``cross_heads`` — a fraction of the cross-attention heads (category "cross_head": PixArt,
    Sana, HunyuanDiT);
  * ``both``    — that fraction of every unit kind in `units`, each kind counted on its own
    (heads and neurons, plus cross-attention heads when they were scored);
  * ``params``  — a fraction of the parameters held by all units (their q/k/v/out or MLP
    slices), filled greedily by score across kinds; needs the model for unit sizes.

``heads``, ``neurons`` and ``cross_heads`` pool their kinds: the budget is a fraction of (or a
number of units out of) all units of those kinds together, taken best score first across kinds,
as ``params`` does. Scores of different kinds are compared as they come: the scorers normalize
each kind on its own (robust-z by default, `dit_prune.scorers.normalize`), which is what makes
them comparable; with ``normalize=none`` a kind with larger raw scores is taken first. Where a
mode has a single kind (DiT, PixArt, Lumina2, ...) this is exactly that kind's selection. A mode
none of whose kinds is among `units` is refused with one line naming the kinds there and the
modes that would work.

A budget is a fraction in (0, 1) or a whole number of units (an int >= 1, e.g. 3 = three heads;
in ``both`` mode that many of each kind; ``params`` takes fractions only). A fraction removes
``round(budget * n)`` units (n: the mode's units; in ``both`` per kind), and a budget that
removes no unit is refused, naming the smallest one that does. Every block keeps at least one
unit of each kind (a unit that would empty its block is skipped and the next-best is taken).
Ties are broken by the order of `units`, so the result is deterministic.

Grouped-query attention (Lumina2, docs/families.md): a block's query heads share key/value
heads in G groups of n, and a removal is valid only when every group that keeps heads keeps the
same number (the same count from every group, whole groups, or both). With `model` given,
selection walks the candidates in score order as usual, but in such a block a head counts only
once it belongs to the largest removable subset of the block's chosen heads
(`dit_prune.units.gqa.balance_kv_groups`: k whole groups plus the m best chosen heads of every
other group); a head whose addition would carry the total past the budget is skipped and the
walk goes on. So these kinds remove *at most* the budget (possibly a little less: removals come
in steps of one head per group or a whole group), and a budget too small for any removal is
refused, naming the smallest one. Without `model` groups are unknown and `prune_units` refuses
an unbalanced set.

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
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import numpy as np
import torch
from torch import nn

from dit_prune.errors import DitPruneError
from dit_prune.units import Unit, adapter_for
from dit_prune.units.anatomy import CROSS_HEAD_CATEGORY, HEAD_CATEGORY, NEURON_CATEGORY
from dit_prune.units.families import kind_category
from dit_prune.units.gqa import balance_kv_groups, grouped_blocks, smallest_removal

BUDGET_MODES = ("heads", "neurons", "both", "params", "cross_heads")
DEFAULT_BUDGET_MODE = "heads"  # the default of select_units, `dit-prune prune` and `run`
# the pooled modes -> the category of the kinds they select (read-only)
MODE_CATEGORIES: Mapping[str, str] = MappingProxyType(
    {"heads": HEAD_CATEGORY, "neurons": NEURON_CATEGORY, "cross_heads": CROSS_HEAD_CATEGORY})
Budget = float | int  # a fraction in (0, 1), or a unit count >= 1
BUDGET_MODE_HELP = (
    "what the budget is a fraction (or a unit count) of: heads = every self-/joint-attention "
    "head kind of the model together (DiT, PixArt, Sana, ...: head; SD3: joint_head + "
    "dual_head; Flux: joint_head + single_head; cross-attention heads excluded); neurons = every "
    "MLP neuron kind together (SD3: neuron + context_neuron; Flux: also single_neuron); "
    "cross_heads = cross-attention heads (PixArt, Sana, HunyuanDiT); both = heads and neurons, "
    "each kind on its own; params = a fraction of their parameters (docs/pruning.md)")


def _check_mode(mode: str) -> None:
    if mode not in BUDGET_MODES:
        raise DitPruneError(f"unknown budget mode {mode!r}; choose one of {BUDGET_MODES}")


def _category(kind: str, model: nn.Module | None) -> str:
    """`kind`'s category, from the model's family anatomy (or, without a model, the one every
    family declaring `kind` gives it)."""
    return adapter_for(model).anatomy.category(kind) if model is not None else kind_category(kind)


def mode_kinds(mode: str, kinds: Sequence[str], model: nn.Module | None = None,
               where: str = "") -> tuple[str, ...]:
    """Of `kinds` (in their order, repeats dropped), the ones a budget of `mode` prunes:
    ``heads``, ``neurons``, ``cross_heads``: those of the mode's category (`MODE_CATEGORIES`,
    declared per kind by the family anatomy; `model` gives the family, else every family's
    declaration is used); ``both``, ``params``: all of them.

    Raises DitPruneError (one line naming `kinds` and the modes that would work) when a pooled
    mode matches none of them; `where` names them in that error (default: the model's family).

    Example:
        >>> mode_kinds("heads", ["joint_head", "dual_head", "neuron", "context_neuron"])
        ('joint_head', 'dual_head')
        >>> mode_kinds("neurons", ["joint_head", "neuron", "single_neuron"])
        ('neuron', 'single_neuron')
    """
    _check_mode(mode)
    kinds = tuple(dict.fromkeys(kinds))
    category = MODE_CATEGORIES.get(mode)
    if category is None:
        return kinds
    categories = {kind: _category(kind, model) for kind in kinds}
    chosen = tuple(kind for kind in kinds if categories[kind] == category)
    if not chosen:
        place = where or (adapter_for(model).family if model is not None else "the units")
        working = [m for m in BUDGET_MODES
                   if (MODE_CATEGORIES.get(m) in categories.values()) or
                   (m not in MODE_CATEGORIES and kinds)]
        raise DitPruneError(
            f"budget mode {mode!r} finds no {category} units in {place} (its kinds: "
            f"{', '.join(kinds) or 'none'}); modes that would work: {', '.join(working) or 'none'}")
    return chosen


def model_mode_kinds(mode: str, model: nn.Module) -> tuple[str, ...]:
    """The kinds of `model` (those some block holds, in the anatomy's order) whose units a
    budget of `mode` prunes, i.e. the units to enumerate and score for it: ``heads``,
    ``neurons``, ``cross_heads`` as `mode_kinds`; ``both`` and ``params``: every head and
    neuron kind (cross-attention heads only through ``cross_heads``). One-line DitPruneError
    when the mode matches no kind of the model.

    Example:
        >>> from dit_prune.models import new_dit
        >>> model_mode_kinds("heads", new_dit("tiny", 10, 8, 1))
        ('head',)
    """
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    present = tuple(k for k in adapter.kinds if any(adapter.spec(b, k) is not None for b in blocks))
    if mode in MODE_CATEGORIES:
        return mode_kinds(mode, present, model)
    _check_mode(mode)
    return tuple(k for k in present if adapter.anatomy.category(k) != CROSS_HEAD_CATEGORY)


def _label(kinds: Sequence[str]) -> str:
    """How errors name the units of a mode: 'head', or 'joint_head + dual_head'."""
    return " + ".join(kinds)


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


def check_budget_for(budget: Budget, mode: str, counts: Mapping[str, int],
                     model: nn.Module | None = None) -> None:
    """Refuse, before any work, a budget that removes no unit (or more units than exist) of
    the kinds `mode` prunes (``both``: each kind on its own; ``heads``/``neurons``/
    ``cross_heads``: their kinds together), or a mode that matches none of the kinds; `counts`
    maps unit kind -> number of units, `model` (optional) gives the family whose categories
    decide the kinds (`mode_kinds`). ``params`` is checked only for a unit count, which it
    refuses. Raises DitPruneError (one line)."""
    budget = check_budget(budget)
    _check_mode(mode)
    if mode == "params":
        if isinstance(budget, int):
            raise DitPruneError(f"budget mode 'params' takes a fraction in (0, 1), not the unit "
                                f"count {budget}")
        return
    kinds = mode_kinds(mode, [kind for kind, n in counts.items() if n], model)
    if mode == "both":
        for kind in kinds:
            units_to_remove(budget, counts[kind], kind)
        return
    units_to_remove(budget, sum(counts[kind] for kind in kinds), _label(kinds))


def select_units(
    units: Sequence[Unit],
    scores: torch.Tensor | Sequence[float],
    budget: Budget,
    mode: str = DEFAULT_BUDGET_MODE,
    model: nn.Module | None = None,
) -> list[Unit]:
    """The units to prune, highest score first, within `budget` (see module docstring).

    `scores` (U,) is aligned with `units` (higher = prune first). Block sizes are taken from
    `model` when given, otherwise from `units` (then `units` must list every unit of those
    blocks); the kinds a mode prunes come from the model's family anatomy, or without `model`
    from the category every family declares for the kind (`mode_kinds`).

    Raises DitPruneError (one line) for a bad budget or mode, misaligned or non-finite scores,
    duplicate units, a mode none of whose kinds is in `units`, or a budget that removes no unit.
    """
    budget = check_budget(budget)
    _check_mode(mode)
    units = list(units)
    values = _scores_array(scores, len(units))
    if len(set(units)) != len(units):
        raise DitPruneError("units contain duplicates; each unit needs exactly one score")
    order = np.argsort(-values, kind="stable")  # highest first; ties keep the order of units
    sizes = _block_sizes(units, model)
    grouped = grouped_blocks(model, units) if model is not None else set()
    rank = {int(i): r for r, i in enumerate(order)}
    position = {u: i for i, u in enumerate(units)}
    if mode == "params":
        check_budget_for(budget, mode, {})
        costs = _unit_costs(units, model, mode)
        chosen = _select_params(units, order, budget, sizes, costs, model, grouped)
        return sorted(chosen, key=lambda u: rank[position[u]])
    family = f" of {adapter_for(model).family}" if model is not None else ""
    kinds = mode_kinds(mode, [u.kind for u in units], model, f"the scored units{family}")
    # both: each kind on its own; heads/neurons/cross_heads: their kinds pooled
    pools = [(kind,) for kind in kinds] if mode == "both" else [kinds]
    chosen: list[Unit] = []
    for pool in pools:
        candidates = [int(i) for i in order if units[i].kind in pool]
        label = _label(pool)
        target = units_to_remove(budget, len(candidates), label)
        taken = _take(units, candidates, target, sizes, [1] * len(units), model, grouped)
        grouped_kinds = [k for _, k in sorted(grouped) if k in pool]
        if not taken and grouped_kinds:
            _refuse_grouped(model, grouped, grouped_kinds[0],
                            f"budget {budget} ({target} of the {label}s)")
        if len(taken) < target and not grouped_kinds:  # the greedy walk took every unit it could
            raise DitPruneError(f"budget {budget} removes {target} {label}s, but at most "
                                f"{len(taken)} can go: every block keeps at least one {label}")
        chosen.extend(taken)
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


def _take(units: list[Unit], candidates: list[int], limit: float, sizes: Counter,
          weights: Sequence[float], model: nn.Module | None,
          grouped: set[tuple[int, str]]) -> list[Unit]:
    """Walk `candidates` (best first), taking each unit whose weight still fits in `limit`;
    every block keeps one unit of each kind; in a grouped-query block (`grouped`) the taken
    heads are the largest removable subset of those chosen so far (module docstring)."""
    taken: list[Unit] = []  # units of blocks without key/value groups
    removed: Counter = Counter()
    pending: dict[tuple[int, str], list[Unit]] = {}  # grouped blocks: heads chosen so far
    balanced: dict[tuple[int, str], list[Unit]] = {}  # ... and their removable subset
    weight = {units[i]: weights[i] for i in candidates}
    total = 0.0
    for i in candidates:
        if total >= limit:
            break
        unit = units[i]
        key = (unit.block, unit.kind)
        if key in grouped:
            trial = balance_kv_groups(model, [*pending.get(key, []), unit])
            change = sum(weight[u] for u in trial) - sum(weight[u] for u in balanced.get(key, []))
            if total + change > limit:
                continue
            pending[key] = [*pending.get(key, []), unit]
            balanced[key] = trial
            total += change
            continue
        if total + weights[i] > limit or removed[key] + 1 >= sizes[key]:
            continue  # over budget, or would empty the block
        removed[key] += 1
        total += weights[i]
        taken.append(unit)
    return taken + [u for key in sorted(balanced) for u in balanced[key]]


def _refuse_grouped(model: nn.Module | None, grouped: set[tuple[int, str]], kind: str,
                    what: str) -> None:
    """One-line error for a budget that grouped-query blocks leave without any removal."""
    sizes = [(smallest_removal(model, b, k), b) for b, k in sorted(grouped) if k == kind]
    sizes = [(n, b) for n, b in sizes if n is not None]
    if not sizes:
        raise DitPruneError(f"{what} removes no unit")
    smallest, block = min(sizes)
    raise DitPruneError(
        f"{what} removes none: {adapter_for(model).family} {kind}s share key/value heads in "
        f"groups, and a block's removal must be whole groups or the same number from every "
        f"group, at least {smallest} {kind}s (block {block}); give a larger budget")


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
    units: list[Unit], order: np.ndarray, budget: float, sizes: Counter, costs: list[int],
    model: nn.Module | None, grouped: set[tuple[int, str]],
) -> list[Unit]:
    """Greedy by score: take each unit whose parameters still fit in the budget (a grouped-
    query head's key/value rows are not counted: `BlockAdapter.unit_cost`)."""
    target = budget * sum(costs)
    if costs and min(costs) > target:
        smallest = math.ceil(min(costs) / sum(costs) * 1000) / 1000
        raise DitPruneError(f"budget {budget} of the units' {sum(costs)} parameters removes no "
                            f"unit; the smallest that removes one is {smallest:g}")
    taken = _take(units, [int(j) for j in order], target, sizes, costs, model, grouped)
    if not taken and grouped:
        _refuse_grouped(model, grouped, min(k for _, k in grouped),
                        f"budget {budget} of {sum(costs)} parameters")
    return taken
