"""PNG rendering for the explorer's pages, through :mod:`phpn_core.report.figures` (the report's primitives).

Each function takes a :class:`~explorer.data.ClassView` (or an explanation) and returns PNG bytes; the app caches
them (rendered once per entry version, class and kind, on first request).
"""

from __future__ import annotations

import torch

from explorer.views import ClassView

__all__ = ["KINDS", "render_class_png", "proto_labels"]

KINDS = ("heatmaps", "gallery", "contributions")
_GREY = 0.82


def proto_labels(view: ClassView) -> list[str]:
    """``p0 .. p{k-1}``, with ``(neg)`` for prototypes whose scaling coefficient is negative (negative evidence)."""
    return [f"p{i} (neg)" if float(view.signs[i]) < 0 else f"p{i}" for i in range(view.k)]


def _short(text: str, n: int = 26) -> str:
    return text if len(text) <= n else "..." + text[-(n - 3):]


def render_class_png(view: ClassView, kind: str, class_names: list[str]) -> bytes | None:
    """PNG bytes of one figure of class ``view.c``: ``"heatmaps"`` (test images x prototypes, oriented maps),
    ``"gallery"`` (prototypes x their top training patches) or ``"contributions"`` (bar charts per test image).
    None when the view has nothing to draw for that kind (no test images, no gallery pixels)."""
    from phpn_core.report import figures as viz

    labels = proto_labels(view)
    name = view.name
    if kind == "heatmaps":
        n = len(view.test_ids)
        if n == 0:
            return None
        maps = view.oriented  # [n, k, h, w]
        if view.test_images is not None:
            images = view.test_images
        else:  # no pixels at hand: the maps over a plain grey square at a readable size
            h, w = maps.shape[-2:]
            S = max(64, 8 * max(h, w))
            images = torch.full((n, 3, S, S), _GREY)
        rows = [f"{_short(i)}\npred: {_short(class_names[p])}" for i, p in zip(view.test_ids, view.test_pred)]
        return viz.render_heatmap_grid(images, maps, row_labels=rows, col_labels=labels,
                                       title=f"{name}: " + ("similarity maps" if view.kind == "protopnet" else
                                                            "oriented heatmaps") + " (colour scale per prototype, 0 .. max)",
                                       show_image=view.test_images is not None, quantize=True)
    if kind == "gallery":
        if not view.gallery or not any(view.gallery) or any(p is None for row in view.gallery for _, _, p in row):
            return None
        return viz.render_gallery([[p for _, _, p in row] for row in view.gallery], row_labels=labels,
                                  title=f"{name}: " + ("the training patch each prototype was pushed onto"
                                                       if view.kind == "protopnet" else
                                                       "training patches where each prototype peaks"), quantize=True)
    if kind == "contributions":
        if len(view.test_ids) == 0:
            return None
        return viz.render_contributions(view.contributions, bias=view.bias, logits=view.test_logits,
                                        labels=[f"p{i}" for i in range(view.k)],
                                        titles=[_short(i, 24) for i in view.test_ids],
                                        title=f"{name}: contributions (+ bias = logit)")
    raise ValueError(f"unknown figure kind {kind!r}: expected one of {KINDS}")
