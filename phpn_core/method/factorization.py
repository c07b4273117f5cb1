"""What the factorisations (:mod:`~phpn_core.method.nmf`, :mod:`~phpn_core.method.semi_nmf`) share: their result
type, their warning, and the checks of their arguments (the input matrix and k, per-item row counts and seeds)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["NMFConvergenceWarning", "NMFResult", "check_factorization_input", "checked_item_seeds",
           "checked_row_counts"]


class NMFConvergenceWarning(UserWarning):
    """NMF stopped at ``max_iter`` before the relative change of its error fell below ``tol``."""


@dataclass(frozen=True)
class NMFResult:
    """The factors of ``X ~= E @ P``.

    Attributes:
        E: ``[m, k]`` or ``[B, m, k]``, >= 0 (rows beyond ``row_counts`` are zero).
        P: ``[k, D]`` or ``[B, k, D]``, >= 0.
        rel_error: ``[]`` or ``[B]``: ``||X - E P||_F / ||X||_F`` (0 where X is all zeros).
        n_iter: int (unbatched) or LongTensor ``[B]``: sweeps run per matrix (compressed + polish).
        converged: bool tensor ``[]`` or ``[B]``.
    """

    E: torch.Tensor
    P: torch.Tensor
    rel_error: torch.Tensor
    n_iter: int | torch.Tensor
    converged: torch.Tensor


def check_factorization_input(X: torch.Tensor, k: int, *, who: str = "nmf", nonnegative: bool = True) -> None:
    """The argument checks of :func:`nmf` and (``nonnegative=False``) of semi-NMF; ``who`` names the caller."""
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"{who}: X must be a torch.Tensor of shape [m, D] or [B, m, D]; got {type(X).__name__}.")
    if X.ndim not in (2, 3):
        raise ValueError(
            f"{who}: X must have shape [m, D] or [B, m, D]; got {X.ndim} dimensions with shape {tuple(X.shape)}."
        )
    if not X.is_floating_point():
        raise TypeError(f"{who}: X must be float32 or float64; got {X.dtype}. Convert with X.float().")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{who}: k must be an int; got {type(k).__name__}.")
    m, D = X.shape[-2], X.shape[-1]
    if m == 0 or D == 0:
        raise ValueError(f"{who}: X is empty (shape {tuple(X.shape)}); expected at least one row and column.")
    if k < 1 or k > min(m, D):
        raise ValueError(
            f"{who}: k must be in [1, min(m, D)] = [1, {min(m, D)}] for X of shape {tuple(X.shape)}; got k={k}. "
            "Use fewer prototypes or more images."
        )
    if not bool(torch.isfinite(X).all()):
        n_bad = int((~torch.isfinite(X)).sum())
        raise ValueError(f"{who}: X must be finite; got {n_bad} NaN/inf entries. Check the feature extraction.")
    if not nonnegative:
        return
    xmin = float(X.min())
    if xmin < 0:
        raise ValueError(
            f"{who}: X must be non-negative (post-ReLU features); got a minimum of {xmin:.4g}. "
            "Apply the backbone's documented feature shift, or use features taken after a ReLU."
        )


def checked_row_counts(row_counts, B: int, m: int, k: int, device, who: str) -> torch.Tensor | None:
    """``row_counts`` as a LongTensor ``[B]`` on ``device`` with values in ``[k, m]`` (None stays None)."""
    if row_counts is None:
        return None
    rc = torch.as_tensor(row_counts, device=device).long()
    if rc.shape != (B,) or bool((rc < k).any()) or bool((rc > m).any()):
        raise ValueError(
            f"{who}: row_counts must have shape [{B}] with values in [k={k}, m={m}]; got "
            f"shape {tuple(rc.shape)}, values {rc.tolist()}."
        )
    return rc


def checked_item_seeds(item_seeds, seed: int, B: int, who: str) -> list[int]:
    """One seed per matrix: ``item_seeds`` when given (length B), else ``seed + b``."""
    if item_seeds is None:
        return [int(seed) + b for b in range(B)]
    if len(item_seeds) != B:
        raise ValueError(f"{who}: item_seeds must have one seed per matrix ({B}); got {len(item_seeds)}.")
    return list(item_seeds)
