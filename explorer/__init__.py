"""The prototype explorer (``phpn serve``): a read-only web app over a prototype registry and the feature stores
its entries point to. Browse entries, compare them, open class pages (prototypes, galleries, heatmaps,
contributions), explain an uploaded image; everything also as JSON under ``/api``.

Never imports Prefect or Ray. :func:`explorer.app.create_app` builds the FastAPI app.
"""

from __future__ import annotations

__all__ = ["create_app"]


def create_app(*args, **kwargs):
    """See :func:`explorer.app.create_app` (imported lazily: ``import explorer`` stays cheap)."""
    from explorer.app import create_app as _create

    return _create(*args, **kwargs)
