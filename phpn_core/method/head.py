"""PartPrototypeHead: the decomposed linear head, with the original logits and an explanation of each.

``logit_c(x) = sum_i mean_hw(F(x)_hw . p~_{c,i}) + b_c``: prototype i's contribution is the mean of its map
(its "what"), the map ``F(x)_hw . p~_{c,i}`` is its heatmap (its "where"). Since ``sum_i p~_{c,i} = v_c``, the
logits are the original head's.

Orientation: ``signs[c, i] = sign(alpha_{c,i})`` (stored with the head). A prototype with a negative alpha
carries its part as negative evidence, so its map is negative where the part is; ``oriented_heatmaps``
(``signs * heatmaps``) peak where the part is for every prototype, and that is what the evaluation locates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["PartPrototypeHead", "Explanation"]


@dataclass(frozen=True)
class Explanation:
    """logits ``[B, C]``, contributions ``[B, C, k]``, heatmaps ``[B, C, k, H, W]``, bias ``[C]``, signs ``[C, k]``.

    ``contributions.sum(-1) + bias == logits`` and ``heatmaps.mean((-2, -1)) == contributions``. When the
    explanation was asked for a subset of classes, C is that subset's size and ``classes`` lists them.
    """

    logits: torch.Tensor
    contributions: torch.Tensor
    heatmaps: torch.Tensor
    bias: torch.Tensor
    signs: torch.Tensor
    classes: list[int] | None = None

    @property
    def oriented_heatmaps(self) -> torch.Tensor:
        """``[B, C, k, H, W]``: heatmaps times their prototype's sign, peaking where the part is."""
        return self.heatmaps * self.signs.view(1, *self.signs.shape, 1, 1)


class PartPrototypeHead(nn.Module):
    """A GAP + linear head written as k part-prototypes per class.

    Args:
        prototypes: ``[C, k, D]`` refined prototypes (``prototypes.sum(1)`` is the original weight ``[C, D]``).
        bias: ``[C]`` or None (zeros).
        signs: ``[C, k]`` of +-1 (default: all +1); see the module docstring.

    ``forward(fmap [B, D, H, W]) -> logits [B, C]``; ``explain(fmap) -> Explanation``.
    """

    def __init__(self, prototypes: torch.Tensor, bias: torch.Tensor | None = None, *, signs: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(prototypes, torch.Tensor) or prototypes.ndim != 3:
            got = tuple(prototypes.shape) if isinstance(prototypes, torch.Tensor) else type(prototypes).__name__
            raise ValueError(f"PartPrototypeHead: prototypes must have shape [C, k, D]; got {got}.")
        if not prototypes.is_floating_point():
            raise TypeError(f"PartPrototypeHead: prototypes must be float; got {prototypes.dtype}.")
        C, k, D = prototypes.shape
        if bias is None:
            bias = torch.zeros(C, dtype=prototypes.dtype, device=prototypes.device)
        if not isinstance(bias, torch.Tensor) or bias.shape != (C,):
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"PartPrototypeHead: bias must have shape [C={C}]; got {got}.")
        if signs is None:
            signs = torch.ones(C, k, dtype=prototypes.dtype, device=prototypes.device)
        if not isinstance(signs, torch.Tensor) or signs.shape != (C, k):
            got = tuple(signs.shape) if isinstance(signs, torch.Tensor) else type(signs).__name__
            raise ValueError(f"PartPrototypeHead: signs must have shape [C={C}, k={k}]; got {got}.")
        if bias.dtype != prototypes.dtype or bias.device != prototypes.device:
            raise TypeError(
                f"PartPrototypeHead: bias must share the prototypes' dtype and device; got prototypes "
                f"{prototypes.dtype} on {prototypes.device}, bias {bias.dtype} on {bias.device}."
            )
        self.register_buffer("prototypes", prototypes.detach().clone())
        self.register_buffer("bias", bias.detach().clone())
        self.register_buffer("signs", torch.where(signs.detach() < 0, -1.0, 1.0).to(prototypes))

    @property
    def n_classes(self) -> int:
        return self.prototypes.shape[0]

    @property
    def k(self) -> int:
        return self.prototypes.shape[1]

    @property
    def active(self) -> torch.Tensor:
        """``[C, k]`` bool: the prototypes in use. A class decomposed with fewer than k prototypes
        (``decompose_head(..., auto_k=True)``) has zero prototypes in its unused slots: they add nothing to any
        logit, and evaluations skip them."""
        return (self.prototypes != 0).any(-1)

    @property
    def k_per_class(self) -> torch.Tensor:
        """``[C]`` long: each class's number of prototypes in use."""
        return self.active.sum(1)

    @property
    def weight(self) -> torch.Tensor:
        """``[C, D]``: the linear head the prototypes sum to."""
        return self.prototypes.sum(1)

    def _check_fmap(self, fmap: torch.Tensor) -> None:
        if not isinstance(fmap, torch.Tensor) or fmap.ndim != 4:
            got = tuple(fmap.shape) if isinstance(fmap, torch.Tensor) else type(fmap).__name__
            raise ValueError(f"PartPrototypeHead: fmap must have shape [B, D, H, W]; got {got}.")
        if fmap.shape[1] != self.prototypes.shape[2]:
            raise ValueError(
                f"PartPrototypeHead: fmap has D={fmap.shape[1]} channels, the prototypes D={self.prototypes.shape[2]} "
                f"(fmap shape {tuple(fmap.shape)}; expected [B, D, H, W], channels first)."
            )
        if fmap.dtype != self.prototypes.dtype or fmap.device != self.prototypes.device:
            raise TypeError(
                f"PartPrototypeHead: fmap is {fmap.dtype} on {fmap.device}, the head {self.prototypes.dtype} on "
                f"{self.prototypes.device}; move one (head.to(...)) so they match."
            )

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        """``[B, D, H, W] -> [B, C]``: the original head's logits."""
        self._check_fmap(fmap)
        return fmap.mean((2, 3)) @ self.weight.T + self.bias

    def explain(self, fmap: torch.Tensor, *, classes: list[int] | None = None) -> Explanation:
        """Logits, per-prototype contributions and heatmaps for ``fmap [B, D, H, W]``.

        ``classes`` restricts the explanation to some classes (heatmaps for all C classes are
        ``B * C * k * H * W`` values).
        """
        self._check_fmap(fmap)
        protos, bias, signs = self.prototypes, self.bias, self.signs
        if classes is not None:
            idx = torch.as_tensor(classes, dtype=torch.long, device=protos.device)
            if idx.ndim != 1 or bool(((idx < 0) | (idx >= self.n_classes)).any()):
                raise ValueError(f"explain: classes must be a list of ints in [0, {self.n_classes}); got {classes}.")
            protos, bias, signs = protos[idx], bias[idx], signs[idx]
        heatmaps = torch.einsum("bdhw,ckd->bckhw", fmap, protos)
        contributions = heatmaps.mean((-2, -1))
        logits = contributions.sum(-1) + bias
        return Explanation(logits, contributions, heatmaps, bias, signs, list(classes) if classes is not None else None)

    # ------------------------------------------------------------------------------------------ persistence
    def save(self, path: str | Path, *, metadata: dict | None = None) -> None:
        """Write the head as safetensors (no pickle); ``metadata`` must be JSON-serialisable."""
        from safetensors.torch import save_file

        meta = {"format": "phpn.PartPrototypeHead/1", "metadata": json.dumps(metadata or {})}
        tensors = {n: t.detach().cpu().contiguous() for n, t in (("prototypes", self.prototypes),
                                                                  ("bias", self.bias), ("signs", self.signs))}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> tuple["PartPrototypeHead", dict]:
        """Read a head written by :meth:`save`; returns ``(head, metadata)``. Never unpickles."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != "phpn.PartPrototypeHead/1":
                raise ValueError(
                    f"PartPrototypeHead.load: {path} is not a phpn head file (format {meta.get('format')!r}; "
                    "expected 'phpn.PartPrototypeHead/1')."
                )
            t = {n: f.get_tensor(n) for n in ("prototypes", "bias", "signs")}
        return cls(t["prototypes"], t["bias"], signs=t["signs"]), json.loads(meta.get("metadata", "{}"))

    @classmethod
    def from_decomposition(cls, decomposition, bias: torch.Tensor | None = None) -> "PartPrototypeHead":
        """Build from a :class:`~phpn_core.method.decompose.HeadDecomposition` covering all classes, in order."""
        if list(decomposition.classes) != list(range(decomposition.prototypes.shape[0])):
            raise ValueError(
                "PartPrototypeHead.from_decomposition: the decomposition covers classes "
                f"{decomposition.classes[:5]}...; expected all classes 0..C-1 in order. Merge the shards first."
            )
        return cls(decomposition.prototypes, bias, signs=torch.sign(decomposition.alpha))
