"""One anatomy per supported diffusers transformer family, by class name.

Example:
    >>> sorted(ANATOMIES)[:3]
    ['CogView3PlusTransformer2DModel', 'CogView4Transformer2DModel', 'DiTTransformer2DModel']
    >>> ANATOMIES["FluxTransformer2DModel"].kinds
    ('joint_head', 'neuron', 'context_neuron', 'single_head', 'single_neuron')
    >>> kind_category("single_head"), kind_category("cross_head")
    ('head', 'cross_head')
"""

from __future__ import annotations

from dit_prune.errors import DitPruneError
from dit_prune.units.anatomy import Anatomy
from dit_prune.units.families import (
    cogview3plus,
    cogview4,
    dit,
    flux,
    hunyuan,
    lumina2,
    pixart,
    qwenimage,
    sana,
    sd3,
)

ANATOMIES: dict[str, Anatomy] = {
    module.ANATOMY.family: module.ANATOMY
    for module in (dit, pixart, sd3, flux, qwenimage, sana, hunyuan, cogview3plus, cogview4,
                   lumina2)
}


def kind_category(kind: str) -> str:
    """The category ("head", "cross_head" or "neuron") every family declaring `kind` gives it
    (`UnitKind.category`); for selecting units without a model at hand. Raises
    DitPruneError when no family declares `kind`, or two declare it differently."""
    found = {a.category(kind) for a in ANATOMIES.values() if kind in a.kinds}
    if len(found) != 1:
        known = sorted({k for a in ANATOMIES.values() for k in a.kinds})
        raise DitPruneError(f"unit kind {kind!r} has no single category (declared: "
                            f"{sorted(found) or 'none'}; known kinds: {', '.join(known)})")
    return found.pop()
