"""Report pages that scale with the number of classes: a paged, searchable index and one page per class.

:func:`build_class_pages` writes, under ``out_dir/classes/``::

    index.html, index-2.html, ...     the index, ``page_size`` classes per page (prev / next links): per class its
                                      index, name (a link to its page), number of test images shown and the
                                      per-class metrics given (e.g. NMF relative error, head error, ProtoEval
                                      consistency / stability), plus a search box that filters by name
    search.js                         ``[[index, name], ...]`` of every class, read by the search box (a script, so
                                      the search works from ``file://``); the only file that grows with C (names only)
    c<index>.html                     one page per class: its metrics, then the report's class section (where:
                                      heatmaps on ``images_per_class`` test images, what: ``gallery_size`` training
                                      patches per prototype, why: contributions), rendered by
                                      :mod:`phpn_core.report.html`'s helpers; PNGs embedded, and also written to
                                      ``classes/png/``

Every page has a size bounded independently of C: an index page holds at most ``page_size`` rows, a class page
``k`` prototypes x (``images_per_class`` + ``gallery_size``) cells. No page carries a timestamp, so the same
inputs give the same bytes whatever ``workers`` is.

Cost: the chosen test images go through ``features`` in batches across classes (``batch_classes`` classes per
forward pass, so memory stays bounded); each class's galleries, PNGs and page are then rendered and written in a
thread pool (PIL, zlib and torch release the GIL), while the next batch's forward pass runs.
When ``out_dir/report.html`` exists, it gets a link to ``classes/index.html`` (once).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phpn_core.errors import InputValueError, ShapeError
from phpn_core.method.head import PartPrototypeHead
from phpn_core.report.html import class_html
from phpn_core.report.page_common import (
    CSS,
    check_head_and_features,
    check_pos_int,
    class_names_of,
    esc,
    explain_classes,
    format_value,
    select_test_images,
    torch_device,
)

__all__ = ["CLASSES_DIR", "build_class_pages", "class_page_name", "index_page_name"]

CLASSES_DIR = "classes"
_LINK_MARKER = "<!-- phpn:class-pages -->"

_INDEX_CSS = """
#search { font-size: 1em; padding: 0.3em 0.5em; width: 22em; }
#search-results { columns: 3; list-style: none; padding-left: 0; }
nav.pager a, nav.pager span { margin-right: 1em; }
"""

# Filters the rows of this page by name and lists matching classes of every page (from search.js).
_SEARCH_SCRIPT = """
function phpnSearch(q) {
  q = q.trim().toLowerCase();
  var rows = document.querySelectorAll("#class-table tbody tr");
  for (var i = 0; i < rows.length; i++) {
    rows[i].style.display = (!q || rows[i].getAttribute("data-name").indexOf(q) >= 0) ? "" : "none";
  }
  var out = document.getElementById("search-results"), html = "", n = 0, all = window.PHPN_CLASSES || [];
  if (q) {
    for (var j = 0; j < all.length; j++) {
      if (String(all[j][1]).toLowerCase().indexOf(q) >= 0) {
        if (n < 100) {
          var a = document.createElement("a");
          a.href = "c" + all[j][0] + ".html"; a.textContent = all[j][0] + ": " + all[j][1];
          html += "<li>" + a.outerHTML + "</li>";
        }
        n++;
      }
    }
    html = "<li><strong>" + n + " match" + (n === 1 ? "" : "es") + (n > 100 ? " (first 100 shown)" : "") +
           "</strong></li>" + html;
  }
  out.innerHTML = html;
}
"""


def class_page_name(c: int) -> str:
    """The file name of class ``c``'s page inside ``classes/``."""
    return f"c{int(c)}.html"


def index_page_name(page: int) -> str:
    """The file name of index page ``page`` (1-based) inside ``classes/``."""
    return "index.html" if page == 1 else f"index-{int(page)}.html"


def _metric_columns(per_class_metrics: Mapping[str, Any] | None, C: int) -> dict[str, dict[int, Any]]:
    """``{column: {class: value}}`` from ``{column: sequence of C values | {class: value}}``."""
    if per_class_metrics is None:
        return {}
    if not isinstance(per_class_metrics, Mapping):
        raise InputValueError(
            f"per_class_metrics must be a mapping {{name: C values or {{class: value}}}}; got "
            f"{type(per_class_metrics).__name__}. Fix: pass e.g. {{'nmf_rel_error': arrays['rel_error'].tolist()}}."
        )
    out: dict[str, dict[int, Any]] = {}
    for name, values in per_class_metrics.items():
        if isinstance(values, Mapping):
            out[str(name)] = {int(c): v for c, v in values.items()}
            continue
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().tolist()
        elif isinstance(values, np.ndarray):
            values = values.tolist()
        if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
            raise InputValueError(
                f"per_class_metrics[{name!r}] must be a sequence of C={C} values or a {{class: value}} mapping; "
                f"got {type(values).__name__}. Fix: pass one value per head class."
            )
        if len(values) != C:
            raise ShapeError(
                f"per_class_metrics[{name!r}] holds {len(values)} values; expected C={C} (one per head class). "
                "Fix: pass the full per-class array, or a {class: value} mapping for a subset."
            )
        out[str(name)] = {c: v for c, v in enumerate(values)}
    return out


def _head(title: str, extra_css: str = "", script: str = "") -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{esc(title)}</title>\n<style>{CSS}{extra_css}</style>\n{script}</head>\n"
    )


def _write(path: Path, text: str) -> int:
    data = text.encode("utf-8")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return len(data)


def _index_pages(classes: list[int], names: list[str], columns: dict[str, dict[int, Any]], n_shown: dict[int, int],
                 page_size: int, title: str, out: Path) -> list[Path]:
    n_pages = max(1, math.ceil(len(classes) / page_size))
    head_cells = "".join(f"<th scope=\"col\">{esc(c)}</th>" for c in ["class", "name", "test images", *columns])
    paths = []
    for p in range(1, n_pages + 1):
        chunk = classes[(p - 1) * page_size : p * page_size]
        rows = []
        for c in chunk:
            tds = "".join(f"<td class=\"num\">{esc(format_value(col.get(c)))}</td>" for col in columns.values())
            rows.append(
                f"<tr data-name=\"{esc(names[c].lower())}\"><td class=\"num\">{c}</td>"
                f"<td><a href=\"{class_page_name(c)}\">{esc(names[c])}</a></td>"
                f"<td class=\"num\">{n_shown.get(c, 0)}</td>{tds}</tr>"
            )
        prev = (f"<a rel=\"prev\" href=\"{index_page_name(p - 1)}\">&larr; previous</a>" if p > 1
                else "<span>&larr; previous</span>")
        nxt = (f"<a rel=\"next\" href=\"{index_page_name(p + 1)}\">next &rarr;</a>" if p < n_pages
               else "<span>next &rarr;</span>")
        first, last = (p - 1) * page_size + 1, (p - 1) * page_size + len(chunk)
        pager = (f"<nav class=\"pager\" aria-label=\"index pages\">{prev}<span>page {p} of {n_pages} "
                 f"(classes {first}-{last} of {len(classes)})</span>{nxt}</nav>")
        body = (
            f"<body>\n<h1>{esc(title)}: classes</h1>\n"
            f"<p class=\"note\">{len(classes)} classes, {page_size} per page; each name links to the class's page. "
            "<a href=\"../report.html\">Back to the report</a>.</p>\n"
            "<p><label for=\"search\">Search by class name: </label>"
            "<input id=\"search\" type=\"search\" placeholder=\"class name\" oninput=\"phpnSearch(this.value)\" "
            "autocomplete=\"off\"></p>\n<ul id=\"search-results\" aria-live=\"polite\"></ul>\n"
            f"{pager}\n<table id=\"class-table\"><thead><tr>{head_cells}</tr></thead><tbody>\n"
            + "\n".join(rows)
            + f"\n</tbody></table>\n{pager}\n</body>\n</html>\n"
        )
        script = f"<script src=\"search.js\"></script>\n<script>{_SEARCH_SCRIPT}</script>\n"
        path = out / index_page_name(p)
        _write(path, _head(f"{title}: classes (page {p} of {n_pages})", _INDEX_CSS, script) + body)
        paths.append(path)
    return paths


def _class_page(c: int, *, position: int, classes: list[int], page_size: int, names: list[str],
                columns: dict[str, dict[int, Any]], data: dict[str, Any] | None, head: PartPrototypeHead,
                signs: torch.Tensor, proto_labels: list[str], train_store: Any, train_dataset: Any,
                gallery_size: int, patch_size: int | None, png_dir: Path, viz: Any, alpha: float, cmap: str,
                title: str, out: Path) -> int:
    """Render and write class ``c``'s page; returns its size in bytes."""
    section = class_html(c, names, data, head, signs, proto_labels, train_store, train_dataset, gallery_size,
                          patch_size, png_dir, viz, alpha=alpha, cmap=cmap)
    links = [f"<a href=\"{index_page_name(position // page_size + 1)}\">index</a>"]
    if position > 0:
        p = classes[position - 1]
        links.append(f"<a rel=\"prev\" href=\"{class_page_name(p)}\">&larr; {esc(names[p])}</a>")
    if position + 1 < len(classes):
        n = classes[position + 1]
        links.append(f"<a rel=\"next\" href=\"{class_page_name(n)}\">{esc(names[n])} &rarr;</a>")
    metrics = "".join(
        f"<tr><th scope=\"row\"><code>{esc(name)}</code></th><td class=\"num\">{esc(format_value(col.get(c)))}"
        "</td></tr>" for name, col in columns.items()
    )
    table = (f"<table class=\"metrics\"><caption class=\"note\">Class metrics</caption><tbody>{metrics}</tbody>"
             "</table>") if metrics else ""
    page = (
        _head(f"{title}: class {c} ({names[c]})")
        + f"<body>\n<nav class=\"pager\" aria-label=\"classes\">{''.join(links)}</nav>\n{table}\n{section}\n"
        "</body>\n</html>\n"
    )
    return _write(out / class_page_name(c), page)


def _link_report(out_dir: Path, n_classes: int) -> bool:
    """Add a link to ``classes/index.html`` to ``out_dir/report.html`` (once); returns whether the report exists."""
    report = out_dir / "report.html"
    if not report.is_file():
        return False
    text = report.read_text(encoding="utf-8")
    if _LINK_MARKER in text:
        return True
    link = (f"{_LINK_MARKER}<p class=\"note\"><a href=\"{CLASSES_DIR}/index.html\">All {n_classes} classes</a>: "
            "an index searchable by name, with per-class metrics, and one page per class.</p>")
    anchor = "<h2 id=\"classes\">Classes</h2>"
    text = text.replace(anchor, anchor + link, 1) if anchor in text else text.replace("</h1>", "</h1>" + link, 1)
    _write(report, text)
    return True


def build_class_pages(
    *,
    out_dir: str | Path,
    head: PartPrototypeHead,
    features: torch.nn.Module,
    test_dataset: Any,
    train_dataset: Any,
    train_store: Any,
    class_names: Sequence[str] | None = None,
    per_class_metrics: Mapping[str, Any] | None = None,
    classes: Sequence[int] | None = None,
    images_per_class: int = 2,
    gallery_size: int = 4,
    workers: int | None = None,
    device: str | torch.device = "cpu",
    page_size: int = 200,
    batch_classes: int = 64,
    patch_size: int | None = None,
    title: str = "phpn",
    alpha: float = 0.5,
    cmap: str = "jet",
) -> Path:
    """Write the class index and one page per class under ``out_dir/classes/``; returns ``classes/index.html``.

    Args:
        out_dir: the run's report directory (``classes/`` inside it is replaced).
        head: the decomposed head, prototypes ``[C, k, D]`` (not modified).
        features: x ``[B, 3, S, S]`` normalised -> ``[B, D, h, w]``, in eval mode (not modified).
        test_dataset, train_dataset, train_store: as for :func:`phpn_core.report.html.build_report`.
        class_names: C names (default: ``test_dataset.classes``, else ``"class c"``).
        per_class_metrics: ``{column: C values, or {class: value}}`` shown in the index and on each page (e.g.
            ``nmf_rel_error``, ``head_error``, ``consistency``, ``stability``); missing values show as ``n/a``.
        classes: the classes to write (default: all C), in index order.
        images_per_class: test images per class page; gallery_size: training patches per prototype.
        workers: threads rendering and writing pages (default: ``min(8, os.cpu_count())``; 1 = serial). The
            bytes written do not depend on it.
        device: where ``features`` runs; page_size: rows per index page; batch_classes: classes per forward pass.
        patch_size, alpha, cmap: as for ``build_report``; title: shown on every page.
    """
    from phpn_core.report import figures as viz

    check_head_and_features(head, features)
    images_per_class = check_pos_int("images_per_class", images_per_class, "e.g. images_per_class=2.")
    gallery_size = check_pos_int("gallery_size", gallery_size, "e.g. gallery_size=4.")
    page_size = check_pos_int("page_size", page_size, "e.g. page_size=200.")
    batch_classes = check_pos_int("batch_classes", batch_classes, "e.g. batch_classes=64.")
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    workers = check_pos_int("workers", workers, "e.g. workers=4, or 1 to write serially.")
    if patch_size is not None:
        patch_size = check_pos_int("patch_size", patch_size, "e.g. patch_size=32, or None for the default.")
    C, k, _ = head.prototypes.shape
    names = class_names_of(test_dataset, C, class_names)
    columns = _metric_columns(per_class_metrics, C)
    if classes is None:
        classes = list(range(C))
    else:
        classes = list(classes)
        bad = [c for c in classes if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < C]
        if bad or not classes or len(set(classes)) != len(classes):
            raise InputValueError(
                f"classes must be a non-empty list of distinct class indices in [0, {C}); got "
                f"{classes[:20]!r}{' ...' if len(classes) > 20 else ''}. Fix: pass e.g. classes=[0, 1, 2], or None "
                "for every class."
            )
        classes = [int(c) for c in classes]
    dev = torch_device(device)

    out = Path(out_dir) / CLASSES_DIR
    png_dir = out / "png"
    png_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.html"), *png_dir.glob("*.png")]:  # a previous run's pages would otherwise linger
        old.unlink()

    chosen = select_test_images(test_dataset, classes, images_per_class)
    n_shown = {c: len(v) for c, v in chosen.items()}
    _write(out / "search.js", "window.PHPN_CLASSES = "
           + json.dumps([[c, names[c]] for c in classes], ensure_ascii=False, separators=(",", ":")) + ";\n")
    index = _index_pages(classes, names, columns, n_shown, page_size, title, out)[0]

    signs = head.signs.detach().cpu()
    proto_labels = [f"p{i}" for i in range(k)]
    position = {c: i for i, c in enumerate(classes)}
    common = dict(classes=classes, page_size=page_size, names=names, columns=columns, head=head, signs=signs,
                  proto_labels=proto_labels, train_store=train_store, train_dataset=train_dataset,
                  gallery_size=gallery_size, patch_size=patch_size, png_dir=png_dir, viz=viz, alpha=alpha,
                  cmap=cmap, title=title, out=out)
    # One forward pass per batch of classes; that batch's pages render in the pool while the next batch runs.
    # At most two batches are in flight, so memory is bounded by 2 * batch_classes classes' explanations.
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="phpn-class-page") as pool:
        pending: list[Future] = []
        for s in range(0, len(classes), batch_classes):
            batch = classes[s : s + batch_classes]
            explained = explain_classes(head, features, test_dataset, batch, chosen, dev)
            if workers == 1:  # serial: no thread at all
                for c in batch:
                    _class_page(c, position=position[c], data=explained.get(c), **common)
                continue
            submitted = [pool.submit(_class_page, c, position=position[c], data=explained.get(c), **common)
                         for c in batch]
            for f in pending:
                f.result()
            pending = submitted
        for f in pending:
            f.result()
    _link_report(Path(out_dir), len(classes))
    return index
