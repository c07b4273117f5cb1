"""Plot primitives for part-prototype explanations (visualization only; the algorithm is in :mod:`phpn_core.method.head`).

Every function takes tensors (or arrays) with documented shapes and returns a new array, a matplotlib
:class:`~matplotlib.figure.Figure` or PNG bytes; inputs are never modified. Image grids (many cells) are composed
with PIL and returned as PNG bytes: ~20x faster than one matplotlib Axes per cell (measured on a report's grids). Figures are built with
:class:`matplotlib.figure.Figure` on the Agg canvas, never through ``pyplot``: no global state, no GUI backend,
safe in worker processes and threads, and nothing to close.

Heatmaps are meant to be the *oriented* maps (:attr:`phpn_core.method.head.Explanation.oriented_heatmaps`), which peak
where a prototype's part is whatever the sign of its contribution. The colour scale starts at ``vmin`` (default 0:
an oriented map's negative values, where the part is not, show as the coldest colour) and ends at ``vmax``
(default: the map's maximum, or a maximum shared by a column/grid, see :func:`render_heatmap_grid`).

Primitives:

- :func:`upsample_map` ``[h, w] -> [S, S]`` (bilinear, ``align_corners=False``, as the evaluation locates peaks),
- :func:`heatmap_overlay` image ``[3, S, S]`` + map ``[h, w]`` -> RGB array ``[S, S, 3]`` (colour scale, alpha blend),
- :func:`plot_heatmap_overlay` (one map over one image, with a colour bar; a Figure),
- :func:`render_heatmap_grid` (rows = images, columns = prototypes; PNG bytes),
- :func:`plot_contributions` (k signed bars ``p0 .. p{k-1}`` plus the bias; a Figure, or drawn into an Axes),
  and its fast PIL twins :func:`bar_panel` (an array) and :func:`render_contributions` (n panels; PNG bytes),
- :func:`render_gallery` (rows = prototypes, columns = their most activating training patches; PNG bytes),
- :func:`figure_to_png`, :func:`array_to_png`, :func:`png_size`.

This module gathers them; they live in :mod:`~phpn_core.report.plots` (matplotlib, conversions) and
:mod:`~phpn_core.report.mosaics` (PIL grids).
"""

from phpn_core.report.mosaics import (
    bar_panel,
    grid_shape,
    render_contributions,
    render_gallery,
    render_heatmap_grid,
)
from phpn_core.report.plots import (
    BIAS_COLOUR,
    NEGATIVE_COLOUR,
    POSITIVE_COLOUR,
    array_to_png,
    figure_to_png,
    heatmap_overlay,
    new_figure,
    plot_contributions,
    plot_heatmap_overlay,
    png_size,
    upsample_map,
)

__all__ = [
    "upsample_map",
    "heatmap_overlay",
    "plot_heatmap_overlay",
    "render_heatmap_grid",
    "plot_contributions",
    "bar_panel",
    "render_contributions",
    "render_gallery",
    "figure_to_png",
    "array_to_png",
    "png_size",
    "new_figure",
    "grid_shape",
    "POSITIVE_COLOUR",
    "NEGATIVE_COLOUR",
    "BIAS_COLOUR",
]
