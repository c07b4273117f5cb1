"""The refinement of :mod:`~phpn_core.method.decompose` (step 3), in Gram coordinates.

Any minimiser has ``r_i = w_i^T [P; R]`` (see decompose's docstring), so the problem for a class is the small
``(k+1) x (k+1)`` Gram matrix K of the maps ``F p_1..F p_k, F R`` and the rows ``w_i`` (``sum_i w_i = e_R``):
a batched saddle-free damped Newton method, all classes at once, in float64. Independent of the class size.
"""

from __future__ import annotations

import math

import torch

__all__ = ["refine", "NORMALIZATIONS", "TARGETS"]

NORMALIZATIONS = ("l2", "none")
TARGETS = ("residual", "prototype")


def _rows(W: torch.Tensor, alpha: torch.Tensor, target: str) -> torch.Tensor:
    """The coefficient rows whose maps are compared with the targets: ``w_i`` (residual) or ``alpha_i e_i + w_i``."""
    if target == "prototype":
        k = W.shape[-2]
        W = W.clone()
        W[..., :k] += torch.diag_embed(alpha)
    return W


def _objective(W: torch.Tensor, K: torch.Tensor, signs: torch.Tensor, alpha: torch.Tensor, target: str,
               ridge: torch.Tensor) -> torch.Tensor:
    """Refinement objective per class. W ``[C, k, k+1]`` (rows sum to e_R), K ``[C, k+1, k+1]``, ``ridge`` the
    penalty's matrix ``[C, k+1, k+1]`` (:func:`_penalty`) -> ``[C]``."""
    k = W.shape[1]
    Wm = _rows(W, alpha, target)
    KW = torch.einsum("cij,cjl->cil", Wm, K)  # [C, k, k+1]
    norms = (KW * Wm).sum(-1).clamp_min(1e-300).sqrt()
    diagK = torch.diagonal(K, dim1=1, dim2=2)[:, :k].clamp_min(1e-300).sqrt()
    cos = signs * torch.diagonal(KW[:, :, :k], dim1=1, dim2=2) / (norms * diagK)
    fit = (2.0 - 2.0 * cos).sum(1)
    return fit + (W * torch.einsum("cij,cjl->cil", W, ridge)).sum((1, 2))


def _penalty(K: torch.Tensor, ridge: float) -> torch.Tensor:
    """The ridge ``ridge sum_i ||F r_i||^2 / ||F R||^2`` as the matrix M ``[C, k+1, k+1]`` of ``sum_i w_i^T M w_i``."""
    return ridge * K / K[:, -1:, -1:].clamp_min(1e-300)


def _derivatives(W, K, signs, alpha, target, ridge):
    """Gradient ``[C, k, k+1]`` and per-row Hessians ``[C, k, k+1, k+1]`` of :func:`_objective` (analytic).

    The objective is a sum of one term per row w_i, so its Hessian is block diagonal: one small block per row.
    """
    C, k, n = W.shape
    Wm = _rows(W, alpha, target)
    Kw = torch.einsum("cjl,cil->cij", K, Wm)  # [C, k, n]: K w_i
    q = (Kw * Wm).sum(-1).clamp_min(1e-300)  # [C, k]
    nrm = q.sqrt()
    a = K[:, :k, :]  # [C, k, n]: a_i = K e_i
    t = (a * Wm).sum(-1)  # [C, k]
    c = torch.diagonal(K, dim1=1, dim2=2)[:, :k].clamp_min(1e-300).sqrt()
    sc = (signs / c).unsqueeze(-1)  # [C, k, 1]
    n1, n3, n5 = nrm.unsqueeze(-1), (nrm**3).unsqueeze(-1), (nrm**5).unsqueeze(-1)
    grad_cos = sc * (a / n1 - t.unsqueeze(-1) * Kw / n3)
    outer = lambda x, y: x.unsqueeze(-1) * y.unsqueeze(-2)  # noqa: E731
    hess_cos = sc.unsqueeze(-1) * (
        -(outer(a, Kw) + outer(Kw, a)) / n3.unsqueeze(-1)
        - (t.unsqueeze(-1) / n3).unsqueeze(-1) * K.unsqueeze(1)
        + 3 * (t.unsqueeze(-1) / n5).unsqueeze(-1) * outer(Kw, Kw)
    )
    g = -2 * grad_cos + 2 * torch.einsum("cjl,cil->cij", ridge, W)
    H = -2 * hess_cos + 2 * ridge.unsqueeze(1)
    return g, H


def _closed_form_start(K: torch.Tensor, signs: torch.Tensor, k: int) -> torch.Tensor:
    """``normalization="none"``'s solution in u-coordinates. K ``[C, k+1, k+1]`` -> u ``[C, k, k+1]``.

    Target map for r_i: ``s_i Norm(F p_i) ||F R|| / sqrt(k)``; its least-squares fit in span{p} is
    ``rho_i = s_i ||F R|| / (sqrt(k) ||F p_i||) p_i``, and ``r_i = rho_i - mean(rho) + R / k`` meets the sum.
    """
    C = K.shape[0]
    normR = K[:, -1, -1].clamp_min(0).sqrt()  # [C]
    normP = torch.diagonal(K, dim1=1, dim2=2)[:, :k].clamp_min(1e-300).sqrt()  # [C, k]
    coef = signs * normR.unsqueeze(1) / (math.sqrt(k) * normP)  # [C, k]
    u = torch.zeros(C, k, k + 1, dtype=K.dtype, device=K.device)
    u[:, :, :k] = torch.diag_embed(coef)
    return u


def refine(
    K: torch.Tensor,
    alpha: torch.Tensor,
    *,
    normalization: str = "l2",
    target: str = "residual",
    ridge: float = 1e-3,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> tuple[torch.Tensor, dict]:
    """Solve the refinement for a batch of classes in Gram coordinates.

    Args:
        K: ``[C, k+1, k+1]`` Gram matrix of the maps ``F p_1..F p_k, F R`` (float64 recommended).
        alpha: ``[C, k]`` scaling coefficients.

    Returns:
        W ``[C, k, k+1]`` with ``sum_i W[:, i] = e_R`` (r_i = W[:, i] @ [P; R]) and diagnostics
        ``{"refine_iter": [C], "refine_objective_start": [C], "refine_objective": [C]}``.
    """
    if normalization not in NORMALIZATIONS or target not in TARGETS:
        raise ValueError(f"refine: normalization must be one of {NORMALIZATIONS} and target one of {TARGETS}; got "
                         f"{normalization!r}, {target!r}.")
    C, k = alpha.shape
    signs = torch.where(alpha < 0, -1.0, 1.0).to(K.dtype)
    ridge = _penalty(K, ridge)
    u = _closed_form_start(K, signs, k)
    W = u - u.mean(1, keepdim=True)
    W[:, :, -1] += 1.0 / k
    start = _objective(W, K, signs, alpha, target, ridge)
    iters = torch.zeros(C, dtype=torch.long, device=K.device)
    if normalization == "none":
        return W, {"refine_iter": iters, "refine_objective_start": start, "refine_objective": start}

    # Newton on the separable objective under the coupling sum_i w_i = e_R (KKT, closed form): with H_i the
    # rows' Hessians made positive definite (|eigenvalues| + damping: saddle-free, so every step descends),
    # d_i = -H_i^-1 (g_i + lam) and sum_i d_i = 0 give lam = -(sum_i H_i^-1)^-1 sum_i H_i^-1 g_i.
    n = k + 1
    eye = torch.eye(n, dtype=K.dtype, device=K.device)
    mu = torch.full((C,), 1e-3, dtype=K.dtype, device=K.device)
    cur = start.clone()
    active = torch.ones(C, dtype=torch.bool, device=K.device)
    for _ in range(max_iter):
        g, H = _derivatives(W, K, signs, alpha, target, ridge)
        evals, evecs = torch.linalg.eigh(0.5 * (H + H.transpose(-1, -2)))
        top = evals.abs().amax(-1, keepdim=True).clamp_min(1e-12)
        inv_eval = 1.0 / (evals.abs() + mu.view(C, 1, 1) * top)
        Hinv = torch.einsum("ckij,ckj,cklj->ckil", evecs, inv_eval, evecs)  # [C, k, n, n]
        Hinv_g = torch.einsum("ckij,ckj->cki", Hinv, g)
        S = Hinv.sum(1) + 1e-30 * eye
        lam = -torch.linalg.solve(S, Hinv_g.sum(1).unsqueeze(-1)).squeeze(-1)  # [C, n]
        d = -(Hinv_g + torch.einsum("ckij,cj->cki", Hinv, lam))
        d = d - d.mean(1, keepdim=True)  # keep sum_i w_i = e_R exactly against rounding
        W_try = W + d * active.view(C, 1, 1)
        new = _objective(W_try, K, signs, alpha, target, ridge)
        better = (new < cur) & active
        W = torch.where(better.view(C, 1, 1), W_try, W)
        gain = torch.where(better, cur - new, torch.zeros_like(cur))
        cur = torch.where(better, new, cur)
        mu = torch.where(better, (mu / 3).clamp_min(1e-9), (mu * 4).clamp_max(1e6))
        iters += active.long()
        # Converged: an accepted step that gains almost nothing, or damping at its ceiling (no descent left).
        active = active & ~((better & (gain <= tol * cur.abs().clamp_min(1.0))) | (mu >= 1e6))
        if not bool(active.any()):
            break
    return W, {"refine_iter": iters, "refine_objective_start": start, "refine_objective": cur}
