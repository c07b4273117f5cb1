"""Showing a decomposition to people (captum's split: the algorithms live elsewhere, drawing lives here).

- :mod:`~phpn_core.report.figures`: heatmap overlays, contribution bars, prototype galleries, PNG helpers (a facade
  over :mod:`~phpn_core.report.plots`, matplotlib and conversions, and :mod:`~phpn_core.report.mosaics`, PIL grids);
- :mod:`~phpn_core.report.html`: the self-contained HTML report of a run, over
  :mod:`~phpn_core.report.page_common` (shared with the class pages) and :mod:`~phpn_core.report.gallery`;
- :mod:`~phpn_core.report.class_pages`: a paged, searchable class index and one bounded page per class;
- :mod:`~phpn_core.report.explain`: one image explained by a registry entry (``phpn explain``).

May import everything else in phpn_core; nothing in phpn_core imports report except report itself.
"""
