"""Server-rendered HTML of the explorer: plain strings, inline CSS, a little inline JS (sorting and filtering
tables, counting decoded images). No front-end build step, no external resource: every URL is the app's own.

Every value shown is HTML-escaped (:func:`esc`); every id placed in a URL is percent-encoded (:func:`q`).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

__all__ = ["esc", "q", "fmt", "layout", "entries_page", "entry_page", "class_page", "compare_page", "explain_page",
           "error_page"]

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 0; color: #222;
       line-height: 1.45; background: #fff; }
header { background: #1f3b57; color: #fff; padding: 0.6em 2em; display: flex; gap: 1.6em; align-items: baseline; }
header a { color: #fff; text-decoration: none; } header a:hover { text-decoration: underline; }
header .brand { font-weight: 700; font-size: 1.15em; }
header .reg { margin-left: auto; font-size: 0.85em; opacity: 0.85; font-family: monospace; }
main { max-width: 1500px; margin: 0 auto; padding: 1em 2em 4em; }
h1 { font-size: 1.55em; margin: 0.5em 0 0.3em; } h2 { font-size: 1.25em; margin-top: 1.8em;
  border-bottom: 2px solid #e3e3e3; padding-bottom: 0.2em; } h3 { font-size: 1.05em; margin: 1.3em 0 0.4em; }
p.note, figcaption, .muted { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.9em; }
th, td { border: 1px solid #d9d9d9; padding: 0.28em 0.65em; text-align: left; vertical-align: top; }
th { background: #f3f5f7; } th.sortable { cursor: pointer; user-select: none; white-space: nowrap; }
th.sortable::after { content: " \\2195"; color: #999; font-size: 0.8em; }
th.asc::after { content: " \\2191"; color: #1f3b57; } th.desc::after { content: " \\2193"; color: #1f3b57; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.err td { background: #fff3f3; } tr.hidden { display: none; }
input[type=search], input[type=text], select { padding: 0.3em 0.5em; font-size: 0.95em; border: 1px solid #bbb;
  border-radius: 4px; }
button, input[type=submit] { padding: 0.35em 0.9em; font-size: 0.95em; border-radius: 4px; border: 1px solid #1f3b57;
  background: #1f3b57; color: #fff; cursor: pointer; }
img { max-width: 100%; height: auto; border: 1px solid #eee; background: #fafafa; }
figure { margin: 0.4em 0 1em; }
.cols { display: grid; grid-template-columns: repeat(auto-fit, minmax(360px, 1fr)); gap: 1.2em; }
.card { border: 1px solid #e3e3e3; border-radius: 6px; padding: 0.6em 1em; }
.error { border-left: 5px solid #d7191c; background: #fff5f5; padding: 0.8em 1.2em; white-space: pre-wrap; }
code { background: #f3f3f3; padding: 0 0.25em; border-radius: 3px; }
.scroll { overflow-x: auto; } #entries { font-size: 0.84em; } #entries code { font-size: 0.92em; }
td.wrap { max-width: 16em; } .toolbar { display: flex; gap: 0.8em; align-items: center; margin: 0.8em 0; }
ul.classes { columns: 4; list-style: none; padding-left: 0; } ul.classes li.hidden { display: none; }
.pos { color: #2c7bb6; } .neg { color: #d7191c; }
"""

_SCRIPT = """
function phpnSort(th) {
  var table = th.closest("table"), tbody = table.tBodies[0], idx = Array.prototype.indexOf.call(th.parentNode.children, th);
  var asc = !th.classList.contains("asc");
  Array.prototype.forEach.call(th.parentNode.children, function (x) { x.classList.remove("asc", "desc"); });
  th.classList.add(asc ? "asc" : "desc");
  var rows = Array.prototype.slice.call(tbody.rows);
  function key(r) { var c = r.cells[idx]; var v = c ? (c.getAttribute("data-v") || c.textContent.trim()) : "";
    var n = parseFloat(v); return (v !== "" && !isNaN(n) && isFinite(v)) ? [0, n] : [1, v.toLowerCase()]; }
  rows.sort(function (a, b) { var x = key(a), y = key(b);
    if (x[0] !== y[0]) { return x[0] - y[0]; }
    var r = x[1] < y[1] ? -1 : (x[1] > y[1] ? 1 : 0); return asc ? r : -r; });
  rows.forEach(function (r) { tbody.appendChild(r); });
}
function phpnFilter(input, sel) {
  var words = input.value.toLowerCase().split(/\\s+/).filter(Boolean);
  document.querySelectorAll(sel).forEach(function (r) {
    var t = r.textContent.toLowerCase();
    r.classList.toggle("hidden", !words.every(function (w) { return t.indexOf(w) >= 0; }));
  });
}
function phpnCount() {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) { ok++; } }
  document.body.setAttribute("data-images-loaded", ok + "/" + imgs.length);
}
document.addEventListener("DOMContentLoaded", function () {
  Array.prototype.forEach.call(document.images, function (im) {
    im.addEventListener("load", phpnCount); im.addEventListener("error", phpnCount); });
});
window.addEventListener("load", phpnCount);
"""


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def q(text: Any) -> str:
    """Percent-encode one URL path segment (``/`` included)."""
    return quote(str(text), safe="")


def fmt(value: Any, digits: int = 4) -> str:
    """None -> ``n/a``; floats with ``digits`` significant digits; everything else ``str``."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return str(value)


def _num(value: Any, digits: int = 4) -> str:
    v = "" if value is None else (str(value) if not isinstance(value, float) or math.isfinite(value) else "")
    return f"<td class=\"num\" data-v=\"{esc(v)}\">{esc(fmt(value, digits))}</td>"


def layout(title: str, body: str, *, registry: str = "") -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{esc(title)} - phpn explorer</title>\n<style>{_CSS}</style>\n<script>{_SCRIPT}</script>\n</head>\n"
        "<body data-images-loaded=\"pending\">\n<header><a class=\"brand\" href=\"/\">phpn explorer</a>"
        "<a href=\"/\">Entries</a><a href=\"/compare\">Compare</a><a href=\"/explain\">Explain</a>"
        f"<a href=\"/docs\">API</a><span class=\"reg\">{esc(registry)}</span></header>\n<main>\n{body}\n</main>\n"
        "</body>\n</html>\n"
    )


def error_page(status: int, title: str, message: str, *, registry: str = "") -> str:
    body = (f"<h1>{esc(status)} {esc(title)}</h1><div class=\"error\" role=\"alert\">{esc(message)}</div>"
            "<p><a href=\"/\">Back to the entries</a></p>")
    return layout(f"{status} {title}", body, registry=registry)


# ---------------------------------------------------------------------------------------------------- entries


def _baselines_text(baselines: Mapping[str, Mapping[str, Any]]) -> str:
    if not baselines:
        return "n/a"
    parts = []
    for name, vals in baselines.items():
        parts.append(f"{name}: {fmt(vals.get('consistency'), 3)} / {fmt(vals.get('stability'), 3)}")
    return "; ".join(parts)


# The keypoint-free metrics (phpn_core.evaluation.keypoint_free): one row per method on an entry's page.
KEYPOINT_FREE_COLUMNS = ("insertion_auc", "deletion_auc", "insertion_auc_class", "deletion_auc_class",
                         "box_stability", "redundancy", "duplicate_rate")


def _keypoint_free_table(row: Any) -> str:
    """phpn and every baseline (one row each) x the keypoint-free metrics; empty when the run recorded none."""
    methods = [("phpn", row.metrics)] + [(str(n), v) for n, v in row.baselines.items()]
    if not any(vals.get(c) is not None for _, vals in methods for c in KEYPOINT_FREE_COLUMNS):
        return ""
    ths = "".join(f"<th scope=\"col\">{esc(c)}</th>" for c in KEYPOINT_FREE_COLUMNS)
    trs = "".join(f"<tr><th scope=\"row\">{esc(n)}</th>" + "".join(_num(v.get(c)) for c in KEYPOINT_FREE_COLUMNS)
                  + "</tr>" for n, v in methods)
    return ("<h2>Without keypoints</h2>"
            f"<table id=\"keypoint-free\"><thead><tr><th scope=\"col\">method</th>{ths}</tr></thead>"
            f"<tbody>{trs}</tbody></table><p class=\"note\">Deletion/insertion AUC (RISE, normalised to [0, 1]): each "
            "prototype's map against its own contribution, and (<code>_class</code>) the summed map against the class "
            "logit; higher insertion, lower deletion is better. Box stability: fraction of (prototype, image) boxes "
            "keeping IoU &gt;= 0.5 under ProtoEval's noise. Redundancy: largest cosine between two prototypes' maps "
            "per class (mean over classes); duplicate rate: share of classes above 0.9. n/a: not recorded or not "
            "defined (Grad-CAM has one map).</p>")


def entries_page(rows: Sequence[Any], *, registry: str) -> str:
    head_cols = ["", "entry", "kind", "model", "dataset", "k", "classes", "D", "created", "acc. original",
                 "acc. decomposed / ProtoPNet", "max |logit diff|", "consistency", "stability",
                 "insertion AUC", "deletion AUC", "box stability", "redundancy", "baselines (cons. / stab.)"]
    ths = "".join(f"<th class=\"sortable\" scope=\"col\" onclick=\"phpnSort(this)\">{esc(h)}</th>" if h else
                  "<th scope=\"col\">compare</th>" for h in head_cols)
    trs = []
    for r in rows:
        if r.error:
            trs.append(f"<tr class=\"entry err\"><td></td><td><code>{esc(r.entry_id)}</code></td>"
                       f"<td colspan=\"{len(head_cols) - 2}\">unreadable: {esc(r.error[:400])}</td></tr>")
            continue
        m = r.metrics
        trs.append(
            "<tr class=\"entry\">"
            f"<td><input type=\"checkbox\" name=\"ids\" value=\"{esc(r.entry_id)}\" form=\"compare\" "
            f"aria-label=\"compare {esc(r.entry_id)}\"></td>"
            f"<td><a href=\"/entries/{q(r.entry_id)}\"><code>{esc(r.entry_id)}</code></a></td><td>{esc(r.kind)}</td>"
            f"<td>{esc(r.model)}</td><td>{esc(r.dataset)}</td>{_num(r.k)}{_num(r.n_classes)}{_num(r.D)}"
            f"<td data-v=\"{esc(r.created or '')}\" title=\"{esc(r.created or '')}\" style=\"white-space:nowrap\">{esc((r.created or '')[:10])}</td>"
            f"{_num(m.get('accuracy_original', m.get('accuracy_cnn')))}"
            f"{_num(m.get('accuracy_decomposed', m.get('accuracy')))}"
            f"{_num(m.get('max_abs_logit_diff'), 3)}{_num(m.get('consistency'))}{_num(m.get('stability'))}"
            f"{_num(m.get('insertion_auc'), 3)}{_num(m.get('deletion_auc'), 3)}{_num(m.get('box_stability'), 3)}"
            f"{_num(m.get('redundancy'), 3)}"
            f"<td class=\"wrap\">{esc(_baselines_text(r.baselines))}</td></tr>"
        )
    if not trs:
        table = "<p class=\"note\">This registry has no published entries yet.</p>"
    else:
        table = (
            "<div class=\"toolbar\"><input type=\"search\" id=\"filter\" placeholder=\"filter: model, dataset, k3 ...\" size=\"40\" "
            "oninput=\"phpnFilter(this, 'tr.entry')\" aria-label=\"filter entries\"> "
            "<form id=\"compare\" class=\"inline\" action=\"/compare\" method=\"get\">"
            "<button type=\"submit\">Compare selected</button></form></div>"
            f"<div class=\"scroll\"><table id=\"entries\"><thead><tr>{ths}</tr></thead>"
            f"<tbody>{''.join(trs)}</tbody></table></div>"
            "<p class=\"note\">Click a column to sort; type to filter. Accuracy parity: the decomposed head's "
            "accuracy equals the original's by construction; a <em>protopnet</em> entry is the ante-hoc baseline "
            "trained on the same trunk and data (its own accuracy beside the trained CNN's). Consistency and stability: ProtoEval (percent, "
            "higher is better). Insertion/deletion AUC, box stability, redundancy: the keypoint-free metrics in [0, 1] "
            "(higher insertion and box stability, lower deletion and redundancy are better; every method's on the "
            "entry's page). n/a: the run did not record it.</p>"
        )
    body = f"<h1>Registry entries <span class=\"muted\">({len(rows)})</span></h1>{table}"
    return layout("Entries", body, registry=registry)


def _metrics_table(row: Any) -> str:
    m = row.metrics
    if not m:
        return "<p class=\"note\">No metrics recorded for this entry.</p>"
    trs = "".join(f"<tr><th scope=\"row\"><code>{esc(k)}</code></th>{_num(v)}</tr>" for k, v in m.items())
    if row.baselines:
        cols = sorted({k for v in row.baselines.values() for k in v})
        trs += "".join(
            f"<tr><th scope=\"row\">baseline <code>{esc(n)}</code></th><td>"
            + esc(", ".join(f"{c} {fmt(v.get(c), 4)}" for c in cols)) + "</td></tr>"
            for n, v in row.baselines.items())
    src = f"<caption class=\"note\">from {esc(row.metrics_source)}</caption>" if row.metrics_source else ""
    return f"<table class=\"metrics\">{src}<tbody>{trs}</tbody></table>"


def entry_page(row: Any, info: Any, class_names: Sequence[str]) -> str:
    eid = info.entry_id
    ident = [("model", info.model), ("dataset", info.dataset), ("k", info.k), ("classes", info.n_classes),
             ("D", info.D), ("dtype", info.dtype), ("created", info.created), ("version", info.version),
             ("phpn", info.phpn_version), ("max head error", info.max_head_error),
             ("mean NMF rel. error", info.mean_rel_error)]
    itab = "".join(f"<tr><th scope=\"row\">{esc(k)}</th><td>{esc(fmt(v))}</td></tr>" for k, v in ident)
    lis = "".join(f"<li class=\"cls\"><a href=\"/entries/{q(eid)}/classes/{c}\">{c}: {esc(n)}</a></li>"
                  for c, n in enumerate(class_names))
    body = (
        f"<h1>Entry <code>{esc(eid)}</code></h1>"
        f"<div class=\"cols\"><div><h2>Identity</h2><table><tbody>{itab}</tbody></table></div>"
        f"<div><h2>Metrics</h2>{_metrics_table(row)}{_keypoint_free_table(row)}"
        f"<p><a href=\"/explain?entry={q(eid)}\">Explain an image with this entry</a> - "
        f"<a href=\"/api/entries/{q(eid)}\">JSON</a></p></div></div>"
        f"<h2>Classes ({len(class_names)})</h2>"
        f"<form action=\"/entries/{q(eid)}/class\" method=\"get\"><input type=\"search\" name=\"q\" "
        "placeholder=\"class name or index\" oninput=\"phpnFilter(this, 'li.cls')\" aria-label=\"find a class\"> "
        "<button type=\"submit\">Open</button></form>"
        f"<ul class=\"classes\">{lis}</ul>"
    )
    return layout(eid, body)


# ---------------------------------------------------------------------------------------------------- classes


def class_page(view: Any, info: Any, class_names: Sequence[str], *, figures: Mapping[str, str | None]) -> str:
    """``figures``: kind -> image URL (None: nothing to draw)."""
    eid, c, k = info.entry_id, view.c, view.k
    C = info.n_classes
    mean = view.contributions.mean(0).tolist() if view.contributions.shape[0] else [None] * k
    rows = []
    for i in range(k):
        sign = int(view.signs[i])
        gal = view.gallery[i] if view.gallery else []
        top = ", ".join(f"{g[0]} ({g[1]:.2f})" for g in gal[:3])
        rows.append(
            f"<tr><th scope=\"row\">p{i}</th>{_num(float(view.alpha[i]))}"
            f"<td class=\"{'pos' if sign >= 0 else 'neg'}\">{'+' if sign >= 0 else '-'} "
            f"{'evidence for' if sign >= 0 else 'negative evidence'}</td>{_num(float(view.norms[i]))}"
            f"{_num(mean[i])}<td>{esc(top) or 'n/a'}</td></tr>")
    ptab = ("<table id=\"prototypes\"><thead><tr><th>prototype</th><th>alpha</th><th>sign</th><th>norm</th>"
            "<th>mean contribution (test images shown)</th><th>top training images (score)</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")
    nav = []
    if c > 0:
        nav.append(f"<a href=\"/entries/{q(eid)}/classes/{c - 1}\">&larr; {esc(class_names[c - 1])}</a>")
    nav.append(f"<a href=\"/entries/{q(eid)}\">all classes</a>")
    if c + 1 < C:
        nav.append(f"<a href=\"/entries/{q(eid)}/classes/{c + 1}\">{esc(class_names[c + 1])} &rarr;</a>")
    nav.append(f"<a href=\"/compare?cls={c}\">compare this class across entries</a>")
    nav.append(f"<a href=\"/api/entries/{q(eid)}/classes/{c}\">JSON</a>")

    def fig(kind: str, heading: str, caption: str, alt: str) -> str:
        url = figures.get(kind)
        if not url:
            return f"<h2>{heading}</h2><p class=\"note\">Nothing to draw here (see the notes above).</p>"
        return (f"<h2>{heading}</h2><figure><img src=\"{esc(url)}\" alt=\"{esc(alt)}\" loading=\"lazy\">"
                f"<figcaption>{caption}</figcaption></figure>")

    notes = "".join(f"<li>{esc(n)}</li>" for n in view.notes)
    why = ""
    if view.test_ids:
        items = []
        for b, iid in enumerate(view.test_ids):
            vals = view.contributions[b].tolist()
            order = sorted(range(k), key=lambda i: vals[i], reverse=True)
            pos = [f"p{i} ({vals[i]:+.2f})" for i in order if vals[i] > 0][:2]
            pred = class_names[view.test_pred[b]]
            items.append(f"<li><code>{esc(iid)}</code>: logit {float(view.test_logits[b]):.2f}, predicted "
                         f"{esc(pred)}; mainly {esc(' and '.join(pos) or 'no positive prototype')}</li>")
        why = f"<ul class=\"why\">{''.join(items)}</ul>"
    body = (
        f"<p class=\"muted\"><a href=\"/\">entries</a> / <a href=\"/entries/{q(eid)}\"><code>{esc(eid)}</code></a>"
        f" / class {c}</p><h1>Class {c}: {esc(view.name)}</h1><p>{' | '.join(nav)}</p>"
        f"<p class=\"note\">k = {k} prototypes; bias {view.bias:.4g}; NMF relative error {esc(fmt(view.rel_error))}. "
        "Heatmaps are oriented (times the sign of alpha): they peak where the part is, also for negative "
        "evidence.</p>"
        + (f"<ul class=\"note\">{notes}</ul>" if notes else "")
        + f"<h2>Prototypes</h2>{ptab}"
        + fig("gallery", "What: prototype gallery",
              "Row i: the training images of this class where prototype i's oriented map is highest, cropped around "
              "the peak (best first).", f"gallery of class {view.name}: top training patches per prototype")
        + fig("heatmaps", "Where: heatmaps on test images",
              "Rows: test images of this class (with the predicted class); columns: the image, then each prototype's "
              "oriented map (colour scale per prototype, 0 .. max).", f"heatmaps of class {view.name}'s prototypes")
        + fig("contributions", "Why: contributions",
              "Per test image, the k prototype contributions and the bias (grey); they sum to the class logit.",
              f"contribution bars of class {view.name}")
        + why
    )
    return layout(f"{view.name} - {eid}", body)


# ---------------------------------------------------------------------------------------------------- compare


def compare_page(rows: Sequence[Any], all_rows: Sequence[Any], *, cls: str | None,
                 per_entry: Sequence[tuple[Any, Any, Mapping[str, str | None] | None, str | None]]) -> str:
    """``rows``: the compared entries (phpn and ProtoPNet alike); ``all_rows``: every entry (for the picker);
    ``per_entry``: for each compared entry ``(row, view or None, figure URLs by kind or None, error or None)`` of
    class ``cls``."""
    chosen = {r.entry_id for r in rows}
    opts = "".join(
        f"<label style=\"display:block\"><input type=\"checkbox\" name=\"ids\" value=\"{esc(r.entry_id)}\""
        f"{' checked' if r.entry_id in chosen else ''}> <code>{esc(r.entry_id)}</code></label>"
        for r in all_rows if not r.error)
    picker = (f"<form action=\"/compare\" method=\"get\" class=\"card\">{opts}<p>Class (name or index): "
              f"<input type=\"text\" name=\"cls\" value=\"{esc(cls or '')}\" size=\"24\"> "
              "<button type=\"submit\">Compare</button></p></form>")
    body = ["<h1>Compare entries</h1>"]
    if len(rows) < 2:
        body.append("<p class=\"note\">Pick two or more entries (e.g. the same dataset with different backbones or "
                    "k) and optionally a class.</p>")
        body.append(picker)
        return layout("Compare", "".join(body))
    keys = ["kind", "model", "dataset", "k", "n_classes", "D", "created"]
    mkeys = sorted({k for r in rows for k in r.metrics},
                   key=lambda k: ("accuracy_original", "accuracy_decomposed", "max_abs_logit_diff",
                                  "max_head_reconstruction_error", "consistency", "stability").index(k)
                   if k in ("accuracy_original", "accuracy_decomposed", "max_abs_logit_diff",
                            "max_head_reconstruction_error", "consistency", "stability") else 99)
    head = "".join(f"<th scope=\"col\"><a href=\"/entries/{q(r.entry_id)}\"><code>{esc(r.entry_id)}</code></a></th>"
                   for r in rows)
    trs = "".join(f"<tr><th scope=\"row\">{esc(k)}</th>" + "".join(f"<td>{esc(fmt(getattr(r, k)))}</td>" for r in rows)
                  + "</tr>" for k in keys)
    trs += "".join(f"<tr><th scope=\"row\">{esc(k)}</th>" + "".join(_num(r.metrics.get(k)) for r in rows) + "</tr>"
                   for k in mkeys)
    names = sorted({b for r in rows for b in r.baselines})
    trs += "".join(f"<tr><th scope=\"row\">baseline {esc(b)}</th>" + "".join(
        f"<td>{esc(', '.join(f'{c} {fmt(v, 4)}' for c, v in r.baselines.get(b, {}).items()) or 'n/a')}</td>"
        for r in rows) + "</tr>" for b in names)
    body.append(f"<table id=\"compare-metrics\"><thead><tr><th></th>{head}</tr></thead><tbody>{trs}</tbody></table>")
    if cls:
        cards = []
        for row, view, figs, err in per_entry:
            title = f"<h3><code>{esc(row.entry_id)}</code></h3>"
            if err:
                cards.append(f"<div class=\"card\">{title}<div class=\"error\">{esc(err)}</div></div>")
                continue
            link = f"/entries/{q(row.entry_id)}/classes/{view.c}"
            alphas = ", ".join(f"p{i} {float(view.alpha[i]):+.3f}" for i in range(view.k))
            what = "pushed training patches" if row.kind == "protopnet" else "top training patches"
            img = "".join(
                f"<figure><img src=\"{esc(url)}\" alt=\"{esc(kind)} of {esc(view.name)} in {esc(row.entry_id)}\" "
                f"loading=\"lazy\"><figcaption>{esc(caption)}</figcaption></figure>" if url else
                f"<p class=\"note\">No {esc(kind)} for this entry (see its class page).</p>"
                for kind, caption in (("gallery", f"what: {what}"), ("heatmaps", "where: on the class's test images"))
                for url in [(figs or {}).get(kind)])
            cards.append(f"<div class=\"card\">{title}<p><a href=\"{esc(link)}\">class {view.c}: "
                         f"{esc(view.name)}</a> (k = {view.k}; alpha: {esc(alphas)})</p>{img}</div>")
        body.append(f"<h2>Class {esc(cls)}: prototypes side by side</h2><div class=\"cols\">{''.join(cards)}</div>")
    body.append("<h2>Change the selection</h2>" + picker)
    return layout("Compare", "".join(body))


# ---------------------------------------------------------------------------------------------------- explain


def explain_page(rows: Sequence[Any], *, entry: str | None, limits: str, result: Mapping[str, Any] | None = None,
                 error: str | None = None) -> str:
    opts = "".join(f"<option value=\"{esc(r.entry_id)}\"{' selected' if r.entry_id == entry else ''}>"
                   f"{esc(r.entry_id)}</option>" for r in rows if not r.error)
    form = (
        "<form action=\"/explain\" method=\"post\" enctype=\"multipart/form-data\" class=\"card\" id=\"explain-form\">"
        f"<p><label>Entry <select name=\"entry\">{opts}</select></label></p>"
        "<p><label>Image <input type=\"file\" name=\"image\" accept=\"image/*\" required></label></p>"
        "<p><label>Top classes <input type=\"text\" name=\"top\" value=\"3\" size=\"3\"></label> "
        f"<button type=\"submit\">Explain</button></p><p class=\"note\">{esc(limits)}</p></form>"
    )
    body = ["<h1>Explain an image</h1>",
            "<p class=\"note\">The image goes through the same code as <code>phpn explain</code>: resized to the "
            "run's image size, normalised as the run's dataset, classified by the entry's model; each top class is "
            "shown with its prototypes' contributions and oriented heatmaps.</p>"]
    if error:
        body.append(f"<div class=\"error\" role=\"alert\">{esc(error)}</div>")
    if result:
        trs = "".join(
            f"<tr><td>{t['rank']}</td><td><a href=\"/entries/{q(result['entry_id'])}/classes/{t['class']}\">"
            f"{t['class']}: {esc(t['name'])}</a></td>{_num(t['logit'])}{_num(t['probability'])}"
            f"<td>{esc(', '.join(f'p{i} {v:+.3f}' for i, v in enumerate(t['contributions'])))}</td>"
            f"{_num(t['bias'])}</tr>" for t in result["top"])
        body.append(
            f"<h2>Result: <code>{esc(result['filename'])}</code> with <code>{esc(result['entry_id'])}</code></h2>"
            f"<p class=\"note\">{esc(result['width'])}x{esc(result['height'])} px -> {esc(result['image_size'])} px; "
            f"normalisation {esc(result['normalization'])}; {result['seconds']:.2f} s.</p>"
            "<table id=\"explain-top\"><thead><tr><th>#</th><th>class</th><th>logit</th><th>probability</th>"
            f"<th>contributions</th><th>bias</th></tr></thead><tbody>{trs}</tbody></table>"
            f"<figure><img id=\"explanation\" src=\"{esc(result['png_data_uri'])}\" alt=\"explanation of "
            f"{esc(result['filename'])}\"></figure>")
    body.append("<h2>" + ("Another image" if result else "Upload") + "</h2>" + form)
    return layout("Explain", "".join(body))
