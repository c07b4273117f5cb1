"""Batched non-negative matrix factorisation in torch (CPU or CUDA, one code path).

``X ~= E @ P`` with ``E >= 0`` ``[m, k]`` and ``P >= 0`` ``[k, D]``, for one matrix ``[m, D]`` or a batch
``[B, m, D]`` (all classes of a classifier head in one call).

Solver (``solver="rhals"``, the default when it pays off): randomized HALS (Erichson et al. 2018).

1. Compression: a randomized range finder with ``power_iters`` power iterations gives ``Q [m, l]``
   (orthonormal, ``l = min(m, D, k + oversample)``) and ``Y = Q^T X [l, D]``; ``X_hat = Q Y`` is X's best
   rank-l approximation up to the randomisation.
2. NNDSVDa start from the SVD of the small ``Y`` (Boutsidis & Gallopoulos 2008; zeros filled with mean(X)).
3. HALS sweeps on ``X_hat`` through its factors only: ``X_hat P^T = Q (Y P^T)`` and ``E^T X_hat = (E^T Q) Y`` cost
   ``O((m + D) l k)`` instead of ``O(m D k)``.
4. Polish: exact HALS sweeps on ``X`` itself from that point, until the relative change of the error is
   below ``tol`` (or ``polish_iter``), so the result is a stationary point of the real problem, not of the
   compressed one.

``solver="hals"`` runs exact HALS from an NNDSVDa start (exact SVD); it is the reference for small problems.

Every update is a sum over row blocks of X (``E^T X``, ``X P^T`` and the Gram matrices), so a streaming caller
can accumulate them block by block.

Rows of zeros are exact padding: a zero row of ``X`` keeps a zero row of ``E`` and changes nothing else, so
classes with different ``m`` can be batched by padding (``row_counts`` marks the real rows).
"""

from __future__ import annotations

import math
import warnings

import torch

from phpn_core.method.factorization import (
    NMFConvergenceWarning,
    NMFResult,
    check_factorization_input,
    checked_item_seeds,
    checked_row_counts,
)

__all__ = ["nmf", "NMFResult", "NMFConvergenceWarning"]

_EPS_P = 1e-12  # P stays strictly positive so that HALS denominators never vanish


def _nndsvda(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int, fill: torch.Tensor):
    """NNDSVDa start from a (possibly approximate) SVD.

    U ``[B, m, r]``, S ``[B, r]``, Vh ``[B, r, D]`` (r >= k), fill ``[B]`` -> E ``[B, m, k]``, P ``[B, k, D]``.
    """
    U, S, V = U[..., :k], S[..., :k], Vh[:, :k, :].transpose(1, 2)  # [B,m,k], [B,k], [B,D,k]
    up, un = U.clamp(min=0), (-U).clamp(min=0)
    vp, vn = V.clamp(min=0), (-V).clamp(min=0)
    nup, nun = up.norm(dim=1), un.norm(dim=1)  # [B, k]
    nvp, nvn = vp.norm(dim=1), vn.norm(dim=1)
    mp, mn = nup * nvp, nun * nvn
    use_pos = (mp >= mn).unsqueeze(1)  # [B, 1, k]
    u = torch.where(use_pos, up / nup.clamp_min(1e-30).unsqueeze(1), un / nun.clamp_min(1e-30).unsqueeze(1))
    v = torch.where(use_pos, vp / nvp.clamp_min(1e-30).unsqueeze(1), vn / nvn.clamp_min(1e-30).unsqueeze(1))
    lbd = torch.sqrt(S * torch.where(use_pos.squeeze(1), mp, mn))  # [B, k]
    # The leading singular pair of a non-negative matrix is non-negative up to sign: take |.| as NNDSVD does.
    u[..., 0] = U[..., 0].abs()
    v[..., 0] = V[..., 0].abs()
    lbd[:, 0] = torch.sqrt(S[:, 0])
    E = u * lbd.unsqueeze(1)
    P = (v * lbd.unsqueeze(1)).transpose(1, 2)
    f = fill.view(-1, 1, 1)
    E = torch.where(E <= 0, f, E)
    P = torch.where(P <= 0, f, P)
    return E, P


def _hals_rows(P: torch.Tensor, A: torch.Tensor, G: torch.Tensor, floor: float, sweeps: int = 1) -> torch.Tensor:
    """Gauss-Seidel HALS sweeps over the rows of a factor stored component-major.

    P, A ``[B, k, n]`` (row j = component j, contiguous so each step touches one block), G ``[B, k, k]`` the Gram
    matrix of the other factor. Minimises ``||A - G P||``-style objectives row by row; returns a new tensor.
    """
    P = P.clone()
    diag = torch.diagonal(G, dim1=1, dim2=2).clamp_min(1e-30).unsqueeze(2)  # [B, k, 1]
    Gs = G / diag  # scaled rows: one fused multiply-subtract per component
    As = A / diag
    for _ in range(sweeps):
        for j in range(P.shape[1]):
            # P_j <- max(floor, P_j + A_j/G_jj - (G_j/G_jj) P)
            step = torch.baddbmm(As[:, j : j + 1, :], Gs[:, j : j + 1, :], P, alpha=-1.0)
            P[:, j : j + 1, :].add_(step).clamp_(min=floor)
    return P


def _sq_error(xnorm2, A_P, P, G_E, G_P):
    """||X - E P||^2 from ``A_P = E^T X``, Gram matrices and ``||X||^2``; all ``[B]``-batched."""
    return (xnorm2 - 2 * (A_P * P).sum((1, 2)) + (G_E * G_P).sum((1, 2))).clamp_min(0)


def _range_finder(X: torch.Tensor, l: int, power_iters: int, seeds: list[int]) -> torch.Tensor:
    """Orthonormal basis ``[B, m, l]`` of an approximate range of X ``[B, m, D]``.

    Each matrix draws its test matrix from its own seed, so its result does not depend on its batch-mates.
    """
    gen = torch.Generator(device=X.device)
    draws = []
    for s in seeds:
        gen.manual_seed(int(s))
        draws.append(torch.randn(X.shape[2], l, generator=gen, device=X.device, dtype=X.dtype))
    omega = torch.stack(draws)
    Y = torch.linalg.qr(torch.bmm(X, omega)).Q
    for _ in range(power_iters):
        Z = torch.linalg.qr(torch.bmm(X.transpose(1, 2), Y)).Q
        Y = torch.linalg.qr(torch.bmm(X, Z)).Q
    return Y


def nmf(
    X: torch.Tensor,
    k: int,
    *,
    max_iter: int = 500,
    tol: float = 1e-6,
    seed: int = 0,
    device: str | torch.device | None = None,
    solver: str = "auto",
    oversample: int = 20,
    power_iters: int = 2,
    polish_iter: int = 14,
    polish_sweeps: int = 10,
    check_every: int = 5,
    row_counts: torch.Tensor | None = None,
    item_seeds: list[int] | None = None,
    extrapolate: bool = True,
) -> NMFResult:
    """Factorise non-negative ``X ~= E @ P``, one matrix or a batch at once.

    Args:
        X: ``[m, D]`` or ``[B, m, D]``, float32/float64, finite, >= 0. Not modified.
        k: number of components, ``1 <= k <= min(m, D)``.
        max_iter: most sweeps in the compressed phase (``rhals``) or in total (``hals``).
        tol: stop when the error's relative decrease over ``check_every`` sweeps falls below ``tol``.
        seed: seeds the range finder; the same seed, device and input give the same result.
        device: where to compute (default: X's device). Results come back on that device.
        solver: ``"rhals"`` (compressed + exact polish), ``"hals"`` (exact) or ``"auto"`` (``rhals`` when
            compression shrinks the problem at least 4x, else ``hals``).
        oversample: extra range-finder columns beyond k (``rhals``).
        power_iters: range-finder power iterations (``rhals``).
        polish_iter: most exact iterations after the compressed phase (``rhals``).
        polish_sweeps: HALS sweeps per product with X in exact iterations (accelerated HALS, Gillis &
            Glineur 2012: the products with X dominate, the sweeps are cheap).
        check_every: sweeps between convergence checks (each costs a device sync).
        row_counts: LongTensor ``[B]``: real rows per matrix when shorter ones are zero-padded to ``m``.
        extrapolate: accelerate HALS by extrapolation with restarts (Ang & Gillis 2019).
        item_seeds: one seed per matrix (default ``seed + b``); a matrix's result depends only on its own data
            and seed, not on what else is in the batch.

    Returns:
        :class:`NMFResult` with ``E [.., m, k]``, ``P [.., k, D]``, ``rel_error``, ``n_iter``, ``converged``.

    Raises:
        TypeError, ValueError: with what was expected and what was got.
    """
    check_factorization_input(X, k)
    if max_iter < 1 or polish_iter < 0 or not (tol >= 0) or check_every < 1:
        raise ValueError(
            f"nmf: need max_iter >= 1, polish_iter >= 0, tol >= 0, check_every >= 1; got max_iter={max_iter}, "
            f"polish_iter={polish_iter}, tol={tol}, check_every={check_every}."
        )
    if solver not in ("auto", "rhals", "hals"):
        raise ValueError(f"nmf: solver must be 'auto', 'rhals' or 'hals'; got {solver!r}.")
    batched = X.ndim == 3
    dev = torch.device(device) if device is not None else X.device
    Xb = (X if batched else X.unsqueeze(0)).to(dev)
    B, m, D = Xb.shape
    l = min(m, D, k + oversample)
    if solver == "auto":
        solver = "rhals" if (m * D) >= 4 * l * (m + D) else "hals"

    mask = None
    rc = checked_row_counts(row_counts, B, m, k, dev, "nmf")
    if rc is not None:
        mask = (torch.arange(m, device=dev).unsqueeze(0) < rc.unsqueeze(1)).to(Xb.dtype).unsqueeze(2)  # [B,m,1]
        n_valid = rc.to(Xb.dtype) * D
    else:
        n_valid = torch.full((B,), float(m * D), dtype=Xb.dtype, device=dev)
    item_seeds = checked_item_seeds(item_seeds, seed, B, "nmf")
    xnorm2 = (Xb * Xb).sum((1, 2))
    fill = Xb.sum((1, 2)) / n_valid

    if solver == "rhals":
        Q = _range_finder(Xb, l, power_iters, list(item_seeds))
        Yc = torch.bmm(Q.transpose(1, 2), Xb)  # [B, l, D]
        Ub, S, Vh = torch.linalg.svd(Yc, full_matrices=False)
        E, P = _nndsvda(torch.bmm(Q, Ub), S, Vh, k, fill)
    else:
        U, S, Vh = torch.linalg.svd(Xb, full_matrices=False)
        E, P = _nndsvda(U, S, Vh, k, fill)
    if mask is not None:
        E = E * mask

    n_iter = torch.zeros(B, dtype=torch.long, device=dev)
    Et = E.transpose(1, 2).contiguous()  # [B, k, m]: component-major, so each HALS step is one contiguous block
    Xt = Xb.transpose(1, 2)  # [B, D, m] view
    if solver == "rhals":
        Qt = Q.transpose(1, 2).contiguous()  # [B, l, m]

    def products(Et, P, exact: bool):
        """``(P X^T, P P^T)`` for the E step; the P step's ``E^T X`` is computed after E moves."""
        A_E = torch.bmm(P, Xt) if exact else torch.bmm(torch.bmm(P, Yc.transpose(1, 2)), Qt)
        return A_E, torch.bmm(P, P.transpose(1, 2))

    def cross(Et, exact: bool):
        return torch.bmm(Et, Xb) if exact else torch.bmm(torch.bmm(Et, Q), Yc)

    def run_phase(n_max: int, exact: bool, sweeps: int, Et, P, active, tol: float):
        """HALS with extrapolation (Ang & Gillis 2019): each update starts from ``x + beta (x - x_prev)`` while
        the error keeps falling; a rise restarts from the last accepted iterate with a smaller beta. The error
        of each iterate is nearly free: it comes from the P step's own products."""
        yn2 = xnorm2 if exact else (Yc * Yc).sum((1, 2))
        prev_check = None
        Ey, Py = Et, P
        err_acc = torch.full((B,), float("inf"), dtype=Xb.dtype, device=dev)
        beta = torch.full((B, 1, 1), 0.5, dtype=Xb.dtype, device=dev)
        beta_bar = torch.ones_like(beta)
        for it in range(n_max):
            A_E, G_P = products(Ey, Py, exact)
            Et_new = _hals_rows(Ey, A_E, G_P, 0.0, sweeps)
            G_E = torch.bmm(Et_new, Et_new.transpose(1, 2))
            A_P = cross(Et_new, exact)
            P_new = _hals_rows(Py, A_P, G_E, _EPS_P, sweeps)
            err = _sq_error(yn2, A_P, P_new, G_E, torch.bmm(P_new, P_new.transpose(1, 2))).sqrt()
            # Frozen (converged) matrices never move, so a result does not depend on its batch-mates.
            ok = (active & (err <= err_acc)).view(B, 1, 1)
            Et_next, P_next = torch.where(ok, Et_new, Et), torch.where(ok, P_new, P)
            if extrapolate:
                Ey = torch.where(ok, (Et_new + beta * (Et_new - Et)).clamp_(min=0), Et_next)
                Py = torch.where(ok, (P_new + beta * (P_new - P)).clamp_(min=_EPS_P), P_next)
                beta_bar = torch.where(ok, (beta_bar * 1.01).clamp_(max=1.0), beta)
                beta = torch.where(ok, torch.minimum(beta_bar, beta * 1.05), beta / 1.5)
            else:
                Ey, Py = Et_next, P_next
            err_acc = torch.where(ok.view(B), err, err_acc)
            Et, P = Et_next, P_next
            n_iter.add_(active.long())
            if (it + 1) % check_every == 0 or it == n_max - 1:
                if prev_check is not None:
                    active = active & ((prev_check - err_acc) > tol * prev_check.clamp_min(1e-30))
                prev_check = err_acc.clone()
                if not bool(active.any()):
                    break
        return Et, P, active

    active = torch.ones(B, dtype=torch.bool, device=dev)
    if solver == "rhals":
        # The compressed problem only has to bring the factors near the optimum: the exact polish finishes.
        c_tol = tol * 10 if polish_iter > 0 else tol
        Et, P, active = run_phase(max_iter, False, 1, Et, P, active, c_tol)
        if polish_iter > 0:  # convergence is then judged on the exact problem
            Et, P, active = run_phase(polish_iter, True, polish_sweeps, Et, P, torch.ones_like(active), tol)
    else:
        Et, P, active = run_phase(max_iter, True, polish_sweeps, Et, P, active, tol)

    # Exact final error (one more product with X, so rel_error is the true one, not the compressed one).
    err2 = _sq_error(xnorm2, torch.bmm(Et, Xb), P, torch.bmm(Et, Et.transpose(1, 2)), torch.bmm(P, P.transpose(1, 2)))
    rel = torch.where(xnorm2 > 0, (err2 / xnorm2.clamp_min(1e-300)).sqrt(), torch.zeros_like(err2))
    E = Et.transpose(1, 2).contiguous()
    converged = ~active
    if not bool(converged.all()):
        warnings.warn(
            f"nmf: {int((~converged).sum())} of {B} factorisations stopped at the iteration limit before the "
            f"relative error change fell below tol={tol}; increase max_iter/polish_iter or tol.",
            NMFConvergenceWarning,
            stacklevel=2,
        )
    if not batched:
        return NMFResult(E[0], P[0], rel[0], int(n_iter[0]), converged[0])
    return NMFResult(E, P, rel, n_iter, converged)


def _relative_error(X: torch.Tensor, E: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """Direct ``||X - E P|| / ||X||`` for checks: X ``[.., m, D]`` -> ``[..]``."""
    num = (X - E @ P).flatten(-2).norm(dim=-1)
    den = X.flatten(-2).norm(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(math.ulp(1.0)), torch.zeros_like(num))
