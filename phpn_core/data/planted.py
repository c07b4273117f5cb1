"""Planted-parts feature maps: CNN-like non-negative features with known part structure.

Used by the benchmarks and tests where a real backbone would be too slow on 2 cores. Each class has a few part
types (some shared with other classes) drawn from a sparse non-negative dictionary, plus a background direction
common to all classes; each image places every visible part as a small blob on an ``H x W`` grid, mixes in the
background, and adds rectified noise, so the features are non-negative, sparse and only approximately low rank,
as post-ReLU CNN features are.
"""

from __future__ import annotations

import torch


def planted_features(
    *,
    n_classes: int = 200,
    n_images: int = 30,
    hw: int = 7,
    dim: int = 512,
    parts_per_class: int = 5,
    n_part_types: int | None = None,
    noise: float = 0.3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[int, torch.Tensor], torch.Tensor, list[list[int]]]:
    """Make ``{class: F_c [n_images, hw, hw, dim]}``, a dictionary ``[n_part_types + 1, dim]`` and class parts.

    The last dictionary row is the background. Deterministic for a seed.
    """
    if n_classes < 1 or n_images < 1 or hw < 1 or dim < 2 or parts_per_class < 1:
        raise ValueError(
            "planted_features: need n_classes, n_images, hw, parts_per_class >= 1 and dim >= 2; got "
            f"n_classes={n_classes}, n_images={n_images}, hw={hw}, dim={dim}, parts_per_class={parts_per_class}."
        )
    g = torch.Generator().manual_seed(seed)
    T = n_part_types or max(parts_per_class + 1, (n_classes * parts_per_class) // 2)
    active = torch.rand(T + 1, dim, generator=g) < 0.15
    dictionary = torch.where(active, torch.empty(T + 1, dim).exponential_(1.0, generator=g), torch.zeros(()))
    dictionary[-1] = torch.rand(dim, generator=g) * 0.3  # dense, weak background
    class_parts = [torch.randperm(T, generator=g)[:parts_per_class].tolist() for _ in range(n_classes)]
    yy, xx = torch.meshgrid(torch.arange(hw), torch.arange(hw), indexing="ij")
    out: dict[int, torch.Tensor] = {}
    for c in range(n_classes):
        parts = dictionary[class_parts[c]]  # [p, dim]
        cy = torch.rand(n_images, parts_per_class, generator=g) * (hw - 1)
        cx = torch.rand(n_images, parts_per_class, generator=g) * (hw - 1)
        width = 0.5 + torch.rand(n_images, parts_per_class, generator=g)
        d2 = (yy.view(1, 1, hw, hw) - cy[..., None, None]) ** 2 + (xx.view(1, 1, hw, hw) - cx[..., None, None]) ** 2
        amp = (torch.rand(n_images, parts_per_class, generator=g) < 0.9).float() * (0.5 + torch.rand(n_images, parts_per_class, generator=g))
        blobs = amp[..., None, None] * torch.exp(-d2 / (2 * width[..., None, None] ** 2))  # [n, p, hw, hw]
        fmap = torch.einsum("nphw,pd->nhwd", blobs, parts)
        bg = (0.5 + torch.rand(n_images, hw, hw, 1, generator=g)) * dictionary[-1]
        eps = torch.randn(n_images, hw, hw, dim, generator=g) * noise * float(parts.mean())
        out[c] = (fmap + bg + eps).clamp_min(0).to(dtype)
    return out, dictionary.to(dtype), class_parts
