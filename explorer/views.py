"""What the explorer's pages show, as plain records: one line of the entries table (:class:`EntryRow`) and one
class of an entry (:class:`ClassView`), whatever the entry's kind (phpn or a ProtoPNet baseline)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ClassView", "EntryRow"]


@dataclass(frozen=True)
class EntryRow:
    """One line of the entries table: the entry's identity and shapes, its metrics (None: unknown) and, for an entry
    whose pointer cannot be read, ``error``."""

    entry_id: str
    kind: str = "phpn"
    model: str | None = None
    dataset: str | None = None
    k: int | None = None
    n_classes: int | None = None
    D: int | None = None
    created: str | None = None
    version: str | None = None
    run: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics_source: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"entry_id": self.entry_id, "kind": self.kind, "model": self.model, "dataset": self.dataset, "k": self.k,
                "n_classes": self.n_classes, "D": self.D, "created": self.created, "version": self.version,
                "run": self.run, "metrics": self.metrics, "baselines": self.baselines,
                "metrics_source": self.metrics_source, "error": self.error}


@dataclass(frozen=True)
class ClassView:
    """What a class page shows for class ``c`` of an entry (k prototypes, n test images shown, h x w maps).

    ``alpha [k]``, ``signs [k]``, ``norms [k]`` (of the refined prototypes), ``rel_error`` (the class's NMF error);
    ``test_ids`` (n), ``test_logits [n]``, ``test_pred`` (n class indices: the decomposed head's argmax over all
    classes, equal to the original model's), ``contributions [n, k]``, ``oriented [n, k, h, w]`` (from the stored
    test features), ``test_images [n, 3, S, S]`` or None (the dataset is not at hand); ``gallery``: k lists of
    ``(image_id, score, patch [3, p, p] or None)``, best first; ``notes``: what could not be shown and why.
    """

    entry_id: str
    c: int
    name: str
    bias: float
    alpha: torch.Tensor
    signs: torch.Tensor
    norms: torch.Tensor
    rel_error: float | None
    test_ids: list[str]
    test_logits: torch.Tensor
    test_pred: list[int]
    contributions: torch.Tensor
    oriented: torch.Tensor
    test_images: torch.Tensor | None
    gallery: list[list[tuple[str, float, torch.Tensor | None]]]
    notes: list[str]
    kind: str = "phpn"  # or "protopnet": alpha = last-layer weights, gallery = pushed patches, maps = similarities

    @property
    def k(self) -> int:
        return int(self.alpha.shape[0])

    def to_json(self, class_names: list[str]) -> dict[str, Any]:
        mean_contrib = self.contributions.mean(0).tolist() if self.contributions.shape[0] else [None] * self.k
        return {
            "entry_id": self.entry_id, "class": self.c, "name": self.name, "bias": self.bias, "k": self.k,
            "rel_error": self.rel_error,
            "prototypes": [
                {"index": i, "alpha": float(self.alpha[i]), "sign": int(self.signs[i]), "norm": float(self.norms[i]),
                 "mean_contribution": mean_contrib[i],
                 "gallery": [{"image_id": g[0], "score": g[1]} for g in self.gallery[i]] if self.gallery else []}
                for i in range(self.k)
            ],
            "test_images": [
                {"image_id": self.test_ids[b], "logit": float(self.test_logits[b]),
                 "predicted": self.test_pred[b], "predicted_name": class_names[self.test_pred[b]],
                 "contributions": [float(v) for v in self.contributions[b]]}
                for b in range(len(self.test_ids))
            ],
            "notes": self.notes,
        }
