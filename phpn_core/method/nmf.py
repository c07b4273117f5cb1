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

from phpn_core.method.rows import DEFAULT_BLOCK_BYTES, BlockProducts, DenseProducts, RowSource
from phpn_core.method.stages import stage
from phpn_core.method.factorization import (
    NMFConvergenceWarning,
    NMFResult,
    check_factorization_input,
    checked_item_seeds,
    checked_row_counts,
)

__all__ = ["nmf", "NMFResult", "NMFConvergenceWarning"]

_EPS_P = 1e-12  # P stays strictly positive so that HALS denominators never vanish
# The compressed phase stops at 10 x tol: the exact polish finishes. Looser stops (300 x tol with 20 polish
# iterations), one power iteration instead of two: each measured faster and each raised the mean error on
# bench/nmf_vs_sklearn.py's problem (0.301256-0.301259 vs 0.301250), so the defaults stay where they were.
_COMPRESSED_TOL = 10.0
INITS = ("nndsvda", "random")
_RANDOM_START_OFFSET = 0x5EED  # the random start's stream differs from the range finder's for the same seed


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


def _random_start(m: int, D: int, k: int, fill: torch.Tensor, seeds: list[int], device, dtype):
    """scikit-learn's ``init="random"``: ``|N(0, 1)| sqrt(mean(X) / k)`` for both factors, each matrix from its own
    seed (so its start does not depend on its batch-mates). fill ``[B]`` -> E ``[B, m, k]``, P ``[B, k, D]``."""
    gen = torch.Generator(device=device)
    Es, Ps = [], []
    for s in seeds:
        gen.manual_seed(int(s) + _RANDOM_START_OFFSET)
        Es.append(torch.randn(m, k, generator=gen, device=device, dtype=dtype).abs_())
        Ps.append(torch.randn(k, D, generator=gen, device=device, dtype=dtype).abs_())
    avg = (fill.clamp_min(0) / k).sqrt().view(-1, 1, 1)
    return torch.stack(Es) * avg, (torch.stack(Ps) * avg).clamp_min(_EPS_P)


def _restart_seed(seed: int, r: int) -> int:
    """The seed of a matrix's r-th extra start: distinct per (matrix seed, r), within torch's seed range."""
    return (int(seed) * 1_000_033 + r * 7_919) % (1 << 62)


def _range_finder(op, l: int, power_iters: int, seeds: list[int], device, dtype) -> torch.Tensor:
    """Orthonormal basis ``[B, m, l]`` of an approximate range of X (``op``, ``[B, m, D]``); ``1 + 2 power_iters``
    reads of X.

    Each matrix draws its test matrix from its own seed, so its result does not depend on its batch-mates.
    """
    gen = torch.Generator(device=device)
    draws = []
    for s in seeds:
        gen.manual_seed(int(s))
        draws.append(torch.randn(op.shape[2], l, generator=gen, device=device, dtype=dtype))
    Y = torch.linalg.qr(op.times(torch.stack(draws))).Q
    for _ in range(power_iters):
        Z = torch.linalg.qr(op.t_times(Y.transpose(1, 2).contiguous()).transpose(1, 2)).Q
        Y = torch.linalg.qr(op.times(Z)).Q
    return Y


def nmf(
    X: torch.Tensor | RowSource,
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
    compressed_tol: float | None = None,
    compute_dtype: torch.dtype | None = None,
    block_bytes: int | None = None,
    init: str = "nndsvda",
    restarts: int = 1,
    sparsity: float = 0.0,
) -> NMFResult:
    """Factorise non-negative ``X ~= E @ P``, one matrix or a batch at once.

    Args:
        X: ``[m, D]`` or ``[B, m, D]``, float, finite, >= 0 (not modified); or a
            :class:`~phpn_core.method.rows.RowSource` (one matrix, streamed in row blocks: see below).
        k: number of components, ``1 <= k <= min(m, D)``.
        max_iter: most sweeps in the compressed phase (``rhals``) or in total (``hals``).
        tol: stop when the error's relative decrease over ``check_every`` sweeps falls below ``tol``.
        seed: seeds the range finder; the same seed, device and input give the same result.
        device: where to compute (default: X's device). Results come back on that device.
        solver: ``"rhals"`` (compressed + exact polish), ``"hals"`` (exact) or ``"auto"`` (``rhals`` when
            compression shrinks the problem at least 4x, else ``hals``). A row source always uses ``rhals``.
        oversample: extra range-finder columns beyond k (``rhals``).
        power_iters: range-finder power iterations (``rhals``; each reads X twice).
        polish_iter: most exact iterations after the compressed phase (``rhals``; each reads X twice).
        polish_sweeps: HALS sweeps per product with X in exact iterations (accelerated HALS, Gillis &
            Glineur 2012: the products with X dominate, the sweeps are cheap).
        check_every: sweeps between convergence checks (each costs a device sync).
        row_counts: LongTensor ``[B]``: real rows per matrix when shorter ones are zero-padded to ``m``.
        extrapolate: accelerate HALS by extrapolation with restarts (Ang & Gillis 2019).
        item_seeds: one seed per matrix (default ``seed + b``); a matrix's result depends only on its own data
            and seed, not on what else is in the batch.
        compressed_tol: where the compressed phase stops (default ``10 tol`` with a polish, else ``tol``).
        compute_dtype: the dtype of the arithmetic (default: X's dtype, float32 for float16/bfloat16 X). Half
            precision X is read block by block and cast per block, never copied whole.
        block_bytes: rows per block of a row source, in bytes of the compute dtype
            (default :data:`~phpn_core.method.rows.DEFAULT_BLOCK_BYTES`).
        init: the start: ``"nndsvda"`` (from the range finder's SVD; deterministic in X) or ``"random"``
            (scikit-learn's: ``|N(0, 1)| sqrt(mean(X) / k)``, seeded per matrix by ``item_seeds``).
        restarts: starts per matrix: ``init``'s and ``restarts - 1`` random ones (seeded per matrix); each matrix
            keeps the one of lowest error (compressed error with ``rhals``, before the polish, so the extra starts
            read X no more: they cost compressed sweeps only).
        sparsity: weight ``s`` of an L1 penalty on the coefficients, scaled to be invariant to the factors'
            scales and to X's: minimises ``||X - E P||^2 + 2 s mean(X) sum_j ||P_j||_2 ||E_j||_1`` (0: plain NMF).
            Each position is then explained by fewer components, so a component covers one part rather than a
            share of several (measured: ``bench/quality_scale.py``). ``rel_error`` stays the reconstruction's.

    Returns:
        :class:`NMFResult` with ``E [.., m, k]``, ``P [.., k, D]``, ``rel_error``, ``n_iter``, ``converged``
        (a row source gives the unbatched shapes).

    Raises:
        TypeError, ValueError: with what was expected and what was got.
    """
    if max_iter < 1 or polish_iter < 0 or not (tol >= 0) or check_every < 1 or power_iters < 0:
        raise ValueError(
            f"nmf: need max_iter >= 1, polish_iter >= 0, power_iters >= 0, tol >= 0, check_every >= 1; got "
            f"max_iter={max_iter}, polish_iter={polish_iter}, power_iters={power_iters}, tol={tol}, "
            f"check_every={check_every}."
        )
    if solver not in ("auto", "rhals", "hals"):
        raise ValueError(f"nmf: solver must be 'auto', 'rhals' or 'hals'; got {solver!r}.")
    if init not in INITS:
        raise ValueError(f"nmf: init must be one of {INITS}; got {init!r}.")
    check_sparsity(sparsity, "nmf")
    options = dict(max_iter=max_iter, tol=tol, solver=solver, oversample=oversample, power_iters=power_iters,
                   polish_iter=polish_iter, polish_sweeps=polish_sweeps, check_every=check_every,
                   extrapolate=extrapolate, compressed_tol=compressed_tol, init=init, restarts=restarts,
                   sparsity=sparsity)
    if isinstance(X, RowSource):
        op, stats = checked_source(X, k, device=device, compute_dtype=compute_dtype, block_bytes=block_bytes)
        seeds = checked_item_seeds(item_seeds, seed, 1, "nmf")
        res = factorize(op, k, xnorm2=stats["sq_norm"].view(1), fill=(stats["total"] / (X.n_rows * X.dim)).view(1),
                        item_seeds=seeds, **{**options, "solver": "rhals" if solver == "auto" else solver})
        return NMFResult(res.E[0], res.P[0], res.rel_error[0], int(res.n_iter[0]), res.converged[0])
    with stage("checks"):
        check_factorization_input(X, k)
    batched = X.ndim == 3
    dev = torch.device(device) if device is not None else X.device
    cdt = compute_dtype or (X.dtype if X.dtype in (torch.float32, torch.float64) else torch.float32)
    Xb = (X if batched else X.unsqueeze(0)).to(device=dev, dtype=cdt)
    B = Xb.shape[0]
    rc = checked_row_counts(row_counts, B, Xb.shape[1], k, dev, "nmf")
    op = DenseProducts(Xb)
    n_valid = (rc.to(cdt) if rc is not None else torch.full((B,), float(Xb.shape[1]), dtype=cdt, device=dev)) \
        * Xb.shape[2]
    with stage("stats"):
        xnorm2, fill = op.sq_norm(), op.total() / n_valid
    res = factorize(op, k, xnorm2=xnorm2, fill=fill, row_counts=rc,
                    item_seeds=checked_item_seeds(item_seeds, seed, B, "nmf"), **options)
    if not batched:
        return NMFResult(res.E[0], res.P[0], res.rel_error[0], int(res.n_iter[0]), res.converged[0])
    return res


def checked_source(source: RowSource, k: int, *, device=None, compute_dtype=None, block_bytes=None,
                   who: str = "nmf") -> tuple[BlockProducts, dict]:
    """A row source's products and its one-read scan (min, max, total, squares), checked as :func:`nmf` checks
    a tensor: finite, non-negative, ``1 <= k <= min(m, D)``."""
    cdt = compute_dtype or (source.dtype if source.dtype in (torch.float32, torch.float64) else torch.float32)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    op = BlockProducts(source, device=dev, dtype=cdt, block_bytes=block_bytes or DEFAULT_BLOCK_BYTES)
    m, D = source.n_rows, source.dim
    if m == 0 or D == 0 or isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(m, D):
        raise ValueError(f"{who}: k must be an int in [1, min(m, D)] for rows of shape [{m}, {D}]; got k={k!r}.")
    with stage("checks"):
        stats = op.scan()
    lo, hi = float(stats["min"]), float(stats["max"])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{who}: X must be finite; got NaN/inf entries (min {lo}, max {hi}). Check the feature "
                         "extraction.")
    if lo < 0:
        raise ValueError(
            f"{who}: X must be non-negative (post-ReLU features); got a minimum of {lo:.4g}. Apply the backbone's "
            "documented feature shift, or use features taken after a ReLU.")
    stats = {n: v.to(device=dev, dtype=cdt) for n, v in stats.items()}
    return op, stats


def factorize(op, k: int, *, xnorm2: torch.Tensor, fill: torch.Tensor, item_seeds: list[int],
              row_counts: torch.Tensor | None = None, max_iter: int = 500, tol: float = 1e-6, solver: str = "auto",
              oversample: int = 20, power_iters: int = 2, polish_iter: int = 14, polish_sweeps: int = 10,
              check_every: int = 5, extrapolate: bool = True, compressed_tol: float | None = None,
              init: str = "nndsvda", restarts: int = 1, sparsity: float = 0.0) -> NMFResult:
    """:func:`nmf` on checked input: ``op`` a :class:`~phpn_core.method.rows.DenseProducts` or
    :class:`~phpn_core.method.rows.BlockProducts` of shape ``[B, m, D]``, ``xnorm2`` ``[B]`` its squared norms,
    ``fill`` ``[B]`` its means over the real entries. Returns the batched :class:`NMFResult`.

    X is only ever touched through ``op``: per exact iteration two products; the final error comes from the last
    iteration's own products (no extra read)."""
    if init not in INITS:
        raise ValueError(f"nmf: init must be one of {INITS}; got {init!r}.")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"nmf: restarts must be an int >= 1; got {restarts!r}.")
    check_sparsity(sparsity, "nmf")
    B, m, D = op.shape
    dev, dt = xnorm2.device, xnorm2.dtype
    l = min(m, D, k + oversample)
    if solver == "auto":
        solver = "rhals" if (m * D) >= 4 * l * (m + D) else "hals"
    if solver == "hals" and not isinstance(op, DenseProducts):
        solver = "rhals"  # the exact SVD start needs X whole
    mask = None
    if row_counts is not None:
        mask = (torch.arange(m, device=dev).unsqueeze(0) < row_counts.unsqueeze(1)).to(dt).unsqueeze(1)  # [B,1,m]

    if solver == "rhals":
        with stage("range_finder"):
            Q = _range_finder(op, l, power_iters, list(item_seeds), dev, dt)  # [B, m, l]
        with stage("project_start"):
            Qt = Q.transpose(1, 2).contiguous()  # [B, l, m]
            Yc = op.t_times(Qt)  # [B, l, D]
            if init == "random":
                E, P = _random_start(m, D, k, fill, list(item_seeds), dev, dt)
            else:
                Ub, S, Vh = torch.linalg.svd(Yc, full_matrices=False)
                E, P = _nndsvda(torch.bmm(Q, Ub), S, Vh, k, fill)
    else:
        with stage("start"):
            if init == "random":
                E, P = _random_start(m, D, k, fill, list(item_seeds), dev, dt)
            else:
                U, S, Vh = torch.linalg.svd(op.X, full_matrices=False)
                E, P = _nndsvda(U, S, Vh, k, fill)
    Et = E.transpose(1, 2).contiguous()  # [B, k, m]: component-major, so each HALS step is one contiguous block
    if mask is not None:
        Et = Et * mask
    n_iter = torch.zeros(B, dtype=torch.long, device=dev)
    fast_path = dev.type == "cpu"  # a host sync per sweep is free on the CPU, not on an accelerator
    # the L1 weight per matrix, mu = s mean(X): the penalty mu ||P_j||_2 ||E_j||_1 is linear in E_j (a shift of its
    # HALS step) and majorised by a quadratic in P_j (a ridge on its HALS step)
    mu = (sparsity * fill.clamp_min(0)).view(B, 1, 1) if sparsity > 0 else None

    def run_phase(n_max: int, exact: bool, sweeps: int, Et, P, active, tol: float):
        """HALS with extrapolation (Ang & Gillis 2019): each update starts from ``x + beta (x - x_prev)`` while
        the error keeps falling; a rise restarts from the last accepted iterate with a smaller beta. The error
        of each iterate is nearly free: it comes from the P step's own products. Returns the accepted iterate,
        the still-active mask, the accepted iterate's objective (``||X - E P||``, with the L1 term when
        ``sparsity``) and its error ``||X - E P||`` (exact when ``exact``)."""
        yn2 = xnorm2 if exact else (Yc * Yc).sum((1, 2))
        prev_check = None
        Ey, Py = Et, P
        err_acc = torch.full((B,), float("inf"), dtype=dt, device=dev)
        rec_acc = err_acc
        beta = torch.full((B, 1, 1), 0.5, dtype=dt, device=dev)
        beta_bar = torch.ones_like(beta)
        for it in range(n_max):
            A_E = op.times_t(Py) if exact else torch.bmm(torch.bmm(Py, Yc.transpose(1, 2)), Qt)
            G_P = torch.bmm(Py, Py.transpose(1, 2))
            if mu is not None:  # an L1 term is a constant shift of each row's linear term in HALS
                pn = Py.norm(dim=2, keepdim=True)  # [B, k, 1]
                A_E = A_E - mu * pn
            Et_new = _hals_rows(Ey, A_E, G_P, 0.0, sweeps)
            G_E = torch.bmm(Et_new, Et_new.transpose(1, 2))
            A_P = op.t_times(Et_new) if exact else torch.bmm(torch.bmm(Et_new, Q), Yc)
            G_step = G_E
            if mu is not None:
                e1 = Et_new.sum(2, keepdim=True)  # [B, k, 1]
                # ||P_j|| is majorised by its quadratic at the current P (MM): a ridge of mu |E_j|_1 / ||P_j||
                # on P_j's diagonal, so the step cannot raise the objective
                G_step = G_E + torch.diag_embed((mu * e1 / pn.clamp_min(1e-30)).squeeze(2))
            P_new = _hals_rows(Py, A_P, G_step, _EPS_P, sweeps)
            sq = _sq_error(yn2, A_P, P_new, G_E, torch.bmm(P_new, P_new.transpose(1, 2)))
            rec_new = err = sq.sqrt()
            if mu is not None:  # the objective decides acceptance and convergence; the reconstruction is reported
                err = (sq + 2 * mu.view(B) * (P_new.norm(dim=2, keepdim=True) * e1).sum((1, 2))).sqrt()
            # Frozen (converged) matrices never move, so a result does not depend on its batch-mates.
            ok_b = active & (err <= err_acc)
            if fast_path and bool(ok_b.all()):
                if extrapolate:
                    Ey = (Et_new + beta * (Et_new - Et)).clamp_(min=0)
                    Py = (P_new + beta * (P_new - P)).clamp_(min=_EPS_P)
                    beta_bar = (beta_bar * 1.01).clamp_(max=1.0)
                    beta = torch.minimum(beta_bar, beta * 1.05)
                else:
                    Ey, Py = Et_new, P_new
                Et, P, err_acc, rec_acc = Et_new, P_new, err, rec_new
            else:
                ok = ok_b.view(B, 1, 1)
                Et_next, P_next = torch.where(ok, Et_new, Et), torch.where(ok, P_new, P)
                if extrapolate:
                    Ey = torch.where(ok, (Et_new + beta * (Et_new - Et)).clamp_(min=0), Et_next)
                    Py = torch.where(ok, (P_new + beta * (P_new - P)).clamp_(min=_EPS_P), P_next)
                    beta_bar = torch.where(ok, (beta_bar * 1.01).clamp_(max=1.0), beta)
                    beta = torch.where(ok, torch.minimum(beta_bar, beta * 1.05), beta / 1.5)
                else:
                    Ey, Py = Et_next, P_next
                err_acc = torch.where(ok_b, err, err_acc)
                rec_acc = torch.where(ok_b, rec_new, rec_acc)
                Et, P = Et_next, P_next
            n_iter.add_(active.long())
            if (it + 1) % check_every == 0 or it == n_max - 1:
                if prev_check is not None:
                    active = active & ((prev_check - err_acc) > tol * prev_check.clamp_min(1e-30))
                prev_check = err_acc.clone()
                if not bool(active.any()):
                    break
        return Et, P, active, err_acc, rec_acc

    def best_start(phase, Et, P):
        """``phase(Et, P) -> (Et, P, active, objective, err)`` from the start given, then from ``restarts - 1``
        random starts; each matrix keeps its lowest-objective result (exact with ``hals``, compressed with
        ``rhals``: the same Q for every start of a matrix, so comparable)."""
        best = phase(Et, P)
        for r in range(1, restarts):
            E0, P0 = _random_start(m, D, k, fill, [_restart_seed(s, r) for s in item_seeds], dev, dt)
            Et0 = E0.transpose(1, 2).contiguous()
            cand = phase(Et0 * mask if mask is not None else Et0, P0)
            better = cand[3] < best[3]
            b3 = better.view(B, 1, 1)
            best = (torch.where(b3, cand[0], best[0]), torch.where(b3, cand[1], best[1]),
                    *(torch.where(better, c, b) for c, b in zip(cand[2:], best[2:])))
        return best

    active = torch.ones(B, dtype=torch.bool, device=dev)
    if solver == "rhals":
        # The compressed problem only has to bring the factors near the optimum: the exact polish finishes.
        c_tol = compressed_tol if compressed_tol is not None else (tol * _COMPRESSED_TOL if polish_iter > 0 else tol)
        with stage("compressed"):
            Et, P, active, _, err = best_start(lambda E_, P_: run_phase(max_iter, False, 1, E_, P_, active, c_tol),
                                               Et, P)
        with stage("polish"):
            if polish_iter > 0:  # convergence is then judged on the exact problem
                Et, P, active, _, err = run_phase(polish_iter, True, polish_sweeps, Et, P, torch.ones_like(active),
                                                  tol)
            else:  # the compressed error is not the true one: one more read
                err = _sq_error(xnorm2, op.t_times(Et), P, torch.bmm(Et, Et.transpose(1, 2)),
                                torch.bmm(P, P.transpose(1, 2))).sqrt()
    else:
        with stage("sweeps"):
            Et, P, active, _, err = best_start(lambda E_, P_: run_phase(max_iter, True, polish_sweeps, E_, P_,
                                                                        active, tol), Et, P)

    rel = torch.where(xnorm2 > 0, err / xnorm2.clamp_min(1e-300).sqrt(), torch.zeros_like(err))
    E = Et.transpose(1, 2).contiguous()
    converged = ~active
    if not bool(converged.all()):
        warnings.warn(
            f"nmf: {int((~converged).sum())} of {B} factorisations stopped at the iteration limit before the "
            f"relative error change fell below tol={tol}; increase max_iter/polish_iter or tol.",
            NMFConvergenceWarning,
            stacklevel=3,
        )
    return NMFResult(E, P, rel, n_iter, converged)


def check_sparsity(sparsity, who: str) -> None:
    """``sparsity`` must be a finite number >= 0 (not a bool)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < math.inf:
        raise ValueError(f"{who}: sparsity must be a finite number >= 0 (0: plain NMF; e.g. 0.6); got {sparsity!r}.")


def _relative_error(X: torch.Tensor, E: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """Direct ``||X - E P|| / ||X||`` for checks: X ``[.., m, D]`` -> ``[..]``."""
    num = (X - E @ P).flatten(-2).norm(dim=-1)
    den = X.flatten(-2).norm(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(math.ulp(1.0)), torch.zeros_like(num))
