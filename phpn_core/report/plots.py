"""Plot primitives drawn with matplotlib (one map over one image with a colour bar, contribution bars), the
conversions every figure shares (tensors to arrays, colour scales, upsampling, PNG encoding), and the overlay of a
heatmap on an image. See :mod:`phpn_core.report.figures` for the whole family."""


from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from phpn_core.errors import InputValueError, ShapeError

__all__ = [
    "BIAS_COLOUR", "NEGATIVE_COLOUR", "POSITIVE_COLOUR", "array_to_png", "as_numpy", "check_map", "colormap",
    "contribution_bars", "figure_to_png", "heatmap_overlay", "image_hwc", "new_figure", "plot_contributions",
    "plot_heatmap_overlay", "png_size", "upsample_map",
]

POSITIVE_COLOUR = "#2c7bb6"
NEGATIVE_COLOUR = "#d7191c"
BIAS_COLOUR = "#9e9e9e"


# ------------------------------------------------------------------------------------------------------ conversion


def as_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.numpy()
    if isinstance(x, np.ndarray):
        return x
    raise InputValueError(
        f"{name} must be a torch.Tensor or numpy array; got {type(x).__name__}. Fix: pass a tensor, e.g. "
        "dataset[i]['image']."
    )


def contribution_bars(contributions, labels, bias, logit) -> tuple[list[str], list[float], list, float]:
    """Labels, values, colours (bias bar appended when given) and the logit (default: contributions + bias) of one
    contribution vector ``[k]``, validated; shared by both chart renderers."""
    v = as_numpy(contributions, "contributions")
    if v.ndim != 1 or v.shape[0] < 1:
        raise ShapeError(
            f"contributions must be one vector [k]; got shape {list(v.shape)}. Fix: index the explanation, e.g. "
            "ex.contributions[b, c]."
        )
    v = v.astype(np.float64)
    k = v.shape[0]
    names = list(labels) if labels is not None else [f"p{i}" for i in range(k)]
    if len(names) != k:
        raise ShapeError(f"labels must hold k={k} labels; got {len(names)}.")
    values = [float(x) for x in v]
    colours = [POSITIVE_COLOUR if x >= 0 else NEGATIVE_COLOUR for x in values]
    if logit is None:
        logit = sum(values) + (float(bias) if bias is not None else 0.0)
    if bias is not None:
        names.append("bias")
        values.append(float(bias))
        colours.append(BIAS_COLOUR)
    return names, values, colours, logit


def image_hwc(image: Any, name: str = "image") -> np.ndarray:
    """A tensor ``[3, S, S]`` (channels first) or an array ``[S, S, 3]`` / ``[3, S, S]``, in [0, 1] (or uint8)
    -> new float32 ``[S, S, 3]`` clipped to [0, 1]."""
    channels_first = isinstance(image, torch.Tensor)
    a = as_numpy(image, name)
    if a.ndim == 3 and not channels_first and a.shape[-1] not in (1, 3) and a.shape[0] in (1, 3):
        channels_first = True  # a [3, S, S] array
    if a.ndim == 3 and channels_first:
        a = np.moveaxis(a, 0, -1)
    if a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise ShapeError(
            f"{name} must be an RGB image [3, S, S] (channels first) with values in [0, 1]; got shape "
            f"{list(a.shape)}. Fix: pass dataset[i]['image'] (not normalised)."
        )
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    a = np.asarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise InputValueError(f"{name} contains NaN or inf; expected pixel values in [0, 1].")
    return np.clip(a, 0.0, 1.0)


def check_map(heatmap: Any, name: str = "heatmap") -> torch.Tensor:
    if isinstance(heatmap, np.ndarray):
        heatmap = torch.from_numpy(np.asarray(heatmap, dtype=np.float32))
    if not isinstance(heatmap, torch.Tensor) or heatmap.ndim != 2:
        got = list(heatmap.shape) if isinstance(heatmap, (torch.Tensor, np.ndarray)) else type(heatmap).__name__
        raise ShapeError(
            f"{name} must be one map [h, w]; got {got}. Fix: index the explanation, e.g. "
            "ex.oriented_heatmaps[b, c, i]."
        )
    t = heatmap.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise InputValueError(f"{name} contains NaN or inf; expected finite values. Check the prototypes and features.")
    return t


def upsample_map(heatmap: Any, size: int | tuple[int, int], *, mode: str = "bilinear") -> np.ndarray:
    """Upsample one map ``[h, w]`` to ``size`` (S or (H, W)); returns a new float32 array ``[H, W]``.

    ``mode``: ``"bilinear"`` or ``"bicubic"`` (``align_corners=False``, as :func:`phpn_core.evaluation.protoeval.peak_locations`)
    or ``"nearest"`` (shows the feature-map cells).
    """
    t = check_map(heatmap)
    H, W = (size, size) if isinstance(size, int) else tuple(size)
    if mode not in ("bilinear", "bicubic", "nearest"):
        raise InputValueError(f"mode must be 'bilinear', 'bicubic' or 'nearest'; got {mode!r}.")
    if tuple(t.shape) == (H, W):
        return t.numpy().copy()
    kw = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(t[None, None], size=(H, W), mode=mode, **kw)[0, 0].numpy()


def colormap(name: str):
    import matplotlib

    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise InputValueError(
            f"unknown colour map {name!r}: expected a matplotlib colormap name such as 'jet', 'inferno', 'viridis'."
        ) from None


def heatmap_overlay(
    image: Any,
    heatmap: Any,
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
    vmin: float | None = 0.0,
    vmax: float | None = None,
    upsample: str = "bilinear",
) -> np.ndarray:
    """Blend a colour-mapped heatmap over an image.

    Args:
        image: ``[3, S, S]`` RGB in [0, 1] (not normalised).
        heatmap: ``[h, w]``, typically an oriented map; upsampled to ``S x S`` (see :func:`upsample_map`).
        alpha: weight of the colour map in the blend, in [0, 1].
        cmap: matplotlib colour map.
        vmin, vmax: the colour scale; values are clipped to it. ``vmin=None`` uses the map's minimum, ``vmax=None``
            its maximum. An empty scale (``vmax <= vmin``) shows the coldest colour everywhere.
        upsample: ``"bilinear"``, ``"bicubic"`` or ``"nearest"``.

    Returns:
        new float32 array ``[S, S, 3]`` in [0, 1]: ``(1 - alpha) * image + alpha * cmap(scaled map)``.
    """
    img = image_hwc(image)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise InputValueError(f"alpha must be a float in [0, 1]; got {alpha!r}. Fix: e.g. alpha=0.5.")
    up = upsample_map(heatmap, img.shape[:2], mode=upsample)
    lo = float(up.min()) if vmin is None else float(vmin)
    hi = float(up.max()) if vmax is None else float(vmax)
    scaled = np.clip((up - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(up)
    rgb = colormap(cmap)(scaled)[..., :3].astype(np.float32)
    return ((1.0 - alpha) * img + alpha * rgb).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------- figures


def new_figure(width_px: float, height_px: float, *, dpi: int = 100):
    """A pyplot-free :class:`~matplotlib.figure.Figure` of ``width_px x height_px`` pixels on the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(width_px, 16) / dpi, max(height_px, 16) / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def figure_to_png(fig, *, dpi: int | None = None) -> bytes:
    """Render a figure to PNG bytes (at the figure's own dpi unless ``dpi`` is given); the figure is unchanged."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if getattr(fig, "canvas", None) is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi if dpi is not None else fig.dpi, facecolor="white")
    return buf.getvalue()


def array_to_png(array: Any) -> bytes:
    """An RGB image (``[S, S, 3]`` array in [0, 1] or uint8, or a ``[3, S, S]`` tensor) -> PNG bytes (PIL)."""
    from PIL import Image

    a = image_hwc(array, "array")
    buf = io.BytesIO()
    Image.fromarray(np.round(a * 255.0).astype(np.uint8), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def png_size(png: bytes) -> tuple[int, int]:
    """``(width, height)`` in pixels of PNG bytes."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return im.size


def plot_heatmap_overlay(
    image: Any,
    heatmap: Any,
    *,
    title: str | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    vmin: float | None = 0.0,
    vmax: float | None = None,
    upsample: str = "bilinear",
    colorbar: bool = True,
    scale: float = 2.0,
    dpi: int = 100,
):
    """One heatmap over one image, with a colour bar. ``image [3, S, S]``, ``heatmap [h, w]``; see
    :func:`heatmap_overlay` for the colour scale. The image is drawn at ``scale`` screen pixels per image pixel.
    Returns a Figure."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    blended = heatmap_overlay(image, heatmap, alpha=alpha, cmap=cmap, vmin=vmin, vmax=vmax, upsample=upsample)
    S_h, S_w = blended.shape[:2]
    w_px = S_w * scale + (90 if colorbar else 20)
    h_px = S_h * scale + (40 if title else 20)
    fig = new_figure(w_px, h_px, dpi=dpi)
    left = 10 / w_px
    ax = fig.add_axes((left, 10 / h_px, S_w * scale / w_px, S_h * scale / h_px))
    ax.imshow(blended, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    if colorbar:
        t = check_map(heatmap)
        lo = float(t.min()) if vmin is None else float(vmin)
        hi = float(t.max()) if vmax is None else float(vmax)
        cax = fig.add_axes((left + S_w * scale / w_px + 8 / w_px, 10 / h_px, 12 / w_px, S_h * scale / h_px))
        fig.colorbar(ScalarMappable(norm=Normalize(lo, hi if hi > lo else lo + 1.0), cmap=colormap(cmap)), cax=cax)
        cax.tick_params(labelsize=7)
    return fig


def plot_contributions(
    contributions: Any,
    *,
    bias: float | None = None,
    logit: float | None = None,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    ax: Any = None,
    width_px: int = 360,
    height_px: int = 240,
    dpi: int = 100,
):
    """Bar chart of one image's prototype contributions to one class.

    Args:
        contributions: ``[k]`` signed contributions (``ex.contributions[b, c]``).
        bias: the class bias, drawn as a grey bar after the prototypes (None: not drawn).
        logit: the class logit, shown in the title (None: ``sum(contributions) + bias``).
        labels: k bar labels (default ``p0 .. p{k-1}``).
        title: prefix of the title (e.g. the class name).
        ax: draw into this Axes (and return its figure) instead of a new figure of ``width_px x height_px``.

    Positive bars are blue, negative bars red; every bar carries its value. Returns a Figure.
    """
    names, values, colours, logit = contribution_bars(contributions, labels, bias, logit)
    if ax is None:
        fig = new_figure(width_px, height_px, dpi=dpi)
        ax = fig.add_subplot(1, 1, 1)
    fig = ax.figure
    xs = np.arange(len(values))
    ax.bar(xs, values, color=colours, width=0.7)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(xs, names, fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    span = max(max(abs(x) for x in values), 1e-12)
    ax.set_ylim(min(0.0, min(values)) - 0.18 * span, max(0.0, max(values)) + 0.18 * span)
    for x, val in zip(xs, values):
        ax.text(x, val + (0.03 * span if val >= 0 else -0.03 * span), f"{val:.2f}", ha="center",
                va="bottom" if val >= 0 else "top", fontsize=7)
    head = f"{title}: " if title else ""
    ax.set_title(f"{head}logit {logit:.2f}", fontsize=9)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig


