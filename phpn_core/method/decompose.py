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
optimised by a batched saddle-free damped Newton method (analytic Hessians), all classes at once, in float64
(:mod:`~phpn_core.method.refine`).

Reading the features: every step reads ``F_c`` only through products with thin matrices and sums over rows
(:mod:`~phpn_core.method.rows`), so a class larger than ``stream_bytes`` (or given as a row source, e.g. a feature
store's class) is streamed in row blocks: memory is one block plus ``[N, k + oversample]`` factors.

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

from phpn_core.method.nmf import NMFResult, checked_source, factorize, nmf
from phpn_core.method.merge import group_signs, map_gram, merge_duplicates
from phpn_core.method.redundancy import gram_cosines, max_cosine
from phpn_core.method.refine import NORMALIZATIONS, TARGETS, refine
from phpn_core.method.rows import DenseProducts, RowSource, TensorRows, release_freed_memory
from phpn_core.method.semi_nmf import semi_nmf
from phpn_core.method.stages import count_read, stage

__all__ = ["decompose_class", "decompose_head", "ClassDecomposition", "HeadDecomposition", "refine", "DISCOVERIES"]

DISCOVERIES = ("auto", "nmf", "semi_nmf", "shift_nmf", "posneg_nmf", "hybrid_nmf")
# the code each class's discovery is recorded under (diagnostics["discovery"])
DISCOVERY_CODES = {"nmf": 0, "semi_nmf": 1, "shift_nmf": 2, "posneg_nmf": 3, "hybrid_nmf": 4}
# hybrid_nmf: a channel whose values stay within FLOOR_SD standard deviations below its mean has a floor (an
# activation: GELU/ReLU-like, a long tail above and almost nothing below); a two-sided channel (LayerNormed tokens)
# reaches ~3.5 sd below its mean over thousands of positions. Measured: ConvNeXt maps 0.5 sd, ViT tokens ~7 sd.
FLOOR_SD = 2.0
# decompose_head streams a class whose features in the compute dtype exceed this (one ImageNet class of ResNet-50
# features, 1300 x 7 x 7 x 2048, is 522 MB in float32): its memory is then one block, not the class.
STREAM_BYTES = 256 << 20
# _scale: prototypes' singular values below this fraction of the largest are noise (measured: 6e-6 for a rank-1
# class; real classes' smallest ratio 8e-3 at k = 10, D = 512)
SCALE_RCOND = 1e-4
# auto_k: two prototypes whose maps' cosine exceeds this are duplicates (the evaluation's duplicate threshold too)
AUTO_K_THRESHOLD = 0.9


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

def _check_features(F: torch.Tensor, name: str, D: int | None, k: int, discovery: str = "nmf") -> float:
    """Shape, dtype and value checks of one class's features in one read (``aminmax``: a NaN shows in both);
    returns the features' minimum (``discovery="auto"`` picks the method from it)."""
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
    rows = F.shape[0] * F.shape[1] * F.shape[2]
    if k > min(rows, F.shape[-1]):
        raise ValueError(
            f"{name}: k={k} prototypes need at least k feature rows and channels; got n*H*W={rows}, "
            f"D={F.shape[-1]}. Use k <= {min(rows, F.shape[-1])} or more images."
        )
    lo, hi = (float(v) for v in torch.aminmax(F))
    return _check_range(lo, hi, name, discovery)


def _check_range(lo: float, hi: float, name: str, discovery: str) -> float:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name}: features contain NaN or inf; expected finite values. Check the extraction.")
    if discovery == "nmf" and lo < 0:
        raise ValueError(
            f"{name}: features must be non-negative for discovery='nmf'; got a minimum of {lo:.4g}. Fix: "
            "use discovery='auto' (signed features, e.g. ConvNeXt/Swin/ViT), or post-ReLU features."
        )
    return lo


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


# ----------------------------------------------------------------------------------------------- pipeline

def _scale(P: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Least-squares alpha: P ``[C, k, D]``, v ``[C, D]`` -> ``[C, k]`` (closed form, by the SVD of P).

    Min-norm over P's determined directions: one whose singular value is below ``SCALE_RCOND`` of the largest is
    dropped. Near-collinear prototypes (a class of rank < k, e.g. one image) would otherwise get huge alphas of
    opposite signs, and prototypes thousands of times the head row lose float32 exactness in their sum; what the
    dropped direction would have carried stays in the residual R, which the refinement distributes exactly."""
    U, S, Vh = torch.linalg.svd(P, full_matrices=False)  # P = U diag(S) Vh
    inv = torch.where(S > SCALE_RCOND * S[:, :1], 1.0 / S.clamp_min(1e-300), torch.zeros_like(S))
    return torch.bmm(U * inv.unsqueeze(1), torch.bmm(Vh, v.unsqueeze(2))).squeeze(2)


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
    if method == "nmf":  # checked per class already: straight to the solver, no second read for the checks
        op = DenseProducts(X)
        rc = counts.to(X.device) if counts is not None else None
        n_valid = (rc if rc is not None else torch.full((X.shape[0],), m, device=X.device)).to(X.dtype) * X.shape[2]
        with stage("stats"):
            xnorm2, fill = op.sq_norm(), op.total() / n_valid
        res = factorize(op, k, xnorm2=xnorm2, fill=fill, row_counts=rc, item_seeds=seeds,
                        **_solver_options(nmf_options))
        return res, X
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


def _solver_options(nmf_options: dict) -> dict:
    """The options of :func:`~phpn_core.method.nmf.factorize` among ``nmf_options`` (the rest: how X is read)."""
    return {n: v for n, v in nmf_options.items() if n not in ("compute_dtype", "block_bytes", "device")}


def _finish(P: torch.Tensor, maps_of, V: torch.Tensor, res, method: str, k: int, dtype, normalization: str,
            target: str, ridge: float, refine_iter: int, hw: int | None = None, auto_k: bool = False,
            auto_k_threshold: float = AUTO_K_THRESHOLD) -> dict:
    """Steps 2-4 for a batch: scaling, the refinement on the Gram matrix of the maps, the exact sum; with
    ``auto_k``, duplicate prototypes merged (:func:`~phpn_core.method.merge.merge_duplicates`).

    ``maps_of(Z)``: the maps ``X Z^T`` ``[C, m, k+1]`` of Z ``[C, k+1, D]`` (one read of X). ``hw``: positions per
    image (rows of X come image by image; None: the class is one image), for the redundancy of the maps."""
    with stage("scaling"):
        V = V.to(device=P.device, dtype=torch.float64)
        P64 = P.double()
        alpha = _scale(P64, V)  # [C, k]
        R = V - torch.bmm(alpha.unsqueeze(1), P64).squeeze(1)  # [C, D]
        Z = torch.cat([P64, R.unsqueeze(1)], 1)  # [C, k+1, D]
    with stage("refine_gram"):
        maps = maps_of(Z.to(dtype)).double()  # [C, m, k+1]; padded rows are zero
        K = torch.bmm(maps.transpose(1, 2), maps)
    with stage("refine_solve"):
        W, diag = refine(K, alpha, normalization=normalization, target=target, ridge=ridge, max_iter=refine_iter)
        residual = torch.bmm(W, Z)  # [C, k, D]
        protos = alpha.unsqueeze(2) * P64 + residual
    C = P.shape[0]
    with stage("redundancy"):
        G = map_gram(maps, W, alpha, hw)  # [C, k, k]: the refined prototypes' centred maps (raw, not oriented)
        if auto_k:
            T = merge_duplicates(G, torch.sign(alpha), auto_k_threshold).to(protos.device)  # [C, k, k]
            merged = torch.bmm(T, alpha.unsqueeze(2) * P64)
            initial = torch.bmm(T, P64)
            # a merged slot's alpha: the size of its members' alpha P over the size of their summed P, with the
            # sign of the member of largest map (its orientation); a slot of one prototype keeps its alpha
            sgn = group_signs(T, G, alpha)
            alpha = torch.where(T.abs().sum(2) > 0,
                                sgn * merged.norm(dim=2) / initial.norm(dim=2).clamp_min(1e-300),
                                torch.zeros_like(alpha))
            protos = torch.bmm(T, protos)
            P64 = initial
            residual = protos - alpha.unsqueeze(2) * P64
            G = torch.bmm(torch.bmm(T, G), T.transpose(1, 2))
        active = (protos != 0).any(2)  # [C, k]
        kc = active.sum(1)
        red = max_cosine(gram_cosines(G, torch.where(alpha < 0, -1.0, 1.0)), active)
        diag["redundancy"] = torch.where(torch.isfinite(red), red, torch.full_like(red, -1.0)).cpu()
        diag["k"] = kc.to(torch.float64).cpu()
    with stage("refine_solve"):
        # The parametrisation makes sum_i r_i = R up to rounding; spread the rounding over the prototypes in use
        # so the sum is v exactly (unused slots stay zero).
        protos = protos + ((V - protos.sum(1)) / kc.to(protos).unsqueeze(1)).unsqueeze(1) * active.unsqueeze(2)
        out = protos.to(dtype)
        head_err = (out.sum(1) - V.to(dtype)).abs().amax(1)
    diag.update({"nmf_iter": torch.as_tensor(res.n_iter).reshape(C).cpu(),
                 "nmf_converged": torch.as_tensor(res.converged).reshape(C).cpu(),
                 "discovery": torch.full((C,), float(DISCOVERY_CODES[method]), dtype=torch.float64)})
    return {
        "prototypes": out, "initial": P64.to(P.dtype) if auto_k else P, "alpha": alpha.to(dtype),
        "residual": residual.to(dtype), "rel_error": torch.as_tensor(res.rel_error).reshape(C), "head_error": head_err,
        "diagnostics": {n: t.cpu() for n, t in diag.items()},
    }


def _decompose_batch(Fs: list[torch.Tensor], V: torch.Tensor, k: int, seeds: list[int], nmf_options: dict,
                     normalization: str, target: str, ridge: float, refine_iter: int, device,
                     method: str = "nmf", dtype=None, hw: int | None = None,
                     merge: tuple = (False, AUTO_K_THRESHOLD)) -> dict:
    """Decompose a batch of classes held in memory. Fs: list of ``[N_c, D]``; V ``[C, D]``; ``method`` one
    discovery for all; ``dtype`` the compute dtype (default: the features')."""
    dtype = dtype or Fs[0].dtype
    rows = [f.shape[0] for f in Fs]
    m = max(rows)
    D = V.shape[1]
    with stage("padding"):
        X = torch.zeros(len(Fs), m, D, dtype=dtype, device=device)
        for i, f in enumerate(Fs):
            X[i, : f.shape[0]] = f.to(device)
    res, X = _discover(X, rows, k, seeds, nmf_options, method, device)
    return _finish(res.P, lambda Z: _count(torch.bmm(X, Z.transpose(1, 2))), V, res, method, k, dtype,
                   normalization, target, ridge, refine_iter, hw, *merge)


def _count(t: torch.Tensor) -> torch.Tensor:
    count_read()
    return t


def _decompose_streamed(source: RowSource, v: torch.Tensor, k: int, seed: int, nmf_options: dict,
                        normalization: str, target: str, ridge: float, refine_iter: int, device, dtype,
                        name: str, merge: tuple = (False, AUTO_K_THRESHOLD)) -> dict:
    """One class read from ``source`` in row blocks (``discovery="nmf"``): the same solver and refinement as
    :func:`_decompose_batch`, never holding more than one block of X in the compute dtype."""
    op, stats = checked_source(source, k, device=device, compute_dtype=dtype, block_bytes=nmf_options.get(
        "block_bytes"), who=name)
    res = factorize(op, k, xnorm2=stats["sq_norm"].view(1), fill=(stats["total"] / (source.n_rows * source.dim)
                                                                   ).view(1),
                    item_seeds=[seed], **{**_solver_options(nmf_options), "solver": "rhals"})
    out = _finish(res.P, lambda Z: op.times(Z.transpose(1, 2)), v.unsqueeze(0), res, "nmf", k, dtype,
                  normalization, target, ridge, refine_iter, getattr(source, "hw", None), *merge)
    release_freed_memory()
    return out


def decompose_head(
    features_by_class: Mapping[int, torch.Tensor | RowSource],
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
    stream_bytes: int = STREAM_BYTES,
    auto_k: bool = False,
    auto_k_threshold: float = AUTO_K_THRESHOLD,
    progress=None,
) -> HeadDecomposition:
    """Decompose the head rows of the given classes, all classes batched through NMF and refinement.

    Args:
        features_by_class: ``{class index: F_c [n_c, H, W, D]}``, float (>= 0 for ``discovery="nmf"``; signed
            features are handled by ``"auto"``), or ``{class index: RowSource}`` (rows ``[n_c H W, D]`` read in
            blocks, e.g. :meth:`FeatureStore.class_row_source
            <phpn_core.storage.feature_reads.ClassReads.class_row_source>`). Float16/bfloat16 features are computed
            in float32. Not modified. Any subset of the head's classes (a shard); results follow
            ``sorted(features_by_class)``.
        weight: ``[C, D]`` the linear head. Not modified.
        k: prototypes per class.
        seed: class c's NMF uses seed ``seed * 1_000_003 + c``, so a class's result does not depend on which
            other classes share its batch or shard.
        normalization, target, refine_ridge, refine_iter: the refinement (see the module docstring).
        discovery: ``"auto"`` (NMF for non-negative classes, ``"hybrid_nmf"`` for signed ones), ``"nmf"``,
            ``"hybrid_nmf"``, ``"posneg_nmf"``, ``"semi_nmf"`` or ``"shift_nmf"`` (see the module docstring); recorded
            per class in ``diagnostics["discovery"]`` (:data:`DISCOVERY_CODES`).
        nmf_options: extra keyword options for :func:`phpn_core.method.nmf.nmf` (max_iter, tol, solver, ...;
            ``block_bytes`` sizes a streamed class's blocks).
        device: where to compute (default: the features' device; a row source's: CPU).
        max_batch_bytes: classes are processed in batches whose padded features stay below this size.
        stream_bytes: a non-negative class larger than this in the compute dtype (and every row source) is
            decomposed alone, its rows streamed in blocks: memory is one block plus thin factors, not the class.
            Same solver (``rhals``) and refinement as in memory; another summation order, so the same error but not
            always the same point of NMF's flat valley (as for a class in another batch).
        auto_k: ``k`` is a cap: two refined prototypes of a class whose maps on its training features are
            duplicates (cosine of their oriented, per-image-centred maps above ``auto_k_threshold``) are merged into
            one, their sum (greedy, most similar pair first, until no pair is). A sum keeps the head row's sum
            exact, and a duplicate pair covers one part, so no part is lost (refitting with a smaller k merges two
            parts instead: measured, README "Quality at scale"). The freed slots are zero prototypes (alpha,
            initial and residual 0): they add nothing to any logit, and evaluations skip them
            (``PartPrototypeHead.active``). ``diagnostics["k"]``: each class's number of prototypes in use;
            ``diagnostics["redundancy"]``: its largest remaining cosine (-1 with one prototype). No extra read
            of the features: the maps are the refinement's.
        progress: optional callable ``progress(n_done, n_total)`` called after each batch.

    Returns:
        :class:`HeadDecomposition` with prototypes ``[C', k, D]``, ``prototypes.sum(1) == weight[classes]``.
    """
    _check_k(k)
    _check_options(normalization, target, discovery)
    if not isinstance(auto_k, bool):
        raise TypeError(f"decompose_head: auto_k must be a bool; got {type(auto_k).__name__} {auto_k!r}.")
    if isinstance(auto_k_threshold, bool) or not isinstance(auto_k_threshold, (int, float)) \
            or not -1 <= auto_k_threshold <= 1:
        raise ValueError(f"decompose_head: auto_k_threshold must be a cosine in [-1, 1]; got {auto_k_threshold!r} "
                         f"(default {AUTO_K_THRESHOLD}).")
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
    given = {c: features_by_class[c] for c in classes}
    sources = {c: f for c, f in given.items() if isinstance(f, RowSource)}
    tensors = {c: f for c, f in given.items() if c not in sources}
    compute = {_compute_dtype(f.dtype) for f in given.values() if isinstance(f, (torch.Tensor, RowSource))}
    devices = {f.device for f in tensors.values() if isinstance(f, torch.Tensor)}
    if len(compute) > 1 or len(devices) > 1:
        raise TypeError(
            f"decompose_head: all classes' features must share one dtype and device; got dtypes "
            f"{sorted({str(f.dtype) for f in given.values() if hasattr(f, 'dtype')})}, devices "
            f"{sorted(map(str, devices))}."
        )
    with stage("checks"):
        lows = {c: _check_features(f, f"decompose_head: class {c}", D, k, discovery) for c, f in tensors.items()}
        count_read(int(len(tensors) > 0))  # one aminmax per class: one read of the batch
    for c, src in sources.items():
        if src.dim != D:
            raise ValueError(f"decompose_head: class {c}: row source has D={src.dim}; expected the head's D={D}.")
    dtype = next(iter(compute)) if compute else weight.dtype
    if weight.dtype != dtype:
        raise TypeError(f"decompose_head: weight dtype {weight.dtype} differs from the features' compute dtype "
                        f"{dtype}; cast one.")
    dev = torch.device(device) if device is not None else (next(iter(devices)) if devices else torch.device("cpu"))
    opts = dict(nmf_options or {})
    itemsize = torch.empty((), dtype=dtype).element_size()

    flat = {c: f.reshape(-1, D) for c, f in tensors.items()}
    hws = {c: f.shape[1] * f.shape[2] for c, f in tensors.items()}
    if discovery == "auto":  # class by class, so a class's method never depends on its shard
        method = {c: "nmf" if lows[c] >= 0 else "hybrid_nmf" for c in flat}
        method.update(dict.fromkeys(sources, "nmf"))
    else:
        method = dict.fromkeys(classes, discovery)
    bad = [c for c in sources if method[c] != "nmf"]
    if bad:
        raise ValueError(f"decompose_head: classes {bad[:5]} are row sources, which only discovery 'nmf' or 'auto' "
                         f"reads (non-negative features); got discovery={discovery!r}. Fix: pass their features "
                         "as tensors.")
    streamed = sorted(set(sources) | {c for c in flat if method[c] == "nmf" and
                                      flat[c].shape[0] * D * itemsize > stream_bytes})
    for c in streamed:
        if c in flat:
            sources[c] = TensorRows(flat.pop(c), hw=hws[c])
    batches = []
    for how, hw in sorted({(method[c], hws[c]) for c in flat}, key=lambda t: (DISCOVERIES.index(t[0]), t[1])):
        cur, cur_m = [], 0
        for c in (c for c in classes if c in flat and method[c] == how and hws[c] == hw):
            m_new = max(cur_m, flat[c].shape[0])
            if cur and (len(cur) + 1) * m_new * D * itemsize > max_batch_bytes:
                batches.append((how, hw, cur))
                cur, m_new = [], flat[c].shape[0]
            cur.append(c)
            cur_m = m_new
        if cur:
            batches.append((how, hw, cur))

    parts = []
    done = 0
    common = (normalization, target, refine_ridge, refine_iter, dev)
    merge = (auto_k, float(auto_k_threshold))
    for how, hw, batch in batches:
        parts.append(_decompose_batch([flat[c] for c in batch], weight[batch], k, [seed * 1_000_003 + c for c in batch],
                                      opts, *common, how, dtype, hw, merge))
        done += len(batch)
        if progress is not None:
            progress(done, len(classes))
    for c in streamed:
        parts.append(_decompose_streamed(sources[c], weight[c], k, seed * 1_000_003 + c, opts, *common, dtype,
                                         f"decompose_head: class {c}", merge))
        done += 1
        if progress is not None:
            progress(done, len(classes))
    # back to class order (batches are grouped by discovery method, streamed classes last)
    order = torch.tensor([c for _, _, batch in batches for c in batch] + streamed).argsort()
    cat = lambda name: torch.cat([p[name].to(dev) for p in parts])[order.to(dev)]  # noqa: E731
    diagnostics = {n: torch.cat([p["diagnostics"][n] for p in parts])[order] for n in parts[0]["diagnostics"]}
    return HeadDecomposition(
        prototypes=cat("prototypes"), initial=cat("initial"), alpha=cat("alpha"), residual=cat("residual"),
        rel_error=cat("rel_error"), head_error=cat("head_error"), classes=classes, diagnostics=diagnostics,
    )


def _compute_dtype(dt: torch.dtype) -> torch.dtype:
    """Half-precision features are stored that way, computed in float32."""
    return dt if dt in (torch.float32, torch.float64) else torch.float32


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
