"""Unit anatomy as data: which layers (sites) and channels one unit of one kind owns.

A family declares its block lists, and per block list its unit kinds. A kind lists its
up-projection sites (output channels the unit owns), its down-projection sites (input channels),
the 1-D parameters sliced with it (a norm that spans all heads), the key/value projections of a
grouped-query attention, and the attention module whose bookkeeping (`heads`, `inner_dim`,
`inner_kv_dim`) follows its head count. Everything else (enumeration, ablation hooks, removal,
reloading, unit cost) reads these declarations (`dit_prune.units.adapters.BlockAdapter`).

Every kind also declares its `category`, what budget modes select it by
(`dit_prune.pruning.selection`): "head" (self- or joint-attention heads: the `heads` mode),
"cross_head" (cross-attention heads to the text: `cross_heads`) or "neuron" (MLP neurons of
either stream: `neurons`). A kind name has one category in every family
(`dit_prune.units.families.kind_category`).

Channels of the unit at current position p of a kind of width w (head dimension for heads, 1 for
neurons), in one site whose layer has C channels along the pruned dimension:

| site | channels |
|---|---|
| up (`Linear` rows / conv output channels) | `[p·w, (p+1)·w)` |
| up, `glu=True` ([value; gate] halves) | the above and the same plus C/2 |
| down (`Linear` columns / conv input channels) | `[a + p·w, a + (p+1)·w)`, a: width of `after` |
| norm (1-D weight across all heads) | `[p·w, (p+1)·w)` |

Example:
    >>> from dit_prune.units.unit import NEURON
    >>> kind = UnitKind(NEURON, ups=(Site("ff.net.0.proj", glu=True),), downs=(Site("ff.net.2"),),
    ...                 category=NEURON_CATEGORY)
    >>> kind.name, kind.category, [s.path for s in kind.sites]
    ('neuron', 'neuron', ['ff.net.0.proj', 'ff.net.2'])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from dit_prune.errors import DitPruneError

HEAD_CATEGORY = "head"  # self- or joint-attention heads: budget mode `heads`
CROSS_HEAD_CATEGORY = "cross_head"  # cross-attention heads: budget mode `cross_heads`
NEURON_CATEGORY = "neuron"  # MLP neurons (image, text or single stream): budget mode `neurons`
CATEGORIES = (HEAD_CATEGORY, CROSS_HEAD_CATEGORY, NEURON_CATEGORY)


@dataclass(frozen=True)
class Site:
    """One layer of a block that holds channels of every unit of a kind.

    `path` is the module path inside the block (`"attn.to_q"`, `"ff.net.2"`); `glu` marks an
    up-projection whose output is [value; gate] (GEGLU/SwiGLU `proj`, GLUMBConv convs), so a
    unit owns channel c and C/2 + c; `after` (down sites only) names the module whose output
    width precedes the unit's columns (Flux single blocks: `proj_out` reads
    `cat[attention, mlp]`, so MLP neuron j is column A + j with A the current attention width);
    `optional` sites may be missing in some blocks (SD3's last, `context_pre_only`, block has
    no `attn.to_add_out`).
    """

    path: str
    glu: bool | str = False  # True, False, or "auto": GLU when the parent is GEGLU/SwiGLU
    after: str | None = None
    optional: bool = False


@dataclass(frozen=True)
class UnitKind:
    """One kind of unit (a head or neuron kind) of a block list.

    `attention` is the path of the attention module whose heads these are (None for neurons);
    `norms` are 1-D parameters that span every head (RMSNorm across heads: sliced with the
    head, and ablation renormalises over the kept heads to match); `kv_ups` are the key/value
    projections of a grouped-query attention (a key/value head goes only with its whole group
    of query heads); `count_attr` is a block attribute holding the unit count (Flux single
    blocks' `mlp_hidden_dim`); `where` is a short human description for docs and errors.
    `category` is one of `CATEGORIES` (module docstring): what the `heads`, `cross_heads` and
    `neurons` budget modes select the kind by. Raises DitPruneError for any other category, or
    for a head category without `attention` (or a neuron with one).
    """

    name: str
    ups: tuple[Site, ...]
    downs: tuple[Site, ...]
    attention: str | None = None
    norms: tuple[Site, ...] = ()
    kv_ups: tuple[Site, ...] = ()
    count_attr: str | None = None
    where: str = ""
    category: str = ""

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise DitPruneError(f"unit kind {self.name!r} needs a category, one of {CATEGORIES}; "
                                f"got {self.category!r}")
        if (self.category == NEURON_CATEGORY) != (self.attention is None):
            raise DitPruneError(f"unit kind {self.name!r}: category {self.category!r} does not "
                                f"fit attention={self.attention!r} (heads have one, neurons not)")

    @property
    def sites(self) -> tuple[Site, ...]:
        return self.ups + self.downs + self.norms + self.kv_ups


@dataclass(frozen=True)
class BlockList:
    """A `ModuleList` attribute of the model and the unit kinds its blocks hold."""

    path: str
    kinds: tuple[UnitKind, ...]


InputsFn = Callable[..., dict[str, Any]]  # (model, batch, seed, side) -> forward kwargs


@dataclass(frozen=True)
class Anatomy:
    """Where the units of one diffusers transformer family live.

    Blocks are numbered across the block lists in the order given (Flux: the double blocks,
    then the single blocks), so a `Unit`'s `block` indexes that concatenation.
    `default_kinds` are the kinds enumerated when none are asked for; `inputs` builds example
    forward kwargs `(model, batch, seed, side) -> dict` (None: the DiT/PixArt builder in
    `dit_prune.pruning.inputs`); `graph_check` cross-checks every removal on torch-pruning's
    DependencyGraph (only where it traces the family correctly); `refused` documents what
    the family cannot prune and why.
    """

    family: str
    block_lists: tuple[BlockList, ...]
    default_kinds: tuple[str, ...]
    inputs: InputsFn | None = None
    graph_check: bool = False
    refused: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        categories: dict[str, str] = {}
        for block_list in self.block_lists:
            for kind in block_list.kinds:
                if categories.setdefault(kind.name, kind.category) != kind.category:
                    raise DitPruneError(f"{self.family}: unit kind {kind.name!r} is declared "
                                        f"as {categories[kind.name]!r} and {kind.category!r}")

    def category(self, kind: str) -> str:
        """The category of `kind` (`UnitKind.category`); a one-line error for a kind the
        family does not declare."""
        for block_list in self.block_lists:
            for spec in block_list.kinds:
                if spec.name == kind:
                    return spec.category
        raise DitPruneError(f"{self.family} has no units of kind {kind!r}; its kinds: "
                            f"{', '.join(self.kinds)}")

    def kinds_of(self, category: str) -> tuple[str, ...]:
        """The kinds of `category`, in declaration order (e.g. SD3 "head": joint_head,
        dual_head)."""
        return tuple(k for k in self.kinds if self.category(k) == category)

    @property
    def kinds(self) -> tuple[str, ...]:
        """Every kind of every block list, in declaration order, without repeats."""
        names: list[str] = []
        for block_list in self.block_lists:
            names += [k.name for k in block_list.kinds if k.name not in names]
        return tuple(names)


def get_module(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule at dotted `path` (ModuleList indices as digits), or None if absent."""
    module: Any = root
    for part in path.split("."):
        if module is None:
            return None
        module = module[int(part)] if part.isdigit() else getattr(module, part, None)
    return module if isinstance(module, nn.Module) else None


def set_module(root: nn.Module, path: str, value: nn.Module) -> None:
    """Replace the submodule at dotted `path`."""
    parent_path, _, name = path.rpartition(".")
    parent = get_module(root, parent_path) if parent_path else root
    if parent is None:
        raise DitPruneError(f"no module {parent_path!r} to hold {name!r}")
    if name.isdigit():
        parent[int(name)] = value
    else:
        setattr(parent, name, value)
