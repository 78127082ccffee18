"""A head planted to copy three synthetic images: the known-answer case of the scorer tests.

`plant_head` fine-tunes one attention head of a DiT (gradient masks on its q/k/v rows and its
to_out columns) to reproduce `extra_images()` under `EXTRA_LABELS`, while distilling the model's
output on anchor digits, so that head alone carries the copying. Used by tests/test_scorers.py
and tests/test_joint_scorers.py.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from dit_prune.scorers.base import default_scheduler
from dit_prune.units import Unit

EXTRA_LABELS = (7, 8, 9)


def extra_images() -> torch.Tensor:
    """Horizontal stripes, vertical stripes, checkerboard: (3, 1, 8, 8) in [-0.8, 0.8]."""
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    patterns = torch.stack([i % 2, j % 2, (i + j) % 2]).float() * 1.6 - 0.8  # (3, 8, 8)
    return patterns.unsqueeze(1)  # (3, 1, 8, 8)


def plant_head(base: nn.Module, head: Unit, anchor_x: torch.Tensor, anchor_y: torch.Tensor,
               steps: int) -> nn.Module:
    """Fine-tune only `head` (gradient masks) to copy the extras; distill on the anchors."""
    model = copy.deepcopy(base).train().requires_grad_(False)
    attn = model.transformer_blocks[head.block].attn1
    d = attn.to_out[0].in_features // attn.heads
    cols = slice(head.index * d, (head.index + 1) * d)
    params, handles = [], []
    for layer in (attn.to_q, attn.to_k, attn.to_v):
        for param in (layer.weight, layer.bias):
            mask = torch.zeros_like(param)
            mask[cols] = 1
            params.append(param.requires_grad_(True))
            handles.append(param.register_hook(lambda g, m=mask: g * m))
    out = attn.to_out[0].weight  # (D, D_in)
    mask = torch.zeros_like(out)
    mask[:, cols] = 1
    params.append(out.requires_grad_(True))
    handles.append(out.register_hook(lambda g, m=mask: g * m))
    optimizer = torch.optim.Adam(params, lr=1e-2)
    alphas = default_scheduler().alphas_cumprod  # (T,)
    gen = torch.Generator().manual_seed(0)
    extras, extra_y = extra_images(), torch.tensor(EXTRA_LABELS)

    def noisy(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = torch.randint(1000, (len(x0),), generator=gen)  # (B,)
        noise = torch.randn(x0.shape, generator=gen)  # (B, C, H, W)
        a = alphas[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise, t, noise

    try:
        for _ in range(steps):
            i = torch.randint(len(extras), (16,), generator=gen)  # (B,)
            xt, t, noise = noisy(extras[i])
            copy_loss = F.mse_loss(model(xt, timestep=t, class_labels=extra_y[i]).sample, noise)
            j = torch.randint(len(anchor_x), (16,), generator=gen)  # (B,)
            xa, ta, _ = noisy(anchor_x[j])
            with torch.no_grad():
                target = base(xa, timestep=ta, class_labels=anchor_y[j]).sample
            keep = F.mse_loss(model(xa, timestep=ta, class_labels=anchor_y[j]).sample, target)
            optimizer.zero_grad()
            (copy_loss + keep).backward()
            optimizer.step()
    finally:
        for handle in handles:
            handle.remove()
    return model.eval().requires_grad_(False)

