"""Class pages that scale: a paged, searchable index and one bounded page per class, written in parallel.

A tiny real setup (SynthParts at 32 px, an untrained SynthPartsCNN in eval mode, a local feature store, a
decomposed head): the pages do not depend on the model being accurate.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from phpn_core import PartPrototypeHead, decompose_head
from phpn_core.data import SynthParts
from phpn_core.errors import InputValueError, ShapeError
from phpn_core.extract import extract_features
from phpn_core.models.split import split_classifier
from phpn_core.models.synthparts_cnn import SynthPartsCNN
from phpn_core.report.class_pages import build_class_pages, class_page_name, index_page_name
from phpn_core.report.html import build_report

pytestmark = pytest.mark.filterwarnings("ignore::phpn_core.method.nmf.NMFConvergenceWarning")

C, K, S = 7, 3, 48
NAMES = [f"Bird <{c}> {'alpha' if c % 2 else 'beta'}" for c in range(C)]  # escaped in the pages


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("class_pages")
    train = SynthParts(split="train", n_classes=C, n_per_class=4, image_size=S, seed=1)
    test = SynthParts(split="test", n_classes=C, n_per_class=2, image_size=S, seed=1)
    model = SynthPartsCNN(C, width=16).eval()
    features, weight, bias = split_classifier(model)
    store = extract_features(features, train, root / "train.zarr", model="synthparts_cnn", checkpoint_digest="0" * 64,
                             split="train", progress=False).store
    hd = decompose_head({c: store.class_features(c) for c in store.classes}, weight, K, seed=0, refine_iter=5,
                        nmf_options={"max_iter": 30})
    head = PartPrototypeHead.from_decomposition(hd, bias)
    rel = [float(v) for v in hd.rel_error]  # [C]
    return {"root": root, "train": train, "test": test, "features": features, "store": store, "head": head,
            "metrics": {"nmf_rel_error": rel, "consistency": {0: 50.0, 3: 75.0}}}


def _build(setup, out: Path, **kw) -> Path:
    args = dict(out_dir=out, head=setup["head"], features=setup["features"], test_dataset=setup["test"],
                train_dataset=setup["train"], train_store=setup["store"], class_names=NAMES,
                per_class_metrics=setup["metrics"], images_per_class=2, gallery_size=3, page_size=3,
                batch_classes=2, workers=4, title="tiny <run>")
    args.update(kw)
    return build_class_pages(**args)


@pytest.fixture(scope="module")
def pages(setup):
    out = setup["root"] / "run"
    # The run's report first (as build_report_task does), then the class pages, which link themselves from it.
    build_report(out_dir=out, head=setup["head"], features=setup["features"], test_dataset=setup["test"],
                 train_dataset=setup["train"], train_store=setup["store"], metrics={}, title="tiny",
                 images_per_class=1, gallery_size=2, max_classes=2, class_names=NAMES)
    return _build(setup, out)


def _hrefs(text: str) -> list[str]:
    return re.findall(r'href="([^"]+)"', text)


def test_every_class_has_a_page_reachable_from_the_index(pages):
    d = pages.parent
    assert pages == d / "index.html"
    n_pages = -(-C // 3)
    index_pages = [d / index_page_name(p) for p in range(1, n_pages + 1)]
    assert sorted(p.name for p in d.glob("index*.html")) == sorted(p.name for p in index_pages)
    linked: list[str] = []
    for p, path in enumerate(index_pages, start=1):
        text = path.read_text()
        assert '<input id="search" type="search"' in text and 'src="search.js"' in text
        assert text.count("<tbody>") == 1 and len(re.findall(r"<tr data-name=", text)) == min(3, C - 3 * (p - 1))
        hrefs = _hrefs(text)
        linked += [h for h in hrefs if re.fullmatch(r"c\d+\.html", h)]
        assert (index_page_name(p + 1) in hrefs) == (p < n_pages)  # next
        assert (index_page_name(p - 1) in hrefs) == (p > 1)  # prev
    assert sorted(linked) == sorted(class_page_name(c) for c in range(C))  # each class linked exactly once
    for c in range(C):
        page = (d / class_page_name(c)).read_text()
        assert f'href="{index_page_name(c // 3 + 1)}"' in page  # back to the index page that lists it
        assert f"Class {c}: Bird &lt;{c}&gt;" in page and "<Bird" not in page
        assert page.count("data:image/png;base64,") == 3  # where, what, why
        assert (c > 0) == ('rel="prev"' in page) and (c < C - 1) == ('rel="next"' in page)
    # every class is searchable by name, across pages
    js = (d / "search.js").read_text()
    assert all(f"[{c},\"Bird <{c}>" in js for c in range(C))
    # the run's report links to the index, once
    report = (d.parent / "report.html").read_text()
    assert report.count('href="classes/index.html"') == 1


def test_per_class_metrics_in_index_and_pages(pages):
    text = "".join(p.read_text() for p in pages.parent.glob("index*.html"))
    assert "<th scope=\"col\">nmf_rel_error</th>" in text and "<th scope=\"col\">consistency</th>" in text
    page3 = (pages.parent / class_page_name(3)).read_text()
    assert ">75</td>" in page3
    page1 = (pages.parent / class_page_name(1)).read_text()
    assert "<code>consistency</code></th><td class=\"num\">n/a</td>" in page1


def test_parallel_writes_the_same_bytes_as_serial(setup, tmp_path):
    a = _build(setup, tmp_path / "serial", workers=1).parent
    b = _build(setup, tmp_path / "parallel", workers=4, batch_classes=2).parent
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > C
    different = [str(f) for f in files_a if (a / f).read_bytes() != (b / f).read_bytes()]
    assert not different


def test_page_sizes_are_bounded_independently_of_C(setup, tmp_path):
    # Index pages hold at most page_size rows; class pages k x (images + gallery) cells: neither grows with the
    # number of classes written. The bounds below are constants (bytes), the same for 2 classes or all 7.
    page_size = 2
    index_bound = 8_000 + page_size * 400
    class_bound = 120_000  # 3 PNGs at 48 px, k = 3, 2 test images, 3 patches per prototype
    sizes = {}
    for n in (2, C):
        d = _build(setup, tmp_path / f"n{n}", classes=list(range(n)), page_size=page_size).parent
        idx = [p.stat().st_size for p in d.glob("index*.html")]
        cls = [p.stat().st_size for p in d.glob("c*.html")]
        assert len(idx) == -(-n // page_size) and len(cls) == n
        assert max(idx) <= index_bound, (max(idx), index_bound)
        assert max(cls) <= class_bound, (max(cls), class_bound)
        sizes[n] = (max(idx), max(cls))
    # more classes -> more pages, not bigger ones (pages of the 2-class run differ only in counts and links)
    assert sizes[C][0] <= sizes[2][0] + 200


def test_rebuild_replaces_old_pages(setup, tmp_path):
    out = tmp_path / "run"
    _build(setup, out, classes=[0, 1, 2, 3, 4])
    _build(setup, out, classes=[5, 6])
    assert sorted(p.name for p in (out / "classes").glob("c*.html")) == ["c5.html", "c6.html"]


def test_bad_inputs_say_what_to_fix(setup, tmp_path):
    with pytest.raises(ShapeError, match=r"expected C=7"):
        _build(setup, tmp_path, per_class_metrics={"nmf_rel_error": [0.1, 0.2]})
    with pytest.raises(InputValueError, match=r"distinct class indices in \[0, 7\)"):
        _build(setup, tmp_path, classes=[0, 0])
    with pytest.raises(InputValueError, match=r"workers must be an int >= 1"):
        _build(setup, tmp_path, workers=0)


# -- the per-class Prefect table of `phpn run` stays bounded ---------------------------------------------------------



@settings(max_examples=60, deadline=None)
@given(errors=st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=300), n=st.integers(1, 12),
       data=st.data())
def test_artifact_table_is_the_worst_and_best_classes_bounded_whatever_C(errors, n, data):
    from flows.decompose import class_extremes

    classes = sorted(data.draw(st.sets(st.integers(0, len(errors) - 1), min_size=1)))
    picks = class_extremes(errors, classes, n)
    chosen = [c for c, _ in picks]
    assert len(picks) <= 2 * n and len(set(chosen)) == len(chosen) and set(chosen) <= set(classes)
    assert len(picks) == min(len(classes), 2 * n)
    worst = [c for c, r in picks if r == "worst"]
    best = [c for c, r in picks if r == "best"]
    assert len(worst) == min(n, len(classes))
    rest = [c for c in classes if c not in chosen]
    # every class left out lies between the worst and the best shown
    if rest:
        assert min(errors[c] for c in worst) >= max(errors[c] for c in rest)
        assert max(errors[c] for c in best) <= min(errors[c] for c in rest)
