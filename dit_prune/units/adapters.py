"""Model-family adapters: read a family's declared anatomy (`dit_prune.units.families`) off a
model instance: its blocks, the unit kinds each block has, every site's channels of a unit.

A legacy `Transformer2DModel` instance counts as the class diffusers maps it to
(`dit_prune.legacy.family_name`). Blocks are numbered across the family's block lists
(Flux: double blocks, then single blocks). Units keep their original (unpruned) numbering: a
block records, per kind, the original indices still present (`kept`).

Example:
    >>> from dit_prune.models import new_dit
    >>> adapter = adapter_for(new_dit("tiny", 10, 8, 1))
    >>> adapter.kinds
    ('head', 'neuron')
    >>> block = adapter.blocks(new_dit("tiny", 10, 8, 1))[0]
    >>> adapter.count(block, "head"), adapter.width(block, "head")
    (4, 32)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dit_prune.errors import DitPruneError
from dit_prune.legacy import family_name
from dit_prune.units.anatomy import Anatomy, Site, UnitKind, get_module
from dit_prune.units.families import ANATOMIES

KEPT_ATTRIBUTE = "dit_prune_kept"  # per-block {kind: original indices still present}
GLU_ACTIVATIONS = ("GEGLU", "SwiGLU")  # diffusers activations whose proj holds [value; gate]


def out_channels(module: nn.Module) -> int:
    """Output width along the pruned dimension: Linear rows, conv output channels, 1-D length."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    weight = getattr(module, "weight", None)
    if weight is None:
        raise DitPruneError(f"{type(module).__name__} has no weight to count channels of")
    return int(weight.shape[0])


def in_channels(module: nn.Module) -> int:
    """Input width: Linear columns, conv input channels."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Conv2d):
        return module.in_channels
    raise DitPruneError(f"{type(module).__name__} is no down-projection (Linear or Conv2d)")


def norm_width(module: nn.Module) -> int:
    """Length of the last dimension a norm normalises (its weight, or its declared shape)."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[-1])
    shape = getattr(module, "normalized_shape", None) or getattr(module, "dim", None)
    return int(tuple(shape)[-1]) if shape is not None else -1


def channel_dim(module: nn.Module) -> int:
    """The dimension of a down-projection's input that holds channels: -1 for Linear, 1 for conv."""
    return 1 if isinstance(module, nn.Conv2d) else -1


@dataclass(frozen=True)
class BlockAdapter:
    """Reads one family's `Anatomy` off a model: blocks, kinds per block, channels per site."""

    anatomy: Anatomy

    @property
    def family(self) -> str:
        return self.anatomy.family

    @property
    def kinds(self) -> tuple[str, ...]:
        return self.anatomy.kinds

    @property
    def default_kinds(self) -> tuple[str, ...]:
        return self.anatomy.default_kinds

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """Every block of every block list, in the anatomy's order."""
        found: list[nn.Module] = []
        for block_list in self.anatomy.block_lists:
            modules = get_module(model, block_list.path)
            found += list(modules) if modules is not None else []
        return found

    def spec(self, block: nn.Module, kind: str) -> UnitKind | None:
        """The declaration of `kind` that `block` holds (all its required sites exist), or None."""
        for block_list in self.anatomy.block_lists:
            for spec in block_list.kinds:
                if spec.name == kind and all(
                    site.optional or get_module(block, site.path) is not None
                    for site in spec.sites
                ):
                    return spec
        return None

    def require(self, block: nn.Module, kind: str) -> UnitKind:
        spec = self.spec(block, kind)
        if spec is None:
            raise DitPruneError(f"{self.family} block {type(block).__name__} has no units of "
                                f"kind {kind!r}")
        return spec

    def kinds_in(self, block: nn.Module) -> tuple[str, ...]:
        """The kinds `block` holds, in the anatomy's order."""
        return tuple(k for k in self.kinds if self.spec(block, k) is not None)

    def modules(self, block: nn.Module, sites: tuple[Site, ...]) -> list[tuple[Site, nn.Module]]:
        """The sites present in `block` with their modules (optional absent ones skipped)."""
        pairs = [(site, get_module(block, site.path)) for site in sites]
        return [(site, module) for site, module in pairs if module is not None]

    def attention(self, block: nn.Module, kind: str) -> nn.Module:
        """The attention module whose heads are units of `kind`."""
        spec = self.require(block, kind)
        attn = get_module(block, spec.attention) if spec.attention else None
        if attn is None:
            raise DitPruneError(f"{self.family}: {kind!r} units are no attention heads")
        return attn

    def is_head(self, block: nn.Module, kind: str) -> bool:
        return self.require(block, kind).attention is not None

    def width(self, block: nn.Module, kind: str) -> int:
        """Channels per unit: the head dimension for heads, 1 for neurons."""
        if not self.is_head(block, kind):
            return 1
        attn = self.attention(block, kind)
        return int(attn.inner_dim) // int(attn.heads)

    def count(self, block: nn.Module, kind: str) -> int:
        """Units of `kind` currently present in `block` (0 when the block has none)."""
        spec = self.spec(block, kind)
        if spec is None:
            return 0
        site, module = self.modules(block, spec.ups)[0]
        return out_channels(module) // (self.width(block, kind) * (2 if self.is_glu(block, site)
                                                                    else 1))

    def kept(self, block: nn.Module, kind: str) -> list[int]:
        """Original (unpruned) indices of the units present, in their current order."""
        recorded = getattr(block, KEPT_ATTRIBUTE, {}).get(kind)
        return list(recorded) if recorded is not None else list(range(self.count(block, kind)))

    def set_kept(self, block: nn.Module, kind: str, indices: list[int]) -> None:
        recorded = dict(getattr(block, KEPT_ATTRIBUTE, {}))
        recorded[kind] = [int(i) for i in indices]
        setattr(block, KEPT_ATTRIBUTE, recorded)

    # -- channels -----------------------------------------------------------------------------
    def unit_channels(self, block: nn.Module, kind: str, positions: list[int]) -> list[int]:
        """Channels `[p·w, (p+1)·w)` of the units at current `positions`, sorted."""
        width = self.width(block, kind)
        return sorted(p * width + c for p in positions for c in range(width))

    def is_glu(self, block: nn.Module, site: Site) -> bool:
        """True when the site's output is [value; gate]: declared so, or `glu="auto"` and the
        site's parent is a diffusers GEGLU/SwiGLU activation."""
        if site.glu == "auto":
            parent = get_module(block, site.path.rpartition(".")[0])
            return type(parent).__name__ in GLU_ACTIVATIONS
        return bool(site.glu)

    def up_channels(self, block: nn.Module, site: Site, module: nn.Module,
                    base: list[int]) -> list[int]:
        """Output channels of an up site (GLU: also the gate half)."""
        if self.is_glu(block, site):
            half = out_channels(module) // 2
            return sorted(base + [half + c for c in base])
        return list(base)

    def down_offset(self, block: nn.Module, site: Site) -> int:
        """First column of the units in a down site (the width of `site.after`, or 0)."""
        if site.after is None:
            return 0
        before = get_module(block, site.after)
        if before is None:
            raise DitPruneError(f"{self.family}: no module {site.after!r} in the block")
        return out_channels(before)

    def down_channels(self, block: nn.Module, site: Site, base: list[int]) -> list[int]:
        offset = self.down_offset(block, site)
        return [offset + c for c in base]

    def kv_positions(self, block: nn.Module, kind: str, positions: list[int]) -> list[int]:
        """Grouped-query attention: the key/value heads whose whole group of query heads is in
        `positions` (current numbering). Refuses unbalanced removals with one line: every
        group that keeps heads must keep the same number, or the query -> key/value mapping
        (`repeat` of each key/value head over its group) no longer holds."""
        spec = self.require(block, kind)
        if not spec.kv_ups:
            return []
        heads = self.count(block, kind)
        kv_heads = out_channels(self.modules(block, spec.kv_ups)[0][1]) // self.width(block, kind)
        group = heads // kv_heads
        gone = set(positions)
        left = [sum(1 for h in range(g * group, (g + 1) * group) if h not in gone)
                for g in range(kv_heads)]
        kept_sizes = {n for n in left if n}
        if len(kept_sizes) > 1:
            raise DitPruneError(
                f"{self.family}: unbalanced removal of {kind}s in a block with {kv_heads} "
                f"key/value groups of {group} query heads: the groups would keep {left} heads; "
                f"remove the same number from every kept group, or whole groups")
        return [g for g, n in enumerate(left) if n == 0]

    def norm_modules(self, block: nn.Module, kind: str) -> list[nn.Module]:
        """The declared norms that span every unit of `kind` (e.g. RMSNorm across heads);
        norms over one head's channels are shared by all heads and not listed."""
        spec = self.require(block, kind)
        total = self.count(block, kind) * self.width(block, kind)
        return [m for _, m in self.modules(block, spec.norms) if norm_width(m) == total]

    # -- cost ---------------------------------------------------------------------------------
    def unit_cost(self, block: nn.Module, kind: str) -> int:
        """Parameters one unit of `kind` holds in `block`: its rows of every up site (and
        biases), columns of every down site, entries of every sliced 1-D parameter (key/value
        heads of a grouped-query attention are not counted: they go only with a whole group)."""
        spec = self.require(block, kind)
        width = self.width(block, kind)
        total = 0
        for site, module in self.modules(block, spec.ups):
            rows = width * (2 if self.is_glu(block, site) else 1)
            total += rows * _row_cost(module)
        for _, module in self.modules(block, spec.downs):
            total += width * _column_cost(module)
        for module in self.norm_modules(block, kind):
            total += width * sum(1 for p in module.parameters(recurse=False) if p.ndim == 1)
        return total

    def removal_cost(self, block: nn.Module, kind: str, positions: list[int]) -> int:
        """Parameters removing the units at `positions` frees (key/value heads included)."""
        total = self.unit_cost(block, kind) * len(positions)
        spec = self.require(block, kind)
        kv = self.kv_positions(block, kind, positions)
        if kv:
            width = self.width(block, kind)
            total += len(kv) * width * sum(_row_cost(m) for _, m in
                                           self.modules(block, spec.kv_ups))
        return total


def _row_cost(module: nn.Module) -> int:
    """Parameters of one output channel: its weight row (kernel included) and bias."""
    weight = module.weight
    return int(weight[0].numel()) + (getattr(module, "bias", None) is not None)


def _column_cost(module: nn.Module) -> int:
    """Parameters of one input channel of a down-projection: its weight column."""
    return int(module.weight[:, 0].numel())


ADAPTERS: dict[str, BlockAdapter] = {name: BlockAdapter(a) for name, a in ANATOMIES.items()}


def adapter_for(model: nn.Module) -> BlockAdapter:
    """The adapter of `model`'s family; a one-line error for anything unsupported."""
    adapter = ADAPTERS.get(family_name(model))
    if adapter is None or not adapter.blocks(model):
        raise DitPruneError(
            f"unsupported model: {type(model).__name__} (supported: {', '.join(ADAPTERS)}, "
            f"and Transformer2DModel with norm_type ada_norm_zero or ada_norm_single)"
        )
    return adapter
