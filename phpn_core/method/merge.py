"""Merging duplicate prototypes (``decompose_head(..., auto_k=True)``): which refined prototypes of a class have
duplicate maps on its training features, and how their sums form the class's slots. A sum keeps the head row's sum
exact; a duplicate pair covers one part, so no part is lost."""

from __future__ import annotations

import torch

from phpn_core.method.redundancy import gram_cosines

__all__ = ["map_gram", "group_signs", "merge_duplicates"]


def map_gram(maps: torch.Tensor, W: torch.Tensor, alpha: torch.Tensor, hw: int | None) -> torch.Tensor:
    """Gram matrix ``[C, k, k]`` of the refined prototypes' per-image-centred maps on the training features, from
    the refinement's maps of ``Z = [P; R]`` ``[C, m, k+1]`` (no read of X): prototype i's map is
    ``maps @ (alpha_i e_i + W_i)``."""
    C, m, k1 = maps.shape
    coef = W.clone()
    coef[:, :, : k1 - 1] += torch.diag_embed(alpha)
    final = torch.bmm(maps, coef.transpose(1, 2))  # [C, m, k]
    per_image = hw if hw and m % hw == 0 else m  # padding rows are zero images: they change nothing
    f = final.reshape(C, m // per_image, per_image, k1 - 1)
    f = f - f.mean(2, keepdim=True)
    return torch.einsum("cnpi,cnpj->cij", f, f)


def group_signs(T: torch.Tensor, G: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Each merged slot's orientation: the sign of its member with the largest map (``T [C, k, k]`` 0/1 rows)."""
    size = torch.diagonal(G, dim1=1, dim2=2).clamp_min(0).sqrt()  # [C, k]
    lead = (T * size.unsqueeze(1)).argmax(2)  # [C, k]
    return torch.where(torch.gather(alpha, 1, lead) < 0, -1.0, 1.0).to(alpha)


def merge_duplicates(G: torch.Tensor, signs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which prototypes to merge: ``T [C, k, k]`` with 0/1 entries, row s = the old prototypes summed into slot s
    (every old prototype in exactly one row, so the prototypes' sum is unchanged; empty rows last).

    Greedy per class: while two slots' oriented maps have a cosine above ``threshold``, the most similar pair
    becomes one slot (its map the sum of theirs, oriented like its larger member). ``G`` ``[C, k, k]``: Gram of
    the centred raw maps; ``signs`` ``[C, k]``: sign(alpha)."""
    C, k, _ = G.shape
    Gc, sc = G.cpu().double(), signs.cpu()
    T = torch.eye(k, dtype=torch.float64).repeat(C, 1, 1)
    # only classes with a pair above the threshold need the greedy loop: one batched check for all
    oriented = gram_cosines(Gc, torch.where(sc < 0, -1.0, 1.0)) - 3 * torch.eye(k, dtype=torch.float64)
    for c in (oriented.flatten(1).amax(1) > threshold).nonzero().flatten().tolist():
        groups = [[i] for i in range(k)]
        size = torch.diagonal(Gc[c]).clamp_min(0).sqrt()
        while len(groups) > 1:
            M = torch.zeros(len(groups), k, dtype=torch.float64)
            for g, members in enumerate(groups):
                M[g, members] = 1.0
            Gg = M @ Gc[c] @ M.T
            s = torch.tensor([1.0 if sc[c, max(mem, key=lambda i: float(size[i]))] >= 0 else -1.0 for mem in groups],
                             dtype=torch.float64)
            cos = gram_cosines(Gg[None], s[None])[0]
            cos.fill_diagonal_(float("-inf"))
            a, b = divmod(int(cos.argmax()), len(groups))
            if not float(cos[a, b]) > threshold:
                break
            groups[min(a, b)] = groups[min(a, b)] + groups[max(a, b)]
            del groups[max(a, b)]
        T[c] = 0.0
        for g, members in enumerate(sorted(groups)):
            T[c, g, members] = 1.0
    return T
