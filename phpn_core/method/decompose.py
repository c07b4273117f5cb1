"""Post-hoc part-prototype decomposition of a linear head (Tan, Zhou & Chen, ICML 2024).

For class c with features ``F_c [n, H, W, D]`` (seen as ``[N = n*H*W, D]``) and head row ``v_c [D]``:

1. discovery: ``F_c ~= E P`` by NMF, ``P [k, D] >= 0`` the initial prototypes;
2. scaling: ``alpha = argmin ||v_c - alpha P||`` (least squares, closed form);
3. refinement: ``R = v_c - alpha P`` is split into ``r_1..r_k`` with ``sum_i r_i = R`` *by construction*,
   minimising ``sum_i || s_i Norm(F_c p_i) - Norm(F_c r_i) ||^2`` (+ a small ridge, see below);
4. result: ``p~_i = alpha_i p_i + r_i`` and ``sum_i p~_i = v_c`` to float rounding.

How the refinement is solved. Any minimiser has ``r_i`` in ``span{p_1..p_k, R}``: in the whitened space of
``F_c`` the objective only sees ``F_c r_i``, and components outside that span only add norm. So
``r_i = w_i^T [P; R]`` with ``w_i`` in ``R^{k+1}``, and every quantity comes from the ``(k+1) x (k+1)`` Gram
matrix ``K = (F_c Z^T)^T (F_c Z^T)``, ``Z = [P; R]``: one pass over the features per class, then a tiny problem.
The constraint is a parametrisation, ``w_i = u_i - mean_j u_j + e_R / k`` (so ``sum_i w_i = e_R``), and ``u`` is
optimised by a batched saddle-free damped Newton method (exact Hessians through ``torch.func``), all classes at
once, in float64.

Choices (named options, with their defaults):

- ``normalization="l2"`` (the paper): ``Norm`` divides a map by its L2 norm over all ``n*H*W`` positions of the
  class's images. ``"none"`` fits ``F r_i`` to ``s_i Norm(F p_i) ||F R|| / sqrt(k)`` in plain least squares
  (closed form; also the starting point of ``"l2"``).
- ``target="residual"`` (the paper) compares ``Norm(F r_i)`` with ``Norm(F p_i)``; ``"prototype"`` compares the
  refined prototype's own map ``Norm(F p~_i)`` instead.
- Signs: least-squares alphas can be negative. ``s_i = sign(alpha_i)`` orients the target so that ``r_i``
  reinforces ``alpha_i p_i`` instead of cancelling it; ``p~_i``'s map is then ``s_i`` times a map shaped like
  ``F p_i``. Heatmaps and the evaluation use the *oriented* map ``s_i F p~_i`` (see ``head.py``), so "where" is
  where prototype i's part is, whatever the sign of its evidence.
- ``discovery="auto"``: how step 1 finds the initial prototypes. ``"nmf"`` needs ``F_c >= 0`` (post-ReLU, or a
  backbone's recorded constant shift). Signed features (LayerNormed ConvNeXt, Swin and ViT tokens) cannot be
  factorised by NMF as they are. ``"hybrid_nmf"`` (the default for them) standardises each channel by its spread
  over the class's positions, shifts a channel with a floor (an activation: less than ``FLOOR_SD`` sd below its mean)
  to that floor and splits a two-sided channel at its mean into excess and deficit, factorises
  ``[max(z, 0), max(-z, 0)]`` ``[N, 2D]`` by NMF and maps each prototype back (``p = (p+ - p-) / sd``); the
  refinement sees the class-centred maps. ``"posneg_nmf"`` centres and splits every channel, unscaled (additive
  parts of the deviations from the class mean); ``"semi_nmf"`` (Ding, Li & Jordan 2010) keeps the mixture weights
  non-negative and lets the prototypes be signed (a soft k-means of the positions: a prototype is a direction some
  positions have); ``"shift_nmf"`` runs NMF on ``F_c + s_c``, ``s_c [D] = max(0, -min F_c)`` per channel over the
  class's training features (DFF's recipe), and refines on the class-centred maps (a shift adds a constant to every
  map that would swamp the normalised comparison of spatial patterns; centring changes no peak). ``"auto"`` takes
  ``"nmf"`` for a class whose features are non-negative and ``"hybrid_nmf"`` otherwise, class by class (so a class's
  result never depends on its shard). Measured on trained ConvNeXt and ViT models (README "Backbones: quality"):
  ``hybrid_nmf`` is the only one that beats DFF's consistency on both.
  None of this touches exactness: whatever P is, step 4 makes ``sum_i p~_i = v_c``, so
  ``logit_c = sum_i mean_hw(F p~_i) + b_c`` for every input F, inside the training range or not; and a shift adds
  only the constant ``s_c . p~_i`` to a map, so heatmaps peak at the same positions.
- ``refine_ridge=1e-3``: the scale-invariant objective can keep improving as the ``r_i`` grow and cancel each
  other; a ridge on ``sum_i ||F r_i||^2 / ||F R||^2`` keeps the solution finite and the contributions readable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from phpn_core.method.nmf import NMFResult, nmf
from phpn_core.method.semi_nmf import semi_nmf

__all__ = ["decompose_class", "decompose_head", "ClassDecomposition", "HeadDecomposition", "refine", "DISCOVERIES"]

NORMALIZATIONS = ("l2", "none")
TARGETS = ("residual", "prototype")
DISCOVERIES = ("auto", "nmf", "semi_nmf", "shift_nmf", "posneg_nmf", "hybrid_nmf")
# the code each class's discovery is recorded under (diagnostics["discovery"])
DISCOVERY_CODES = {"nmf": 0, "semi_nmf": 1, "shift_nmf": 2, "posneg_nmf": 3, "hybrid_nmf": 4}
# hybrid_nmf: a channel whose values stay within FLOOR_SD standard deviations below its mean has a floor (an
# activation: GELU/ReLU-like, a long tail above and almost nothing below); a two-sided channel (LayerNormed tokens)
# reaches ~3.5 sd below its mean over thousands of positions. Measured: ConvNeXt maps 0.5 sd, ViT tokens ~7 sd.
FLOOR_SD = 2.0


@dataclass(frozen=True)
class ClassDecomposition:
    """One class's decomposition. Shapes: prototypes/initial/residual ``[k, D]``, alpha ``[k]``."""

    prototypes: torch.Tensor
    initial: torch.Tensor
    alpha: torch.Tensor
    residual: torch.Tensor
    rel_error: float
    head_error: float
    diagnostics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class HeadDecomposition:
    """A head's decomposition for ``C' = len(classes)`` classes (all C when every class was given).

    Shapes: prototypes/initial/residual ``[C', k, D]``, alpha ``[C', k]``, rel_error/head_error ``[C']``;
    ``classes`` lists the head rows, in order; ``diagnostics`` maps a name to a ``[C']`` tensor.
    """

    prototypes: torch.Tensor
    initial: torch.Tensor
    alpha: torch.Tensor
    residual: torch.Tensor
    rel_error: torch.Tensor
    head_error: torch.Tensor
    classes: list[int]
    diagnostics: dict = field(default_factory=dict)

    def class_result(self, i: int) -> ClassDecomposition:
        """The i-th class's result (position i in ``classes``)."""
        return ClassDecomposition(
            self.prototypes[i], self.initial[i], self.alpha[i], self.residual[i],
            float(self.rel_error[i]), float(self.head_error[i]),
            {name: (v[i].item() if torch.is_tensor(v) else v[i]) for name, v in self.diagnostics.items()},
        )


# ----------------------------------------------------------------------------------------------- checks

def _check_features(F: torch.Tensor, name: str, D: int | None, k: int, discovery: str = "nmf") -> None:
    if not isinstance(F, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape [n, H, W, D]; got {type(F).__name__}.")
    if F.ndim != 4:
        raise ValueError(f"{name}: expected shape [n, H, W, D] (channels last); got shape {tuple(F.shape)}.")
    if F.numel() == 0:
        raise ValueError(f"{name}: the class has no features (shape {tuple(F.shape)}); it needs at least one image.")
    if not F.is_floating_point():
        raise TypeError(f"{name}: expected float32 or float64 features; got {F.dtype}.")
    if D is not None and F.shape[-1] != D:
        raise ValueError(
            f"{name}: feature dimension D={F.shape[-1]} does not match the head's D={D} "
            f"(features {tuple(F.shape)}); channels must be last: [n, H, W, D]."
        )
    if not bool(torch.isfinite(F).all()):
        raise ValueError(f"{name}: features contain NaN or inf; expected finite values. Check the extraction.")
    if discovery == "nmf":
        fmin = float(F.min())
        if fmin < 0:
            raise ValueError(
                f"{name}: features must be non-negative for discovery='nmf'; got a minimum of {fmin:.4g}. Fix: "
                "use discovery='auto' (signed features, e.g. ConvNeXt/Swin/ViT), or post-ReLU features."
            )
    rows = F.shape[0] * F.shape[1] * F.shape[2]
    if k > min(rows, F.shape[-1]):
        raise ValueError(
            f"{name}: k={k} prototypes need at least k feature rows and channels; got n*H*W={rows}, "
            f"D={F.shape[-1]}. Use k <= {min(rows, F.shape[-1])} or more images."
        )


def _check_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int >= 1; got {type(k).__name__} {k!r}.")
    if k < 1:
        raise ValueError(f"k must be >= 1; got k={k}.")


def _check_options(normalization: str, target: str, discovery: str = "auto") -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}; got {normalization!r}.")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}; got {target!r}.")
    if discovery not in DISCOVERIES:
        raise ValueError(f"discovery must be one of {DISCOVERIES}; got {discovery!r}.")


# ----------------------------------------------------------------------------------------------- refinement

def _rows(W: torch.Tensor, alpha: torch.Tensor, target: str) -> torch.Tensor:
    """The coefficient rows whose maps are compared with the targets: ``w_i`` (residual) or ``alpha_i e_i + w_i``."""
    if target == "prototype":
        k = W.shape[-2]
        W = W.clone()
        W[..., :k] += torch.diag_embed(alpha)
    return W


def _objective(W: torch.Tensor, K: torch.Tensor, signs: torch.Tensor, alpha: torch.Tensor, target: str,
               ridge: float) -> torch.Tensor:
    """Refinement objective per class. W ``[C, k, k+1]`` (rows sum to e_R), K ``[C, k+1, k+1]`` -> ``[C]``."""
    k = W.shape[1]
    Wm = _rows(W, alpha, target)
    KW = torch.einsum("cij,cjl->cil", Wm, K)  # [C, k, k+1]
    norms = (KW * Wm).sum(-1).clamp_min(1e-300).sqrt()
    diagK = torch.diagonal(K, dim1=1, dim2=2)[:, :k].clamp_min(1e-300).sqrt()
    cos = signs * torch.diagonal(KW[:, :, :k], dim1=1, dim2=2) / (norms * diagK)
    fit = (2.0 - 2.0 * cos).sum(1)
    reg = (W * torch.einsum("cij,cjl->cil", W, K)).sum((1, 2)) / K[:, -1, -1].clamp_min(1e-300)
    return fit + ridge * reg


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
    scale = 2 * ridge / K[:, -1, -1].clamp_min(1e-300)
    g = -2 * grad_cos + scale.view(C, 1, 1) * torch.einsum("cjl,cil->cij", K, W)
    H = -2 * hess_cos + scale.view(C, 1, 1, 1) * K.unsqueeze(1)
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
    _check_options(normalization, target)
    C, k = alpha.shape
    signs = torch.where(alpha < 0, -1.0, 1.0).to(K.dtype)
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


# ----------------------------------------------------------------------------------------------- pipeline

def _scale(P: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Least-squares alpha: P ``[C, k, D]``, v ``[C, D]`` -> ``[C, k]`` (closed form, min-norm if P is rank-deficient)."""
    return torch.linalg.lstsq(P.transpose(1, 2), v.unsqueeze(2), driver="gelsd" if P.device.type == "cpu" else None
                              ).solution.squeeze(2)


def _centred(X: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """X ``[C, m, D]`` minus each class's mean over its real rows (``valid [C, m]``); padding stays zero."""
    vm = valid.unsqueeze(-1).to(X.dtype)
    mu = (X * vm).sum(1) / valid.sum(1, keepdim=True).to(X.dtype)
    return (X - mu.unsqueeze(1)) * vm


def _masked_min(X: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Each class's per-channel minimum over its real rows: X ``[C, m, D]``, valid ``[C, m]`` -> ``[C, D]``."""
    return torch.where(valid.unsqueeze(-1), X, torch.full_like(X, float("inf"))).amin(1)


def _hybrid_discover(X: torch.Tensor, valid: torch.Tensor, k: int, counts, seeds: list[int], nmf_options: dict,
                     device) -> tuple[NMFResult, torch.Tensor]:
    """``hybrid_nmf`` for a padded batch X ``[C, m, D]`` (``valid [C, m]``): per class and channel j, with mean mu_j,
    standard deviation sd_j and minimum low_j over the class's positions, ``z_j = (x_j - ref_j) / sd_j`` where
    ``ref_j = low_j`` for a channel with a floor (``mu_j - low_j < FLOOR_SD sd_j``) and ``mu_j`` otherwise; NMF
    of ``[max(z, 0), max(-z, 0)]`` ``[N, 2D]`` (a floored channel has no negative part), and each prototype mapped
    back to the features' space, ``p_j = (p+_j - p-_j) / sd_j``, so that ``F p`` is the factorised map up to a
    constant. Dividing by sd_j lets every channel weigh by its spread, not its raw scale (the LayerNorm fold leaves
    channel scales that differ by orders of magnitude)."""
    vm = valid.unsqueeze(-1).to(X.dtype)
    n = valid.sum(1, keepdim=True).to(X.dtype)  # [C, 1]
    mu = (X * vm).sum(1) / n
    sd = ((((X - mu.unsqueeze(1)) * vm) ** 2).sum(1) / (n - 1).clamp_min(1)).sqrt()
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))  # a constant channel: z = 0 either way
    low = _masked_min(X, valid)
    ref = torch.where(mu - low < FLOOR_SD * sd, low, mu)
    Z = (X - ref.unsqueeze(1)) / sd.unsqueeze(1) * vm
    res = nmf(torch.cat([Z.clamp_min(0), (-Z).clamp_min(0)], -1), k, row_counts=counts, item_seeds=seeds,
              device=device, **nmf_options)
    D = X.shape[-1]
    P = (res.P[..., :D] - res.P[..., D:]) / sd.unsqueeze(1).to(res.P.device)
    return NMFResult(res.E, P, res.rel_error, res.n_iter, res.converged), _centred(X, valid)


def _discover(X: torch.Tensor, rows: list[int], k: int, seeds: list[int], nmf_options: dict, method: str, device
              ) -> tuple[object, torch.Tensor]:
    """Step 1 for a padded batch X ``[C, m, D]``: the NMF-type result and the matrix the maps are taken of."""
    m = X.shape[1]
    counts = torch.tensor(rows) if min(rows) != m else None
    if method == "semi_nmf":
        # its own stopping defaults: nmf_options tune the NMF solver (rhals, polish, ...)
        return semi_nmf(X, k, row_counts=counts, item_seeds=seeds, device=device), X
    if method == "nmf":
        return nmf(X, k, row_counts=counts, item_seeds=seeds, device=device, **nmf_options), X
    valid = torch.arange(m, device=X.device).unsqueeze(0) < torch.tensor(rows, device=X.device).unsqueeze(1)
    if method == "hybrid_nmf":
        return _hybrid_discover(X, valid, k, counts, seeds, nmf_options, device)
    if method == "posneg_nmf":  # NMF of the positive and negative parts of the class-centred features
        Xc = _centred(X, valid)
        res = nmf(torch.cat([Xc.clamp_min(0), (-Xc).clamp_min(0)], -1), k, row_counts=counts, item_seeds=seeds,
                  device=device, **nmf_options)
        D = X.shape[-1]
        return NMFResult(res.E, res.P[..., :D] - res.P[..., D:], res.rel_error, res.n_iter, res.converged), Xc
    # shift_nmf
    low = _masked_min(X, valid)
    Xs = (X + (-low).clamp_min(0).unsqueeze(1)) * valid.unsqueeze(-1).to(X.dtype)
    res = nmf(Xs, k, row_counts=counts, item_seeds=seeds, device=device, **nmf_options)
    # The refinement compares maps' spatial patterns; the shift adds a large constant to every map, which would
    # swamp the normalised comparison, so it sees the class-centred maps (a constant per map: same peaks).
    return res, _centred(Xs, valid)


def _decompose_batch(Fs: list[torch.Tensor], V: torch.Tensor, k: int, seeds: list[int], nmf_options: dict,
                     normalization: str, target: str, ridge: float, refine_iter: int, device,
                     method: str = "nmf") -> dict:
    """Decompose a batch of classes. Fs: list of ``[N_c, D]``; V ``[C, D]``; ``method`` one discovery for all."""
    dtype = Fs[0].dtype
    rows = [f.shape[0] for f in Fs]
    m = max(rows)
    D = V.shape[1]
    X = torch.zeros(len(Fs), m, D, dtype=dtype, device=device)
    for i, f in enumerate(Fs):
        X[i, : f.shape[0]] = f.to(device)
    res, X = _discover(X, rows, k, seeds, nmf_options, method, device)
    P = res.P  # [C, k, D]
    V = V.to(device=device, dtype=torch.float64)
    P64 = P.double()
    alpha = _scale(P64, V)  # [C, k]
    R = V - torch.bmm(alpha.unsqueeze(1), P64).squeeze(1)  # [C, D]
    Z = torch.cat([P64, R.unsqueeze(1)], 1)  # [C, k+1, D]
    maps = torch.bmm(X, Z.to(dtype).transpose(1, 2)).double()  # [C, m, k+1]; padded rows are zero
    K = torch.bmm(maps.transpose(1, 2), maps)
    W, diag = refine(K, alpha, normalization=normalization, target=target, ridge=ridge, max_iter=refine_iter)
    residual = torch.bmm(W, Z)  # [C, k, D]
    protos = alpha.unsqueeze(2) * P64 + residual
    # The parametrisation makes sum_i r_i = R up to rounding; spread the rounding so the sum is v exactly.
    protos = protos + ((V - protos.sum(1)) / k).unsqueeze(1)
    out = protos.to(dtype)
    head_err = (out.sum(1) - V.to(dtype)).abs().amax(1)
    diag.update({"nmf_iter": res.n_iter.cpu(), "nmf_converged": res.converged.cpu(),
                 "discovery": torch.full((len(Fs),), float(DISCOVERY_CODES[method]), dtype=torch.float64)})
    return {
        "prototypes": out, "initial": P, "alpha": alpha.to(dtype), "residual": residual.to(dtype),
        "rel_error": res.rel_error, "head_error": head_err, "diagnostics": {n: t.cpu() for n, t in diag.items()},
    }


def decompose_head(
    features_by_class: Mapping[int, torch.Tensor],
    weight: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    normalization: str = "l2",
    target: str = "residual",
    refine_ridge: float = 1e-3,
    refine_iter: int = 100,
    discovery: str = "auto",
    nmf_options: dict | None = None,
    device: str | torch.device | None = None,
    max_batch_bytes: int = 2 << 30,
    progress=None,
) -> HeadDecomposition:
    """Decompose the head rows of the given classes, all classes batched through NMF and refinement.

    Args:
        features_by_class: ``{class index: F_c [n_c, H, W, D]}``, float (>= 0 for ``discovery="nmf"``; signed
            features are handled by ``"auto"``). Not modified. Any subset of the head's classes (a shard); results
            follow ``sorted(features_by_class)``.
        weight: ``[C, D]`` the linear head. Not modified.
        k: prototypes per class.
        seed: class c's NMF uses seed ``seed * 1_000_003 + c``, so a class's result does not depend on which
            other classes share its batch or shard.
        normalization, target, refine_ridge, refine_iter: the refinement (see the module docstring).
        discovery: ``"auto"`` (NMF for non-negative classes, ``"hybrid_nmf"`` for signed ones), ``"nmf"``,
            ``"hybrid_nmf"``, ``"posneg_nmf"``, ``"semi_nmf"`` or ``"shift_nmf"`` (see the module docstring); recorded
            per class in ``diagnostics["discovery"]`` (:data:`DISCOVERY_CODES`).
        nmf_options: extra keyword options for :func:`phpn_core.method.nmf.nmf` (max_iter, tol, solver, ...).
        device: where to compute (default: the features' device).
        max_batch_bytes: classes are processed in batches whose padded features stay below this size.
        progress: optional callable ``progress(n_done, n_total)`` called after each batch.

    Returns:
        :class:`HeadDecomposition` with prototypes ``[C', k, D]``, ``prototypes.sum(1) == weight[classes]``.
    """
    _check_k(k)
    _check_options(normalization, target, discovery)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ValueError(
            f"decompose_head: weight must be a tensor of shape [C, D]; got "
            f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}."
        )
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("decompose_head: weight contains NaN or inf; expected a finite head.")
    if not isinstance(features_by_class, Mapping) or len(features_by_class) == 0:
        raise ValueError("decompose_head: features_by_class must be a non-empty mapping {class index: [n, H, W, D]}.")
    C, D = weight.shape
    classes = sorted(features_by_class)
    bad = [c for c in classes if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < C]
    if bad:
        raise ValueError(f"decompose_head: class keys must be ints in [0, {C}) (rows of weight [C={C}, D]); got {bad[:5]}.")
    dtypes = {features_by_class[c].dtype for c in classes if isinstance(features_by_class[c], torch.Tensor)}
    devices = {features_by_class[c].device for c in classes if isinstance(features_by_class[c], torch.Tensor)}
    if len(dtypes) > 1 or len(devices) > 1:
        raise TypeError(
            f"decompose_head: all classes' features must share one dtype and device; got dtypes "
            f"{sorted(map(str, dtypes))}, devices {sorted(map(str, devices))}."
        )
    for c in classes:
        _check_features(features_by_class[c], f"decompose_head: class {c}", D, k, discovery)
    dtype = next(iter(dtypes))
    if weight.dtype != dtype:
        raise TypeError(f"decompose_head: weight dtype {weight.dtype} differs from the features' {dtype}; cast one.")
    dev = torch.device(device) if device is not None else next(iter(devices))
    opts = dict(nmf_options or {})

    flat = {c: features_by_class[c].reshape(-1, D) for c in classes}
    if discovery == "auto":  # class by class, so a class's method never depends on its shard
        method = {c: "nmf" if float(flat[c].min()) >= 0 else "hybrid_nmf" for c in classes}
    else:
        method = dict.fromkeys(classes, discovery)
    batches = []
    itemsize = torch.empty((), dtype=dtype).element_size()
    for how in DISCOVERIES[1:]:
        cur, cur_m = [], 0
        for c in (c for c in classes if method[c] == how):
            m_new = max(cur_m, flat[c].shape[0])
            if cur and (len(cur) + 1) * m_new * D * itemsize > max_batch_bytes:
                batches.append((how, cur))
                cur, m_new = [], flat[c].shape[0]
            cur.append(c)
            cur_m = m_new
        if cur:
            batches.append((how, cur))

    parts = []
    done = 0
    for how, batch in batches:
        parts.append(_decompose_batch(
            [flat[c] for c in batch], weight[batch], k, [seed * 1_000_003 + c for c in batch], opts,
            normalization, target, refine_ridge, refine_iter, dev, how,
        ))
        done += len(batch)
        if progress is not None:
            progress(done, len(classes))
    # back to class order (batches are grouped by discovery method)
    order = torch.tensor([c for _, batch in batches for c in batch]).argsort()
    cat = lambda name: torch.cat([p[name] for p in parts])[order.to(parts[0][name].device)]  # noqa: E731
    diagnostics = {n: torch.cat([p["diagnostics"][n] for p in parts])[order] for n in parts[0]["diagnostics"]}
    return HeadDecomposition(
        prototypes=cat("prototypes"), initial=cat("initial"), alpha=cat("alpha"), residual=cat("residual"),
        rel_error=cat("rel_error"), head_error=cat("head_error"), classes=classes, diagnostics=diagnostics,
    )


def decompose_class(
    F: torch.Tensor,
    v: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    normalization: str = "l2",
    target: str = "residual",
    refine_ridge: float = 1e-3,
    refine_iter: int = 100,
    discovery: str = "auto",
    nmf_options: dict | None = None,
    device: str | torch.device | None = None,
) -> ClassDecomposition:
    """Decompose one class's head row.

    Args:
        F: ``[n, H, W, D]`` the class's feature maps, float (signed allowed unless ``discovery="nmf"``; see
            :func:`decompose_head`). Not modified.
        v: ``[D]`` the class's head row. Not modified.
        k: number of prototypes.

    Returns:
        :class:`ClassDecomposition`: prototypes ``[k, D]`` (refined; ``prototypes.sum(0) == v``), initial
        ``[k, D]`` (NMF: >= 0; semi-NMF: signed), alpha ``[k]``, residual ``[k, D]`` (``sum(0) == v - alpha @ initial``).
    """
    _check_k(k)
    if not isinstance(v, torch.Tensor) or v.ndim != 1:
        raise ValueError(
            f"decompose_class: v must be a tensor of shape [D]; got "
            f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}."
        )
    _check_options("l2", "residual", discovery)
    _check_features(F, "decompose_class: F", v.shape[0], k, discovery)
    if v.dtype != F.dtype or v.device != F.device:
        raise TypeError(
            f"decompose_class: F and v must share dtype and device; got F {F.dtype} on {F.device}, "
            f"v {v.dtype} on {v.device}."
        )
    hd = decompose_head({0: F}, v.unsqueeze(0), k, seed=seed, normalization=normalization, target=target,
                        refine_ridge=refine_ridge, refine_iter=refine_iter, discovery=discovery,
                        nmf_options=nmf_options, device=device)
    return hd.class_result(0)
