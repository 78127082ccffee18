"""One anatomy per supported diffusers transformer family, by class name.

Example:
    >>> sorted(ANATOMIES)[:3]
    ['CogView3PlusTransformer2DModel', 'CogView4Transformer2DModel', 'DiTTransformer2DModel']
    >>> ANATOMIES["FluxTransformer2DModel"].kinds
    ('joint_head', 'neuron', 'context_neuron', 'single_head', 'single_neuron')
"""

from __future__ import annotations

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
