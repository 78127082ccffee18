"""Seeded image augmentations on the [-1, 1] scale, (N, C, H, W) in and out.

Used to train the digits classifier (shifts) and the copy-detection embedding (all of them):
a copy detector must call an image a copy through small shifts, blur, contrast and brightness
changes, Gaussian noise and speckle.

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.zeros(4, 1, 8, 8)
    >>> copy_views(x, g).shape
    torch.Size([4, 1, 8, 8])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1,
                 fill: float = -1.0) -> torch.Tensor:
    """Shift each image by its own (dy, dx) in [-max_shift, max_shift], filling with `fill`."""
    n, c, h, w = images.shape
    s = max_shift
    padded = F.pad(images, (s, s, s, s), value=fill)  # (N, C, H + 2s, W + 2s)
    dy = torch.randint(0, 2 * s + 1, (n,), generator=generator)  # (N,)
    dx = torch.randint(0, 2 * s + 1, (n,), generator=generator)  # (N,)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, w + 2 * s)
    tall = padded.gather(2, rows)  # (N, C, H, W + 2s)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
    return tall.gather(3, cols)  # (N, C, H, W)


def random_blur(images: torch.Tensor, generator: torch.Generator, prob: float = 0.3,
                sigma_range: tuple[float, float] = (0.3, 1.0), fill: float = -1.0) -> torch.Tensor:
    """3x3 Gaussian blur with a per-image sigma, applied to each image with probability `prob`."""
    n, c, h, w = images.shape
    sigma = torch.empty(n).uniform_(*sigma_range, generator=generator)  # (N,)
    offsets = torch.tensor([-1.0, 0.0, 1.0])  # (3,)
    g1 = torch.exp(-offsets[None, :] ** 2 / (2 * sigma[:, None] ** 2))  # (N, 3)
    kernel = (g1[:, :, None] * g1[:, None, :]).reshape(n, 9)  # (N, 9)
    kernel = kernel / kernel.sum(1, keepdim=True)
    patches = F.unfold(F.pad(images, (1, 1, 1, 1), value=fill), 3)  # (N, C*9, H*W)
    patches = patches.view(n, c, 9, h * w)  # (N, C, 9, HW)
    blurred = torch.einsum("nckp,nk->ncp", patches, kernel).view(n, c, h, w)  # (N, C, H, W)
    apply = (torch.rand(n, generator=generator) < prob).view(n, 1, 1, 1)  # (N, 1, 1, 1)
    return torch.where(apply, blurred, images)


def random_jitter(images: torch.Tensor, generator: torch.Generator,
                  contrast: tuple[float, float] = (0.7, 1.1),
                  brightness: tuple[float, float] = (-0.1, 0.15)) -> torch.Tensor:
    """Contrast and brightness jitter on the [0, 1] view: x01 * c + b, per image."""
    n = len(images)
    c = torch.empty(n, 1, 1, 1).uniform_(*contrast, generator=generator)  # (N, 1, 1, 1)
    b = torch.empty(n, 1, 1, 1).uniform_(*brightness, generator=generator)  # (N, 1, 1, 1)
    return (((images + 1) / 2) * c + b) * 2 - 1


def random_noise(images: torch.Tensor, generator: torch.Generator, max_sigma: float = 0.3,
                 prob: float = 0.8) -> torch.Tensor:
    """Gaussian noise with a per-image sigma in [0, max_sigma] (probability `prob`)."""
    n = len(images)
    sigma = torch.empty(n, 1, 1, 1).uniform_(0, max_sigma, generator=generator)  # (N, 1, 1, 1)
    sigma = sigma * (torch.rand(n, 1, 1, 1, generator=generator) < prob)
    return images + sigma * torch.randn(images.shape, generator=generator)


def random_speckle(images: torch.Tensor, generator: torch.Generator, max_fraction: float = 0.1,
                   prob: float = 0.3) -> torch.Tensor:
    """Replace a random fraction (up to `max_fraction`) of pixels by uniform values in [-1, 1]."""
    n = len(images)
    fraction = torch.empty(n, 1, 1, 1).uniform_(0, max_fraction, generator=generator)
    fraction = fraction * (torch.rand(n, 1, 1, 1, generator=generator) < prob)  # (N, 1, 1, 1)
    hit = torch.rand(images.shape, generator=generator) < fraction  # (N, C, H, W)
    values = torch.rand(images.shape, generator=generator) * 2 - 1  # (N, C, H, W)
    return torch.where(hit, values, images)


def copy_views(images: torch.Tensor, generator: torch.Generator, max_sigma: float = 0.3,
               noise_prob: float = 0.8) -> torch.Tensor:
    """One random "still a copy" view of each image: shift, blur, jitter, noise, speckle, clamp."""
    x = random_shift(images, generator)
    x = random_blur(x, generator)
    x = random_jitter(x, generator)
    x = random_noise(x, generator, max_sigma=max_sigma, prob=noise_prob)
    x = random_speckle(x, generator)
    return x.clamp(-1, 1)
