"""How alike two prototypes' maps are: the cosine of their per-image-centred maps over a class's images.

Shared by the decomposition (``decompose_head(..., auto_k=True)`` lowers a class's k while two of its prototypes'
maps on the training features are duplicates) and the evaluation (:mod:`phpn_core.evaluation.keypoint_free`'s
redundancy on test images), so both judge a duplicate the same way.

Centring: each map minus its spatial mean per image. Maps of non-negative features share a positive offset that
would make any two maps look alike; centring leaves where a map is high, which is what "the same part" means.
"""

from __future__ import annotations

import torch

__all__ = ["gram_cosines", "map_cosines", "max_cosine"]


def map_cosines(maps: torch.Tensor, *, center: bool = True) -> torch.Tensor:
    """Cosine between every two prototypes' maps, batched over classes.

    Args:
        maps: ``[C, n, hw, k]`` the maps of C classes' k prototypes at the hw positions of n images each (all-zero
            images, e.g. padding, change nothing). Not modified.
        center: subtract each map's mean over its image's positions first.

    Returns:
        float64 ``[C, k, k]`` (diagonal 1 for non-constant maps; 0 in the rows and columns of a constant map).
    """
    m = maps.detach().double()
    if center:
        m = m - m.mean(2, keepdim=True)
    return gram_cosines(torch.einsum("cnpi,cnpj->cij", m, m))


def gram_cosines(G: torch.Tensor, signs: torch.Tensor | None = None) -> torch.Tensor:
    """Cosines ``[C, k, k]`` from a Gram matrix of maps ``G [C, k, k]``; ``signs [C, k]`` (+-1) orients each map
    first. A map of (near) zero norm has cosine 0 with everything."""
    G = G.double()
    if signs is not None:
        s = signs.to(G)
        G = G * s.unsqueeze(2) * s.unsqueeze(1)
    norms = torch.diagonal(G, dim1=1, dim2=2).clamp_min(0).sqrt()  # [C, k]
    scale = norms.amax(1, keepdim=True).clamp_min(1.0)
    ok = norms > 1e-12 * scale
    inv = torch.where(ok, 1.0 / norms.clamp_min(1e-300), torch.zeros_like(norms))
    return (G * inv.unsqueeze(2) * inv.unsqueeze(1)).clamp(-1, 1)


def max_cosine(cos: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
    """Largest off-diagonal cosine per class: ``cos [C, k, k]`` (``active [C, k]`` bool: only pairs of active
    prototypes count) -> float64 ``[C]``; ``-inf`` where a class has fewer than two (active) prototypes."""
    C, k, _ = cos.shape
    pair = ~torch.eye(k, dtype=torch.bool, device=cos.device).unsqueeze(0)
    if active is not None:
        a = active.to(device=cos.device, dtype=torch.bool)
        pair = pair & a.unsqueeze(2) & a.unsqueeze(1)
    return torch.where(pair, cos.double(), torch.full_like(cos, float("-inf"), dtype=torch.float64)).flatten(1).amax(1)
