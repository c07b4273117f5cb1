"""The explorer's web app: :func:`create_app` (FastAPI) over one registry; ``phpn serve`` runs it with uvicorn.

Pages (HTML, server-rendered)::

    /                                      the entries table (sortable, filterable; pick entries to compare)
    /entries/{entry_id}                    identity, metrics, the class list (filterable), links
    /entries/{entry_id}/class?q=NAME       find a class by name or index (redirects to its page)
    /entries/{entry_id}/classes/{cls}      a class (index or name): prototypes, gallery, heatmaps, contributions
    /compare?ids=A&ids=B[&cls=C]           entries side by side: metrics, and class C's prototypes in each
    /explain  (GET form, POST upload)      explain an uploaded image with an entry (as `phpn explain`)

JSON API (OpenAPI docs at ``/docs``)::

    GET  /api/entries                                   [{entry_id, model, dataset, k, n_classes, metrics, ...}]
    GET  /api/entries/{entry_id}                        the row + the pointer (metadata, shapes, version)
    GET  /api/entries/{entry_id}/classes                [{index, name}]
    GET  /api/entries/{entry_id}/classes/{cls}          prototypes (alpha, sign, norm, gallery ids), test images'
                                                        contributions and predictions
    GET  /api/entries/{entry_id}/classes/{cls}/{kind}.png   kind = heatmaps | gallery | contributions
    GET  /api/compare?ids=A&ids=B[&cls=C]               the rows (and class C of each)
    POST /api/explain  (multipart: entry, image, top)   top classes with contributions (+ the PNG, base64)
    GET  /api/stats                                     cache sizes and hit counts

Safety: read-only (GET, plus POST of an image that is explained in memory and never stored); entry ids are
validated before any I/O (:func:`explorer.data.check_entry_id`), class references resolved against the entry;
uploads are capped in bytes (``max_upload_bytes``) and pixels (``max_pixels``); every failure becomes an error page
(HTML) or ``{"error": ..., "detail": ...}`` (under /api) with a 4xx/5xx status, never a crash. This module imports
neither Prefect nor Ray.
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from explorer import pages
from explorer.data import BadRequest, ExplorerData, NotFound, check_entry_id
from explorer.images import KINDS, render_class_png
from phpn_core.errors import InputValueError, PhpnError, StoreError

__all__ = ["create_app", "DEFAULT_MAX_UPLOAD_BYTES", "DEFAULT_MAX_PIXELS"]

DEFAULT_MAX_UPLOAD_BYTES = 10 * 2**20
DEFAULT_MAX_PIXELS = 25_000_000
_MAX_TOP = 20
_MAX_COMPARE = 8


class _TooLarge(PhpnError):
    """An upload over the size or pixel cap (HTTP 413)."""


def _status(exc: BaseException) -> tuple[int, str]:
    from phpn_core.data.images import ImageLoadError

    if isinstance(exc, _TooLarge):
        return 413, "Upload too large"
    if isinstance(exc, NotFound):
        return 404, "Not found"
    if isinstance(exc, (BadRequest, ImageLoadError, InputValueError)):
        return 400, "Bad request"
    if isinstance(exc, StoreError) and "Unknown entry" in str(exc):
        return 404, "Not found"
    if isinstance(exc, StoreError):
        return 502, "Storage error (missing or corrupt object)"
    if isinstance(exc, PhpnError):
        return 422, "Cannot do that with this entry"
    return 500, "Internal error"


def _mount_api_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI (v5: FastAPI's OpenAPI 3.1) from the files the fastapi-offline package ships.
    FastAPI's default page loads them from a CDN, which an offline cluster or laptop cannot reach."""
    import fastapi_offline
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    static = Path(fastapi_offline.__file__).resolve().parent / "static"
    app.mount("/static/swagger-ui", StaticFiles(directory=static), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    async def _docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title}: API",
                                   swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js",
                                   swagger_css_url="/static/swagger-ui/swagger-ui.css",
                                   swagger_favicon_url="/static/swagger-ui/favicon.png")


def create_app(
    registry_uri: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    images_per_class: int = 4,
    gallery_size: int = 6,
    class_cache: int = 256,
    listing_ttl_s: float = 10.0,
) -> FastAPI:
    """The explorer app over the registry at ``registry_uri`` (a path or ``s3://bucket/prefix``).

    ``storage_options``: s3fs options for the registry and the feature stores (None: from the environment).
    ``max_upload_bytes`` / ``max_pixels``: caps on an uploaded image (413 above them). ``images_per_class``: test
    images on a class page; ``gallery_size``: patches per prototype; ``class_cache``: class views kept in memory;
    ``listing_ttl_s``: how long the entries listing and pointers are reused before being re-read.
    Nothing is read until the first request.
    """
    for name, v in (("max_upload_bytes", max_upload_bytes), ("max_pixels", max_pixels),
                    ("images_per_class", images_per_class), ("gallery_size", gallery_size),
                    ("class_cache", class_cache)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputValueError(f"create_app: {name} must be an int >= 1; got {v!r}. Fix: e.g. {name}=4.")
    data = ExplorerData(registry_uri, storage_options=storage_options, images_per_class=images_per_class,
                        gallery_size=gallery_size, class_cache=class_cache, listing_ttl_s=listing_ttl_s)
    shown_registry = data.registry.uri
    limits = (f"Limits: {max_upload_bytes / 2**20:.0f} MiB per image, {max_pixels / 1e6:.0f} megapixels; "
              "PNG, JPEG, WebP, BMP, GIF (first frame), TIFF.")
    app = FastAPI(title="phpn explorer", version="1", docs_url=None, redoc_url=None, description=(
        f"Browse, compare and query the prototype registry at `{shown_registry}` (read-only). HTML pages at `/`, "
        "JSON under `/api`."))
    app.state.data = data
    _mount_api_docs(app)

    # -- errors ----------------------------------------------------------------------------------------------------

    def _error(request: Request, status: int, title: str, message: str) -> Response:
        if request.url.path.startswith("/api"):
            return JSONResponse({"error": title, "detail": message, "status": status}, status_code=status)
        return HTMLResponse(pages.error_page(status, title, message, registry=shown_registry), status_code=status)

    @app.exception_handler(PhpnError)
    async def _phpn_error(request: Request, exc: PhpnError) -> Response:
        status, title = _status(exc)
        return _error(request, status, title, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        title = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "Error")
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"No page at {request.url.path!r}. Start from / (entries) or /docs (the API)."
        return _error(request, exc.status_code, title, detail)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
        return _error(request, 400, "Bad request", "; ".join(parts) or "invalid request")

    @app.exception_handler(Exception)
    async def _any_error(request: Request, exc: Exception) -> Response:
        return _error(request, 500, "Internal error",
                      f"{type(exc).__name__}: {str(exc)[:500]}. The explorer is still running; this page or object "
                      "could not be produced.")

    # -- shared ------------------------------------------------------------------------------------------------------

    def row_of(entry_id: str):
        check_entry_id(entry_id)
        info = data.info(entry_id)
        return data.row(info), info

    def figure_url(entry_id: str, c: int, kind: str, version: str) -> str:
        return f"/api/entries/{pages.q(entry_id)}/classes/{c}/{kind}.png?v={version[:8]}"

    def class_png(entry_id: str, c: int, kind: str) -> bytes | None:
        info = data.info(entry_id)

        def make() -> bytes | None:
            return render_class_png(data.class_view(entry_id, c), kind, data.class_names(entry_id))

        return data.pngs.get_or_make((entry_id, info.version, c, kind), make)

    def figures_of(entry_id: str, c: int, view) -> dict[str, str | None]:
        info = data.info(entry_id)
        out: dict[str, str | None] = {}
        for kind in KINDS:
            has = {"heatmaps": bool(view.test_ids), "contributions": bool(view.test_ids),
                   "gallery": bool(view.gallery) and any(view.gallery)
                   and all(p is not None for row in view.gallery for _, _, p in row)}[kind]
            out[kind] = figure_url(entry_id, c, kind, info.version) if has else None
        return out

    def parse_ids(ids: list[str] | None) -> list[str]:
        ids = [i for i in (ids or []) if i]
        ids = list(dict.fromkeys(ids))
        if len(ids) > _MAX_COMPARE:
            raise BadRequest(f"Too many entries to compare: got {len(ids)}, expected at most {_MAX_COMPARE}.")
        return [check_entry_id(i) for i in ids]

    def compare_data(ids: list[str], cls: str | None):
        rows = [row_of(i)[0] for i in ids]
        per_entry = []
        if cls:
            for r in rows:
                try:
                    c = data.resolve_class(r.entry_id, cls)
                    view = data.class_view(r.entry_id, c)
                    per_entry.append((r, view, figures_of(r.entry_id, c, view), None))
                except PhpnError as e:
                    per_entry.append((r, None, None, str(e)))
        return rows, per_entry

    # -- pages -------------------------------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home() -> HTMLResponse:
        return HTMLResponse(pages.entries_page(data.entries(), registry=shown_registry))

    @app.get("/entries/{entry_id}", response_class=HTMLResponse, include_in_schema=False)
    def entry_html(entry_id: str) -> HTMLResponse:
        row, info = row_of(entry_id)
        return HTMLResponse(pages.entry_page(row, info, data.class_names(entry_id)))

    @app.get("/entries/{entry_id}/class", include_in_schema=False)
    def find_class(entry_id: str, q: str = Query("", max_length=300)) -> RedirectResponse:
        check_entry_id(entry_id)
        c = data.resolve_class(entry_id, q)
        return RedirectResponse(f"/entries/{pages.q(entry_id)}/classes/{c}", status_code=303)

    @app.get("/entries/{entry_id}/classes/{cls}", response_class=HTMLResponse, include_in_schema=False)
    def class_html(entry_id: str, cls: str) -> HTMLResponse:
        check_entry_id(entry_id)
        c = data.resolve_class(entry_id, cls)
        view = data.class_view(entry_id, c)
        info = data.info(entry_id)
        return HTMLResponse(pages.class_page(view, info, data.class_names(entry_id),
                                             figures=figures_of(entry_id, c, view)))

    @app.get("/compare", response_class=HTMLResponse, include_in_schema=False)
    def compare_html(ids: list[str] | None = Query(None), cls: str | None = Query(None, max_length=300)) -> HTMLResponse:
        chosen = parse_ids(ids)
        rows, per_entry = compare_data(chosen, cls) if len(chosen) >= 2 else ([row_of(i)[0] for i in chosen], [])
        return HTMLResponse(pages.compare_page(rows, data.entries(), cls=cls, per_entry=per_entry))

    @app.get("/explain", response_class=HTMLResponse, include_in_schema=False)
    def explain_form(entry: str | None = Query(None, max_length=200)) -> HTMLResponse:
        return HTMLResponse(pages.explain_page(data.entries(), entry=entry, limits=limits))

    @app.post("/explain", response_class=HTMLResponse, include_in_schema=False)
    async def explain_html(request: Request, entry: str = Form(..., max_length=200), top: str = Form("3"),
                           image: UploadFile = File(...)) -> HTMLResponse:
        try:
            result = await _explain(request, entry, top, image)
        except PhpnError as e:
            status, title = _status(e)
            return HTMLResponse(pages.explain_page(data.entries(), entry=entry, limits=limits,
                                                   error=f"{title}: {e}"), status_code=status)
        return HTMLResponse(pages.explain_page(data.entries(), entry=entry, limits=limits, result=result))

    # -- the API -----------------------------------------------------------------------------------------------------

    @app.get("/api/entries", tags=["entries"], summary="Every published entry with its metrics")
    def api_entries(refresh: bool = False) -> list[dict[str, Any]]:
        return [r.to_json() for r in data.entries(refresh=refresh)]

    @app.get("/api/entries/{entry_id}", tags=["entries"], summary="One entry: its row and its pointer")
    def api_entry(entry_id: str) -> dict[str, Any]:
        row, info = row_of(entry_id)
        return {**row.to_json(), "info": info.model_dump(mode="json")}

    @app.get("/api/entries/{entry_id}/classes", tags=["classes"], summary="The entry's classes")
    def api_classes(entry_id: str) -> list[dict[str, Any]]:
        check_entry_id(entry_id)
        return [{"index": c, "name": n} for c, n in enumerate(data.class_names(entry_id))]

    @app.get("/api/entries/{entry_id}/classes/{cls}", tags=["classes"],
             summary="A class (index or name): prototypes, galleries, test contributions")
    def api_class(entry_id: str, cls: str) -> dict[str, Any]:
        check_entry_id(entry_id)
        c = data.resolve_class(entry_id, cls)
        view = data.class_view(entry_id, c)
        out = view.to_json(data.class_names(entry_id))
        out["figures"] = figures_of(entry_id, c, view)
        return out

    @app.get("/api/entries/{entry_id}/classes/{cls}/{kind}.png", tags=["classes"],
             summary="A class figure as PNG (heatmaps, gallery, contributions)",
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def api_class_png(entry_id: str, cls: str, kind: str) -> Response:
        check_entry_id(entry_id)
        if kind not in KINDS:
            raise NotFound(f"Unknown figure {kind!r}: expected one of {', '.join(KINDS)}.")
        c = data.resolve_class(entry_id, cls)
        png = class_png(entry_id, c, kind)
        if png is None:
            raise NotFound(f"Class {c} of entry {entry_id!r} has no {kind} figure: "
                           + ("; ".join(data.class_view(entry_id, c).notes) or "nothing to draw") + ".")
        return Response(png, media_type="image/png", headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/api/compare", tags=["entries"], summary="Entries side by side (and one class of each)")
    def api_compare(ids: list[str] = Query(...), cls: str | None = Query(None, max_length=300)) -> dict[str, Any]:
        chosen = parse_ids(ids)
        rows, per_entry = compare_data(chosen, cls)
        out: dict[str, Any] = {"entries": [r.to_json() for r in rows]}
        if cls:
            out["class"] = [
                {"entry_id": r.entry_id, "error": err} if err else
                {"entry_id": r.entry_id, "kind": r.kind, **v.to_json(data.class_names(r.entry_id)),
                 "gallery_png": figs["gallery"], "heatmaps_png": figs["heatmaps"]}
                for r, v, figs, err in per_entry]
        return out

    @app.post("/api/explain", tags=["explain"], summary="Explain an uploaded image with an entry")
    async def api_explain(request: Request, entry: str = Form(..., max_length=200), top: str = Form("3"),
                          image: UploadFile = File(...),
                          png: str = Form("true", description="'false' leaves the PNG out")) -> dict[str, Any]:
        result = await _explain(request, entry, top, image)
        if png.strip().lower() in ("false", "0", "no", "off"):
            result.pop("png_data_uri", None)
        return result

    @app.get("/api/stats", tags=["service"], summary="Cache sizes and hits")
    def api_stats() -> dict[str, Any]:
        import sys

        return {"registry": shown_registry,
                "process": {"pid": os.getpid(), "modules": {m: m in sys.modules for m in ("prefect", "ray")}},
                "class_views": {"size": len(data.classes), "hits": data.classes.hits, "misses": data.classes.misses},
                "pngs": {"size": len(data.pngs), "hits": data.pngs.hits, "misses": data.pngs.misses}}

    # -- explain -----------------------------------------------------------------------------------------------------

    async def _explain(request: Request, entry: str, top: str, image: UploadFile) -> dict[str, Any]:
        from starlette.concurrency import run_in_threadpool

        check_entry_id(entry)
        try:
            top_n = int(str(top).strip())
        except ValueError:
            raise BadRequest(f"top must be an integer between 1 and {_MAX_TOP}; got {str(top)[:20]!r}.") from None
        if not 1 <= top_n <= _MAX_TOP:
            raise BadRequest(f"top must be an integer between 1 and {_MAX_TOP}; got {top_n}.")
        blob = await image.read(max_upload_bytes + 1)
        if len(blob) > max_upload_bytes:
            raise _TooLarge(f"The uploaded file is larger than {max_upload_bytes} bytes: expected at most "
                            f"{max_upload_bytes / 2**20:.1f} MiB. Fix: upload a smaller image (it is resized to the "
                            "run's image size anyway).")
        if not blob:
            raise BadRequest("The uploaded file is empty: expected an image (PNG, JPEG, ...).")
        name = Path(image.filename or "upload").name[:120] or "upload"
        return await run_in_threadpool(_explain_bytes, entry, blob, name, top_n)

    def _explain_bytes(entry: str, blob: bytes, filename: str, top_n: int) -> dict[str, Any]:
        from PIL import Image, UnidentifiedImageError

        from phpn_core.data.images import load_image, open_rgb
        from phpn_core.report.explain import explain_image, render_image_explanation

        t0 = time.perf_counter()
        info = data.info(entry)  # unknown entry: 404 before any decoding
        try:
            with Image.open(io.BytesIO(blob)) as im:  # header only: the pixel cap before decoding
                w, h = im.size
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise BadRequest(f"The uploaded file {filename!r} is not an image PIL can read ({type(e).__name__}): "
                             "expected PNG, JPEG, WebP, BMP, GIF or TIFF.") from None
        if w * h > max_pixels:
            raise _TooLarge(f"The uploaded image {filename!r} is {w}x{h} = {w * h} pixels: expected at most "
                            f"{max_pixels}. Fix: downscale it first.")
        with tempfile.TemporaryDirectory(prefix="phpn-explorer-") as tmp:
            path = Path(tmp) / ("upload" + (Path(filename).suffix[:8] if Path(filename).suffix else ""))
            path.write_bytes(blob)
            open_rgb(path, max_pixels=max_pixels)  # the same checks as `phpn explain` (truncated, corrupt, huge)
            loaded = data.entry_model(entry)
            x, (w0, h0) = load_image(path, image_size=loaded.image_size, max_pixels=max_pixels)
        expl = explain_image(x, features=loaded.features, head=loaded.head, mean=loaded.mean, std=loaded.std,
                             top=min(top_n, info.n_classes), class_names=loaded.class_names,
                             normalization=loaded.normalization)
        title = (f"{filename} ({w0}x{h0} -> {loaded.image_size}x{loaded.image_size}), entry {entry}, "
                 f"model {info.model}")
        png = render_image_explanation(expl, title=title)
        return {
            "entry_id": entry, "filename": filename, "width": w0, "height": h0, "image_size": loaded.image_size,
            "normalization": expl.normalization,
            "top": [{"rank": t + 1, "class": c, "name": expl.class_names[t], "logit": float(expl.logits[t]),
                     "probability": float(expl.probabilities[t]), "bias": float(expl.bias[t]),
                     "contributions": [float(v) for v in expl.contributions[t]],
                     "signs": [int(s) for s in expl.signs[t]]}
                    for t, c in enumerate(expl.classes)],
            "seconds": time.perf_counter() - t0,
            "png_data_uri": "data:image/png;base64," + base64.b64encode(png).decode("ascii"),
        }

    return app
