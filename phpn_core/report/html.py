"""The run report: one self-contained HTML page (metrics, and per class: where, what, why), plus its PNGs.

:func:`build_report` writes ``out_dir/report.html`` and ``out_dir/report_png/*.png``. Every image of the page is
embedded as a base64 ``data:`` URI, so ``report.html`` can be moved, mailed or served alone; the PNG files are the
same images, for slides and papers.

Page structure::

    <h1>title</h1>                          + what was run (classes, k, prototypes' sign convention)
    Summary                                 table of the metrics (key, value); None shows as "n/a"
    Comparison with baselines               (only when metrics["baselines"] is a dict) phpn vs each baseline,
                                            one column per shared metric (consistency, stability, ...) + a chart
    Classes                                 links to the class sections
    per class c:  <h2 id="class-<c>">
      Where: heatmaps                       rows = test images of class c, columns = the plain image, then the k
                                            prototypes' oriented heatmaps (colour scale per prototype, 0 .. max)
      What: prototype gallery               row i = the training patches where prototype i's oriented map peaks
                                            highest (one patch per training image, best first)
      Why: contributions                    per test image, k signed bars p0 .. p{k-1} and the bias; they sum to
                                            the class logit; plus one sentence per image ("... because of p1, p3")

Files: ``report_png/class-<c:03d>-heatmaps.png``, ``-gallery.png``, ``-contributions.png`` per class and
``report_png/summary-baselines.png`` when baselines are given.

The page carries a tiny inline script that, once the window has loaded, records how many of its images decoded:
``<body data-images-loaded="<ok>/<total>">`` (read it with a headless browser's ``--dump-dom``).

Cost: the test images shown are passed once through ``features`` (inference mode); galleries reuse the stored
training features (``train_store``) and decode only the training images they show. Measured: 8 classes at 112 px
(k = 4, 4 images per class) in 2-4 s on two busy CPU cores, 1.5 s with ``device="cuda"`` on an H100 machine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phpn_core.errors import InputValueError
from phpn_core.method.head import PartPrototypeHead
from phpn_core.report.gallery import GalleryPatch, gallery_patches
from phpn_core.report.page_common import (
    CSS,
    check_head_and_features,
    check_pos_int,
    class_names_of,
    data_uri,
    esc,
    explain_classes,
    format_value,
    labels_of,
    select_test_images,
    short,
    torch_device,
)

__all__ = ["build_report", "format_value", "select_test_images", "gallery_patches", "GalleryPatch", "PNG_DIR"]

PNG_DIR = "report_png"
# The metrics shown first, in this order (any other scalar key follows, sorted).
_METRIC_ORDER = (
    "accuracy_original", "accuracy_decomposed", "max_abs_logit_diff", "max_head_reconstruction_error",
    "consistency", "stability", "insertion_auc", "deletion_auc", "insertion_auc_class", "deletion_auc_class",
    "box_stability", "redundancy", "duplicate_rate", "n_classes", "k", "n_test_images", "seconds",
)
# The comparison table's first columns (any other numeric key of the baselines follows).
_COMPARE_ORDER = ("consistency", "stability", "insertion_auc", "deletion_auc", "insertion_auc_class",
                  "deletion_auc_class", "box_stability", "redundancy", "duplicate_rate")
_METRIC_HELP = {
    "accuracy_original": "top-1 accuracy of the original classifier on the test split",
    "accuracy_decomposed": "top-1 accuracy of the part-prototype head (equal to the original by construction)",
    "max_abs_logit_diff": "largest |logit difference| between the two heads over the test split",
    "max_head_reconstruction_error": "largest |sum of a class's prototypes - its head row|",
    "consistency": "ProtoEval consistency (% of prototypes that cover one part in >= 80% of their class's images)",
    "stability": "ProtoEval stability (% of images whose covered parts survive input noise, averaged)",
    "insertion_auc": "insertion AUC (RISE) of each prototype's map against its own contribution, normalised to "
                     "[0, 1]; higher is better",
    "deletion_auc": "deletion AUC (RISE) of each prototype's map against its own contribution; lower is better",
    "insertion_auc_class": "insertion AUC of the summed prototype map against the class logit; higher is better",
    "deletion_auc_class": "deletion AUC of the summed prototype map against the class logit; lower is better",
    "box_stability": "fraction of (prototype, image) pairs whose 72 px argmax box keeps IoU >= 0.5 under noise",
    "redundancy": "per class, the largest cosine between two prototypes' centred maps, averaged over classes",
    "duplicate_rate": "share of classes with two prototypes whose maps have cosine > 0.9 (a duplicate)",
}
_DEFAULT_MAX_CLASSES = 10


_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) {
    if (imgs[i].complete && imgs[i].naturalWidth > 0) { ok++; }
  }
  document.body.setAttribute("data-images-loaded", ok + "/" + imgs.length);
});
"""


# ------------------------------------------------------------------------------------------------------ helpers


# --------------------------------------------------------------------------------------------------- the data


# --------------------------------------------------------------------------------------------------- the report


def build_report(
    *,
    out_dir: str | Path,
    head: PartPrototypeHead,
    features: torch.nn.Module,
    test_dataset: Any,
    train_dataset: Any,
    train_store: Any,
    metrics: Mapping[str, Any] | None,
    title: str,
    device: str | torch.device = "cpu",
    classes: Sequence[int] | None = None,
    images_per_class: int = 4,
    gallery_size: int = 6,
    max_classes: int = _DEFAULT_MAX_CLASSES,
    patch_size: int | None = None,
    class_names: Sequence[str] | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
) -> Path:
    """Write the HTML report and its PNGs; returns the path of ``out_dir/report.html``.

    Args:
        out_dir: directory to write into (created if needed); ``report.html`` and ``report_png/`` are replaced.
        head: the decomposed head, prototypes ``[C, k, D]`` (not modified; copied to ``device`` if elsewhere).
        features: x ``[B, 3, S, S]`` normalised -> ``[B, D, h, w]``, in eval mode (``split_classifier(model)[0]``);
            not modified (copied to ``device`` if its parameters are elsewhere).
        test_dataset: the test split (phpn dataset contract); its first ``images_per_class`` images of each shown
            class are explained, normalised with its ``mean``/``std``.
        train_dataset: the training split the store was extracted from (gallery patches are cut from it).
        train_store: the training :class:`~phpn_core.storage.feature_store.FeatureStore` (features ``[n, h, w, D]`` per class).
        metrics: the run's metrics (any JSON-like mapping; missing keys and None are tolerated). A nested
            ``"baselines": {name: {metric: value}}`` adds a comparison table.
        title: the page title.
        device: where to run ``features`` on the test images.
        classes: the classes to show (default: the first ``max_classes`` classes, by index).
        images_per_class: test images per class (heatmap rows and contribution charts).
        gallery_size: training patches per prototype.
        max_classes: cap on the default class list.
        patch_size: side in pixels of gallery patches (default: the ProtoEval box, 36 px at 112 px).
        class_names: C names (default: ``test_dataset.classes``).
        alpha, cmap: heatmap overlay blend and colour map (see :func:`phpn_core.report.figures.heatmap_overlay`).
    """
    from phpn_core.report import figures as viz

    t0 = time.perf_counter()
    check_head_and_features(head, features)
    images_per_class = check_pos_int("images_per_class", images_per_class, "e.g. images_per_class=4.")
    gallery_size = check_pos_int("gallery_size", gallery_size, "e.g. gallery_size=6.")
    max_classes = check_pos_int("max_classes", max_classes, "e.g. max_classes=10.")
    if patch_size is not None:
        patch_size = check_pos_int("patch_size", patch_size, "e.g. patch_size=32, or None for the default.")
    if metrics is not None and not isinstance(metrics, Mapping):
        raise InputValueError(
            f"metrics must be a mapping (the run's metrics dict) or None; got {type(metrics).__name__}. "
            "Fix: pass the dict written to metrics.json."
        )
    metrics = dict(metrics or {})
    C, k, D = head.prototypes.shape
    names = class_names_of(test_dataset, C, class_names)
    if classes is None:
        present = set(labels_of(test_dataset, "test_dataset"))
        classes = [c for c in range(C) if c in present][:max_classes]
    else:
        classes = list(classes)
        bad = [c for c in classes if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < C]
        if bad or not classes:
            raise InputValueError(
                f"classes must be a non-empty list of class indices in [0, {C}); got {classes!r}. Fix: pass e.g. "
                "classes=[0, 1, 2], or None for the first classes."
            )
        classes = [int(c) for c in classes]
    dev = torch_device(device)

    out = Path(out_dir)
    png_dir = out / PNG_DIR
    png_dir.mkdir(parents=True, exist_ok=True)
    for old in png_dir.glob("*.png"):  # a previous report's images would otherwise linger
        old.unlink()

    # -- the test images and their explanations (one forward pass) ----------------------------------------------
    chosen = select_test_images(test_dataset, classes, images_per_class)
    explained = explain_classes(head, features, test_dataset, classes, chosen, dev)

    signs = head.signs.detach().cpu()
    proto_labels = [f"p{i}" for i in range(k)]

    # -- sections ---------------------------------------------------------------------------------------------
    parts: list[str] = []
    parts.append(_summary_html(metrics))
    baseline_html = _baselines_html(metrics, png_dir, viz)
    if baseline_html:
        parts.append(baseline_html)
    parts.append(
        "<nav aria-label=\"classes\"><h2 id=\"classes\">Classes</h2><ul>"
        + "".join(f"<li><a href=\"#class-{c}\">{esc(names[c])}</a></li>" for c in classes)
        + "</ul></nav>"
    )
    for c in classes:
        parts.append(class_html(c, names, explained.get(c), head, signs, proto_labels, train_store, train_dataset,
                                 gallery_size, patch_size, png_dir, viz, alpha=alpha, cmap=cmap))

    seconds = time.perf_counter() - t0
    intro = (
        f"<p class=\"note\">{len(classes)} of {C} classes shown, k = {k} prototypes per class, D = {D}. "
        "Heatmaps are <em>oriented</em>: each prototype's map is multiplied by the sign of its scaling coefficient, "
        "so it peaks where its part is even when the part counts against the class (such prototypes are marked "
        "<em>(neg)</em>). A prototype's contribution is the mean of its map before orientation; contributions plus "
        f"the bias give the logit exactly. Generated {time.strftime('%Y-%m-%d %H:%M:%S')} in {seconds:.1f} s.</p>"
    )
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n<script>{_SCRIPT}</script>\n</head>\n"
        f"<body data-images-loaded=\"pending\">\n<h1>{esc(title)}</h1>\n{intro}\n"
        + "\n".join(parts)
        + "\n</body>\n</html>\n"
    )
    path = out / "report.html"
    tmp = out / ".report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------------------ html pieces


def _summary_html(metrics: Mapping[str, Any]) -> str:
    rows = []
    keys = [k for k in _METRIC_ORDER if k in metrics]
    keys += sorted(k for k in metrics if k not in _METRIC_ORDER and k != "baselines")
    for key in keys:
        value = metrics[key]
        if isinstance(value, Mapping):
            for sub in sorted(value):
                rows.append((f"{key}.{sub}", value[sub], None))
        else:
            rows.append((key, value, _METRIC_HELP.get(key)))
    if not rows:
        body = "<p class=\"note\">No metrics were given.</p>"
    else:
        trs = "".join(
            f"<tr><th scope=\"row\"><code>{esc(k)}</code></th><td class=\"num\">{esc(format_value(v))}</td>"
            f"<td>{esc(h) if h else ''}</td></tr>"
            for k, v, h in rows
        )
        body = (
            "<table class=\"metrics\"><caption class=\"note\">Run metrics</caption>"
            "<thead><tr><th scope=\"col\">metric</th><th scope=\"col\">value</th><th scope=\"col\">meaning</th></tr>"
            f"</thead><tbody>{trs}</tbody></table>"
        )
    return f"<section id=\"summary\"><h2>Summary</h2>{body}</section>"


def _baselines_html(metrics: Mapping[str, Any], png_dir: Path, viz: Any) -> str:
    baselines = metrics.get("baselines")
    if not isinstance(baselines, Mapping) or not baselines:
        return ""
    methods: list[tuple[str, Mapping[str, Any]]] = [("phpn (this run)", metrics)]
    methods += [(str(name), vals if isinstance(vals, Mapping) else {}) for name, vals in baselines.items()]
    cols: list[str] = []
    for _, vals in methods[1:]:
        for key, v in vals.items():
            if key not in cols and (v is None or isinstance(v, (int, float, np.integer, np.floating))) \
                    and not isinstance(v, bool):
                cols.append(key)
    preferred = [c for c in _COMPARE_ORDER if c in cols]
    cols = preferred + [c for c in cols if c not in preferred]
    if not cols:
        cols = ["consistency", "stability"]
    # One chart scale: ProtoEval's percentages when present, else the [0, 1] keypoint-free numbers.
    percent = [c for c in cols if c in ("consistency", "stability")]
    chart_cols = percent or cols
    head = "".join(f"<th scope=\"col\">{esc(c)}</th>" for c in cols)
    trs = []
    for i, (name, vals) in enumerate(methods):
        tds = "".join(f"<td class=\"num\">{esc(format_value(vals.get(c)))}</td>" for c in cols)
        cls = " class=\"ours\"" if i == 0 else ""
        trs.append(f"<tr{cls}><th scope=\"row\">{esc(name)}</th>{tds}</tr>")
    table = (
        "<table class=\"baselines\"><caption class=\"note\">Higher is better for consistency and stability "
        "(percentages), insertion AUC and box stability (in [0, 1]); lower is better for deletion AUC, redundancy "
        "and duplicate rate. The keypoint-free metrics need no part keypoints (Grad-CAM has one map: no redundancy)."
        "</caption>"
        f"<thead><tr><th scope=\"col\">method</th>{head}</tr></thead><tbody>{''.join(trs)}</tbody></table>"
    )
    figure = ""
    numeric = {
        name: [float(vals[c]) if isinstance(vals.get(c), (int, float, np.integer, np.floating))
               and not isinstance(vals.get(c), bool) and math.isfinite(float(vals[c])) else float("nan")
               for c in chart_cols]
        for name, vals in methods
    }
    if any(math.isfinite(v) for vs in numeric.values() for v in vs):
        fig = viz.new_figure(120 + 110 * len(chart_cols) * max(1, len(methods)) / 2, 300)
        ax = fig.add_subplot(1, 1, 1)
        width = 0.8 / len(methods)
        xs = np.arange(len(chart_cols))
        palette = ["#2c7bb6", "#fdae61", "#abd9e9", "#d7191c", "#a6d96a", "#7b3294"]
        for j, (name, vals) in enumerate(numeric.items()):
            heights = [0.0 if not math.isfinite(v) else v for v in vals]
            ax.bar(xs + (j - (len(methods) - 1) / 2) * width, heights, width, label=name,
                   color=palette[j % len(palette)])
        ax.set_xticks(xs, chart_cols, fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.set_title("phpn vs baselines", fontsize=10)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        fig.subplots_adjust(right=0.72, bottom=0.12)
        png = viz.figure_to_png(fig)
        (png_dir / "summary-baselines.png").write_bytes(png)
        alt = ("Bar chart comparing phpn with " + ", ".join(n for n, _ in methods[1:]) + " on "
               + ", ".join(chart_cols))
        figure = f"<figure><img src=\"{data_uri(png)}\" alt=\"{esc(alt)}\"></figure>"
    return f"<section id=\"baselines\"><h2>Comparison with baselines</h2>{table}{figure}</section>"


def _why_sentence(name: str, contributions: torch.Tensor, logit: float, labels: list[str], pred: str) -> str:
    """One line per image: 'This is <name> (logit x) mainly because of prototypes p1 (+a) and p3 (+b); p0 counts
    against it (-c).', or 'Evidence for <name> ...; predicted: <pred> instead.' when another class wins."""
    vals = contributions.tolist()
    order = sorted(range(len(vals)), key=lambda i: vals[i], reverse=True)
    pos = [i for i in order if vals[i] > 0][:2]
    neg = [i for i in sorted(range(len(vals)), key=lambda i: vals[i]) if vals[i] < 0][:1]
    correct = pred == name
    lead = f"This is {name}" if correct else f"Evidence for {name}"
    if pos:
        because = " and ".join(f"{labels[i]} ({vals[i]:+.2f})" for i in pos)
        text = f"{lead} (logit {logit:.2f}) mainly because of prototype{'s' if len(pos) > 1 else ''} {because}"
    else:
        text = f"{lead} (logit {logit:.2f}): no prototype contributes positively"
    if neg:
        text += f"; {labels[neg[0]]} counts against it ({vals[neg[0]]:+.2f})"
    return text + ("." if correct else f"; predicted: {pred} instead.")


def class_html(c: int, names: list[str], data: dict[str, Any] | None, head: PartPrototypeHead, signs: torch.Tensor,
                proto_labels: list[str], train_store: Any, train_dataset: Any, gallery_size: int,
                patch_size: int | None, png_dir: Path, viz: Any, *, alpha: float, cmap: str) -> str:
    name = names[c]
    # a class decomposed with fewer prototypes (decompose.k: auto) shows only those in use
    used = [i for i, on in enumerate(head.active[c].tolist()) if on]
    slots = len(proto_labels)
    # "(neg)": the prototype carries its part as negative evidence (its sign is -1); PIL's font has no U+2212.
    marked = [f"{proto_labels[i]} (neg)" if float(signs[c, i]) < 0 else proto_labels[i] for i in used]
    proto_labels = [proto_labels[i] for i in used]
    k = len(used)
    if data is not None and k < slots:
        data = {**data, "oriented": data["oriented"][:, used], "contributions": data["contributions"][:, used]}
    out = [f"<section class=\"class\" id=\"class-{c}\"><h2>Class {c}: {esc(name)}</h2>"]
    if k < slots:
        out.append(f"<p class=\"note\">{k} of {slots} prototypes in use: with <code>decompose.k: auto</code> this "
                   "class's duplicates were removed (the other slots are zero and add nothing to its logit).</p>")

    # Where
    out.append("<h3>Where: prototype heatmaps on test images</h3>")
    if data is None:
        out.append("<p class=\"note\">The test split has no images of this class.</p>")
    else:
        row_labels = [f"{short(i)}\npred: {short(names[p])}" for i, p in zip(data["ids"], data["pred"])]
        png = viz.render_heatmap_grid(data["images"], data["oriented"], row_labels=row_labels, col_labels=marked,
                                      title=f"{name}: oriented heatmaps (colour scale per prototype, 0 .. max)",
                                      alpha=alpha, cmap=cmap, quantize=True)
        (png_dir / f"class-{c:03d}-heatmaps.png").write_bytes(png)
        alt = (f"Heatmaps of class {name}'s {k} prototypes over {len(data['ids'])} test images "
               f"({', '.join(data['ids'])}); rows are images, columns the plain image then prototypes "
               f"{', '.join(proto_labels)}")
        out.append(f"<figure><img src=\"{data_uri(png)}\" alt=\"{esc(alt)}\"><figcaption>Rows: test images of "
                   f"{esc(name)} (with the predicted class). Columns: the image, then each prototype's oriented map "
                   "upsampled to the image. Red = strong, blue = absent.</figcaption></figure>")

    # What
    out.append("<h3>What: prototype gallery (most activating training patches)</h3>")
    gallery = gallery_patches(head, c, train_store=train_store, train_dataset=train_dataset, size=gallery_size,
                              patch_size=patch_size)
    gallery = [gallery[i] for i in used]
    if not any(gallery):
        out.append("<p class=\"note\">The training store has no images of this class.</p>")
    else:
        png = viz.render_gallery([[g.patch for g in row] for row in gallery], row_labels=marked,
                                 title=f"{name}: training patches where each prototype peaks", quantize=True)
        (png_dir / f"class-{c:03d}-gallery.png").write_bytes(png)
        alt = (f"Gallery of class {name}: for each prototype {', '.join(proto_labels)}, the "
               f"{max(len(r) for r in gallery)} training patches that activate it most")
        out.append(f"<figure><img src=\"{data_uri(png)}\" alt=\"{esc(alt)}\"><figcaption>Row i: the training "
                   "images of this class where prototype i's oriented map is highest, cropped around the peak "
                   "(one patch per image, best first).</figcaption></figure>")

    # Why
    out.append("<h3>Why: prototype contributions to the logit</h3>")
    if data is not None:
        n = len(data["ids"])
        png = viz.render_contributions(data["contributions"], bias=data["bias"], logits=data["logits"],
                                       labels=proto_labels, titles=[short(i, 24) for i in data["ids"]],
                                       title=f"{name}: contributions")
        (png_dir / f"class-{c:03d}-contributions.png").write_bytes(png)
        alt = (f"Bar charts of the {k} prototype contributions and the bias to class {name}'s logit, for test "
               f"images {', '.join(data['ids'])}")
        out.append(f"<figure><img src=\"{data_uri(png)}\" alt=\"{esc(alt)}\"><figcaption>Blue bars add to the "
                   "class logit, red bars subtract, grey is the bias; together they give the logit.</figcaption>"
                   "</figure>")
        items = "".join(
            f"<li><code>{esc(data['ids'][b])}</code>: "
            + esc(_why_sentence(name, data["contributions"][b], float(data["logits"][b]), proto_labels,
                                 names[data["pred"][b]]))
            + "</li>"
            for b in range(n)
        )
        out.append(f"<ul class=\"why\">{items}</ul>")
    out.append("</section>")
    return "\n".join(out)
