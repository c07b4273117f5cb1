"""Batched semi-NMF in torch: ``X ~= E @ P`` with ``E >= 0`` and ``P`` signed (Ding, Li & Jordan, TPAMI 2010).

For signed feature maps (LayerNormed ConvNeXt, Swin and ViT tokens), plain NMF does not apply. Semi-NMF keeps what
makes NMF's prototypes parts: every position is a non-negative mixture ``E`` of k prototypes, so a prototype is a
direction that some positions *have* (Ding et al. show semi-NMF is a soft k-means: with one-hot ``E`` it is exactly
k-means and ``P`` the centroids). Its map ``F p_i`` is high where the features look like ``p_i``.

Solver, all matrices of a batch at once (one code path on CPU and CUDA):

1. Start: seeded k-means++ seeding, then ``lloyd_iter`` Lloyd iterations (the start Ding et al. recommend), and
   ``E = onehot(assignment) + 0.2``.
2. Alternate: ``P = (E^T E + eps I)^-1 E^T X`` (the exact least-squares update) and HALS sweeps on ``E`` with ``P``
   fixed (``e_j <- max(0, e_j + ((X P^T)_j - E (P P^T)_j) / (P P^T)_jj)``, the exact block minimiser; faster than
   Ding's multiplicative rule, same fixed points). Each iteration reads X twice (``X P^T`` and ``E^T X``).
3. Stop when the relative error decreases by less than ``tol`` over ``check_every`` iterations.

Rows beyond ``row_counts`` are padding: they get ``E = 0`` and never join a cluster, so a matrix's result depends
only on its own rows and seed.
"""

from __future__ import annotations

import warnings

import torch

from phpn_core.method.factorization import (
    NMFConvergenceWarning,
    NMFResult,
    check_factorization_input,
    checked_item_seeds,
    checked_row_counts,
)

__all__ = ["semi_nmf"]


def _kmeans(X: torch.Tensor, mask: torch.Tensor, k: int, seeds: list[int], iters: int) -> torch.Tensor:
    """Seeded k-means++ then Lloyd: X ``[B, m, D]``, mask ``[B, m]`` (1 = real row) -> assignment ``[B, m]``."""
    B, m, D = X.shape
    sq = (X * X).sum(-1)  # [B, m]
    cents = torch.empty(B, k, D, dtype=X.dtype, device=X.device)
    for b in range(B):  # seeding is sequential in k; a CPU generator makes it device independent
        g = torch.Generator().manual_seed(int(seeds[b]))
        valid = mask[b].cpu() > 0
        idx = torch.nonzero(valid).squeeze(1)
        first = idx[torch.randint(len(idx), (1,), generator=g)]
        chosen = [int(first)]
        d2 = (sq[b] - 2 * X[b] @ X[b, chosen[0]] + sq[b, chosen[0]]).clamp_min(0).cpu() * valid
        for _ in range(1, k):
            total = float(d2.sum())
            if total > 0:
                nxt = int(torch.multinomial(d2 / total, 1, generator=g))
            else:  # fewer distinct rows than k: any unused real row
                nxt = int(next(i for i in idx.tolist() if i not in chosen))
            chosen.append(nxt)
            d_new = (sq[b] - 2 * X[b] @ X[b, nxt] + sq[b, nxt]).clamp_min(0).cpu() * valid
            d2 = torch.minimum(d2, d_new)
        cents[b] = X[b, chosen]
    assign = torch.full((B, m), -1, dtype=torch.long, device=X.device)
    moving = torch.ones(B, dtype=torch.bool, device=X.device)  # per matrix, so a batch never changes a result
    for _ in range(max(1, iters)):
        dist = sq.unsqueeze(-1) - 2 * torch.bmm(X, cents.transpose(1, 2)) + (cents * cents).sum(-1).unsqueeze(1)
        new = torch.where(moving.unsqueeze(1), dist.argmin(-1), assign)
        moving = moving & (new != assign).any(1)
        assign = new
        if not bool(moving.any()):
            break
        onehot = torch.nn.functional.one_hot(assign, k).to(X.dtype) * mask.unsqueeze(-1)
        counts = onehot.sum(1)  # [B, k]
        sums = torch.bmm(onehot.transpose(1, 2), X)
        upd = (counts > 0).unsqueeze(-1) & moving.view(B, 1, 1)
        cents = torch.where(upd, sums / counts.clamp_min(1).unsqueeze(-1), cents)
    return assign


def semi_nmf(
    X: torch.Tensor,
    k: int,
    *,
    max_iter: int = 300,
    tol: float = 1e-5,
    seed: int = 0,
    device: str | torch.device | None = None,
    lloyd_iter: int = 10,
    hals_sweeps: int = 2,
    check_every: int = 5,
    row_counts: torch.Tensor | None = None,
    item_seeds: list[int] | None = None,
) -> NMFResult:
    """Factorise signed ``X ~= E @ P`` with ``E >= 0``, one matrix or a batch at once.

    Args:
        X: ``[m, D]`` or ``[B, m, D]``, float32/float64, finite, any sign. Not modified.
        k: number of components, ``1 <= k <= min(m, D)``.
        max_iter: most alternating iterations.
        tol: stop when the relative error's relative decrease over ``check_every`` iterations is below ``tol``.
        seed: the k-means++ seed (matrix b uses ``seed + b`` unless ``item_seeds`` is given).
        device: where to compute (default: X's device). Results come back on that device.
        lloyd_iter: most Lloyd iterations of the k-means start.
        hals_sweeps: HALS sweeps over E per iteration (cheap: no product with X).
        check_every: iterations between convergence checks.
        row_counts: LongTensor ``[B]``: real rows per matrix when shorter ones are zero-padded to ``m``.
        item_seeds: one seed per matrix.

    Returns:
        :class:`~phpn_core.method.nmf.NMFResult` with ``E [.., m, k] >= 0``, ``P [.., k, D]`` (signed),
        ``rel_error`` ``||X - E P|| / ||X||``, ``n_iter``, ``converged``.
    """
    check_factorization_input(X, k, who="semi_nmf", nonnegative=False)
    if max_iter < 1 or not (tol >= 0) or check_every < 1 or hals_sweeps < 1:
        raise ValueError(
            f"semi_nmf: need max_iter >= 1, tol >= 0, check_every >= 1, hals_sweeps >= 1; got max_iter={max_iter}, "
            f"tol={tol}, check_every={check_every}, hals_sweeps={hals_sweeps}."
        )
    batched = X.ndim == 3
    dev = torch.device(device) if device is not None else X.device
    Xb = (X if batched else X.unsqueeze(0)).to(dev)
    B, m, D = Xb.shape
    rc = checked_row_counts(row_counts, B, m, k, dev, "semi_nmf")
    if rc is not None:
        mask = (torch.arange(m, device=dev).unsqueeze(0) < rc.unsqueeze(1)).to(Xb.dtype)
    else:
        mask = torch.ones(B, m, dtype=Xb.dtype, device=dev)
    item_seeds = checked_item_seeds(item_seeds, seed, B, "semi_nmf")

    assign = _kmeans(Xb, mask, k, list(item_seeds), lloyd_iter)
    E = (torch.nn.functional.one_hot(assign, k).to(Xb.dtype) + 0.2) * mask.unsqueeze(-1)
    xnorm2 = (Xb * Xb).sum((1, 2))
    eye = torch.eye(k, dtype=Xb.dtype, device=dev)

    def update_p(E):
        EtE = torch.bmm(E.transpose(1, 2), E)
        EtX = torch.bmm(E.transpose(1, 2), Xb)
        ridge = 1e-9 * torch.diagonal(EtE, dim1=1, dim2=2).mean(-1).clamp_min(1e-30).view(B, 1, 1)
        return torch.linalg.solve(EtE + ridge * eye, EtX), EtE, EtX

    P, EtE, EtX = update_p(E)
    n_iter = torch.zeros(B, dtype=torch.long, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    prev = None
    for it in range(max_iter):
        A = torch.bmm(Xb, P.transpose(1, 2))  # [B, m, k]
        G = torch.bmm(P, P.transpose(1, 2))  # [B, k, k]
        diag = torch.diagonal(G, dim1=1, dim2=2).clamp_min(1e-30)  # [B, k]
        E_new = E.clone()
        for _ in range(hals_sweeps):
            for j in range(k):
                step = (A[:, :, j] - torch.bmm(E_new, G[:, :, j : j + 1]).squeeze(-1)) / diag[:, j : j + 1]
                E_new[:, :, j] = (E_new[:, :, j] + step).clamp_min(0) * mask
        P_new, EtE_new, EtX_new = update_p(E_new)
        sel = active.view(B, 1, 1)
        E = torch.where(sel, E_new, E)
        P = torch.where(sel, P_new, P)
        EtE = torch.where(sel, EtE_new, EtE)
        EtX = torch.where(sel, EtX_new, EtX)
        n_iter += active.long()
        if (it + 1) % check_every == 0 or it == max_iter - 1:
            err2 = (xnorm2 - 2 * (P * EtX).sum((1, 2)) + (EtE * torch.bmm(P, P.transpose(1, 2))).sum((1, 2)))
            err2 = err2.clamp_min(0)
            if prev is not None:
                active = active & ((prev - err2) > tol * prev.clamp_min(1e-30))
            prev = err2
            if not bool(active.any()):
                break
    err2 = (xnorm2 - 2 * (P * EtX).sum((1, 2)) + (EtE * torch.bmm(P, P.transpose(1, 2))).sum((1, 2))).clamp_min(0)
    rel = torch.where(xnorm2 > 0, (err2 / xnorm2.clamp_min(1e-300)).sqrt(), torch.zeros_like(err2))
    converged = ~active
    if not bool(converged.all()):
        warnings.warn(
            f"semi_nmf: {int((~converged).sum())} of {B} factorisations stopped at max_iter={max_iter} before the "
            f"relative error change fell below tol={tol}; increase max_iter or tol.",
            NMFConvergenceWarning,
            stacklevel=2,
        )
    if not batched:
        return NMFResult(E[0], P[0], rel[0], int(n_iter[0]), converged[0])
    return NMFResult(E, P, rel, n_iter, converged)
