"""The HTML report, the plot primitives and the single-image explanation.

One small real setup (SynthParts, a briefly trained SynthPartsCNN, a local feature store, a decomposed head, a
published registry entry) is built once for the module; the report is opened in real headless Chromium.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from phpn_core import PartPrototypeHead, decompose_head
from phpn_core.models.split import split_classifier
from phpn_core.data import SynthParts
from phpn_core.data.images import ImageLoadError
from phpn_core.errors import InputValueError, PhpnError, ShapeError
from phpn_core.report.explain import explain_image_file, resolve_checkpoint
from phpn_core.extract import extract_features
from phpn_core.models.synthparts_cnn import save_model, train_synthparts_cnn
from phpn_core.models.spec import CheckpointError, checkpoint_digest
from phpn_core.storage.registry import PrototypeRegistry, decomposition_tensors
from phpn_core.report.html import build_report, format_value, gallery_patches
from phpn_core.report import figures as viz

# A briefly trained model: NMF may stop at its iteration limit; that is not what these tests are about.
pytestmark = pytest.mark.filterwarnings("ignore::phpn_core.method.nmf.NMFConvergenceWarning")

N_CLASSES, K, S = 4, 3, 64
METRICS = {
    "accuracy_original": 0.9375,
    "accuracy_decomposed": 0.9375,
    "max_abs_logit_diff": 2.384185791015625e-07,
    "max_head_reconstruction_error": 1.1920928955078125e-07,
    "consistency": 83.33333,
    "stability": None,  # tolerated: shown as n/a
    "insertion_auc": 0.61349,
    "n_classes": N_CLASSES,
    "k": K,
    "seconds": 12.3456,
    "note": "<script>alert(1)</script>",  # escaped, never executed
    "baselines": {
        "plain_nmf": {"consistency": 91.66667, "stability": 75.5, "insertion_auc": 0.4321},
        "dff": {"consistency": 41.0, "stability": None, "deletion_auc": 0.2468},
        "gradcam": {"consistency": 12.5, "box_stability": 0.8642},
    },
}


# ------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    root = tmp_path_factory.mktemp("report")
    train = SynthParts(split="train", n_classes=N_CLASSES, n_per_class=10, image_size=S, seed=1)
    test = SynthParts(split="test", n_classes=N_CLASSES, n_per_class=5, image_size=S, seed=1)
    model = train_synthparts_cnn(train, epochs=2, width=32, progress=False, seed=0)
    features, weight, bias = split_classifier(model)
    run = root / "run"
    ckpt = run / "model" / "synthparts_cnn.safetensors"  # where the synthparts flow writes its trained model
    save_model(model, ckpt)
    digest = checkpoint_digest(ckpt)
    store = extract_features(features, train, run / "features" / "train.zarr", model="synthparts_cnn",
                             checkpoint_digest=digest, split="train", progress=False).store
    hd = decompose_head({c: store.class_features(c) for c in store.classes}, weight, K, seed=0, refine_iter=20,
                        nmf_options={"max_iter": 100})
    head = PartPrototypeHead.from_decomposition(hd, bias)
    return {"root": root, "run": run, "train": train, "test": test, "model": model, "features": features,
            "weight": weight, "bias": bias, "store": store, "head": head, "hd": hd, "ckpt": ckpt, "digest": digest}


@pytest.fixture(scope="module")
def report(setup):
    out = setup["root"] / "out"
    path = build_report(out_dir=out, head=setup["head"], features=setup["features"], test_dataset=setup["test"],
                        train_dataset=setup["train"], train_store=setup["store"], metrics=METRICS,
                        title="phpn test <report>", device="cpu", images_per_class=3, gallery_size=4)
    return path


def _img_tags(html: str) -> list[str]:
    return re.findall(r"<img\b[^>]*>", html)


def _attr(tag: str, name: str) -> str | None:
    m = re.search(rf'\b{name}="([^"]*)"', tag)
    return m.group(1) if m else None


def _decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im.convert("RGB"), dtype=np.float64)


@pytest.fixture(scope="session")
def chromium():
    """Debian's headless Chromium; installed with apt-get when missing and running as root."""
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if path is None:
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            pytest.skip("chromium is not installed and the tests do not run as root, so they cannot install it; "
                        "install it with: apt-get install -y chromium")
        try:
            r = subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium",
                               shell=True, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            pytest.skip("installing chromium with apt-get took over 15 minutes")
        path = shutil.which("chromium")
        if path is None:
            pytest.skip(f"could not install chromium with apt-get (exit {r.returncode}): {r.stderr.strip()[-300:]}")
    return path


def _chromium(binary: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp / "profile"
    profile.mkdir(exist_ok=True)
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
           f"--user-data-dir={profile}", *args]
    env = {**os.environ, "HOME": str(tmp)}
    return subprocess.run(cmd, capture_output=True, timeout=120, env=env)


# ---------------------------------------------------------------------------------------------------- the report


def test_report_is_self_contained_and_every_image_decodes(report):
    html = report.read_text(encoding="utf-8")
    assert report.name == "report.html" and report.is_file()
    tags = _img_tags(html)
    # per class: heatmaps, gallery, contributions; plus the baselines chart
    assert len(tags) == 3 * N_CLASSES + 1
    for tag in tags:
        src, alt = _attr(tag, "src"), _attr(tag, "alt")
        assert src is not None and src.startswith("data:image/png;base64,"), tag[:120]
        assert alt and len(alt) > 20, f"missing alt text: {tag[:120]}"
        pixels = _decode_png(base64.b64decode(src.split(",", 1)[1], validate=True))
        assert pixels.shape[0] > 50 and pixels.shape[1] > 50
        assert pixels.std() > 5.0, "blank image"
    # no other external resource
    assert not re.search(r'\b(?:src|href)="(?!data:|#)', html)
    assert "<link" not in html


def test_report_pngs_are_written_and_equal_the_embedded_images(report):
    html = report.read_text(encoding="utf-8")
    png_dir = report.parent / "report_png"
    files = sorted(p.name for p in png_dir.glob("*.png"))
    expected = sorted([f"class-{c:03d}-{kind}.png" for c in range(N_CLASSES)
                       for kind in ("heatmaps", "gallery", "contributions")] + ["summary-baselines.png"])
    assert files == expected
    embedded = {base64.b64decode(_attr(t, "src").split(",", 1)[1]) for t in _img_tags(html)}
    for name in files:
        assert (png_dir / name).read_bytes() in embedded, name


def test_report_tables_show_the_metrics(report):
    html = report.read_text(encoding="utf-8")
    for key, value in METRICS.items():
        if key == "baselines":
            continue
        assert key in html
        shown = format_value(value) if key != "note" else "&lt;script&gt;alert(1)&lt;/script&gt;"
        assert f'<code>{key}</code></th><td class="num">{shown}</td>' in html, key
    assert format_value(0.9375) == "0.9375" and format_value(None) == "n/a" and format_value(12.3456) == "12.35"
    assert "<script>alert(1)</script>" not in html  # the metric text is escaped
    assert "phpn test &lt;report&gt;" in html
    # the comparison table: phpn and every baseline, with their values (None as n/a)
    table = html[html.index('<table class="baselines"'):]
    table = table[: table.index("</table>")]
    for name in ("phpn (this run)", "plain_nmf", "dff", "gradcam"):
        assert f">{name}</th>" in table
    for v in ("83.33", "91.67", "75.5", "41", "12.5", "n/a", "0.4321", "0.2468", "0.8642", "0.6135"):
        assert f">{v}</td>" in table, v
    # the keypoint-free columns follow ProtoEval's, in a fixed order
    heads = re.findall(r'<th scope="col">([a-z_]+)</th>', table)
    assert heads == ["method", "consistency", "stability", "insertion_auc", "deletion_auc", "box_stability"], heads
    for c in range(N_CLASSES):
        assert f'id="class-{c}"' in html and f'href="#class-{c}"' in html
    why = re.findall(r'<li><code>[^<]+</code>: ((?:This is|Evidence for) class_\d\d \(logit -?\d+\.\d\d\)[^<]*)</li>', html)
    assert len(why) == 3 * N_CLASSES, why


def test_report_tolerates_missing_metrics_and_selects_classes(setup, tmp_path):
    path = build_report(out_dir=tmp_path, head=setup["head"], features=setup["features"], test_dataset=setup["test"],
                        train_dataset=setup["train"], train_store=setup["store"], metrics={"consistency": None},
                        title="t", classes=[2], images_per_class=1, gallery_size=2)
    html = path.read_text(encoding="utf-8")
    assert len(_img_tags(html)) == 3 and 'id="class-2"' in html and 'id="class-0"' not in html
    assert "Comparison with baselines" not in html
    with pytest.raises(InputValueError, match="classes"):
        build_report(out_dir=tmp_path, head=setup["head"], features=setup["features"], test_dataset=setup["test"],
                     train_dataset=setup["train"], train_store=setup["store"], metrics=None, title="t", classes=[9])
    with pytest.raises(InputValueError, match="images_per_class"):
        build_report(out_dir=tmp_path, head=setup["head"], features=setup["features"], test_dataset=setup["test"],
                     train_dataset=setup["train"], train_store=setup["store"], metrics=None, title="t",
                     images_per_class=0)


def test_report_opens_in_headless_chromium(report, chromium, tmp_path):
    html = report.read_text(encoding="utf-8")
    n_img = len(_img_tags(html))
    shot = tmp_path / "shot.png"
    r = _chromium(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", report.as_uri())
    assert r.returncode == 0 and shot.is_file(), r.stderr.decode(errors="replace")[-2000:]
    pixels = _decode_png(shot.read_bytes())
    assert pixels.shape[:2] == (2000, 1200)
    gray = pixels.mean(-1)
    assert gray.std() > 10.0 and (gray < 200).mean() > 0.02, "the screenshot is (nearly) blank"
    # every image of the page decoded in the browser (the page's own onload script counts them)
    r = _chromium(chromium, tmp_path, "--virtual-time-budget=5000", "--dump-dom", report.as_uri())
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    m = re.search(r'data-images-loaded="(\d+)/(\d+)"', r.stdout.decode(errors="replace"))
    assert m, "the page's load script did not run"
    assert (int(m.group(1)), int(m.group(2))) == (n_img, n_img)


def test_gallery_patches_come_from_the_class_training_images(setup):
    gal = gallery_patches(setup["head"], 1, train_store=setup["store"], train_dataset=setup["train"], size=4)
    assert len(gal) == K
    ids = set(setup["store"].class_image_ids(1))
    for row in gal:
        assert len(row) == 4 and len({g.image_id for g in row}) == 4  # one patch per training image
        scores = [g.score for g in row]
        assert scores == sorted(scores, reverse=True)
        for g in row:
            assert g.image_id in ids
            assert tuple(g.patch.shape) == (3, 20, 20)  # the ProtoEval box at 64 px: 2 * round(36 * 64 / 224)
            image = setup["train"][g.dataset_index]["image"]
            # the patch is a crop of that image
            windows = image.unfold(1, 20, 1).unfold(2, 20, 1)  # [3, S-19, S-19, 20, 20]
            assert (windows == g.patch[:, None, None]).flatten(3).all(-1).all(0).any()


# -------------------------------------------------------------------------------------------- plot primitives


def test_heatmap_overlay_peaks_hot_where_the_map_peaks():
    image = torch.full((3, 32, 32), 0.5)
    hm = torch.zeros(4, 4)
    hm[1, 2] = 3.0
    out = viz.heatmap_overlay(image, hm, alpha=0.6)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    y, x = 1 * 8 + 4, 2 * 8 + 4
    assert out[y, x, 0] > out[y, x, 2] + 0.25  # jet: (dark) red at the peak
    assert out[28, 4, 2] > out[28, 4, 0] + 0.2  # blue far from it
    assert torch.equal(image, torch.full((3, 32, 32), 0.5))  # input untouched
    with pytest.raises(ShapeError, match=r"\[h, w\]"):
        viz.heatmap_overlay(image, torch.zeros(1, 4, 4))
    with pytest.raises(InputValueError, match="alpha"):
        viz.heatmap_overlay(image, hm, alpha=1.5)


def test_render_heatmap_grid_size_scales_with_cells():
    images, maps = torch.rand(2, 3, 48, 48), torch.rand(2, 3, 3, 3)
    sizes = {}
    for cell in (50, 80):
        png = viz.render_heatmap_grid(images, maps, cell_px=cell)
        sizes[cell] = viz.png_size(png)
        assert _decode_png(png).std() > 5
    # (k + 1) = 4 columns and n = 2 rows of cells; gaps and labels do not depend on the cell size
    assert sizes[80][0] - sizes[50][0] == 4 * 30
    assert sizes[80][1] - sizes[50][1] == 2 * 30
    assert viz.png_size(viz.render_heatmap_grid(images, maps, cell_px=50, show_image=False))[0] == sizes[50][0] - 53
    with pytest.raises(ShapeError, match="same n"):
        viz.render_heatmap_grid(images, maps[:1])
    with pytest.raises(InputValueError, match="scale"):
        viz.render_heatmap_grid(images, maps, scale="per-pixel")


def test_contribution_charts_and_gallery_have_the_expected_sizes():
    fig = viz.plot_contributions(torch.tensor([1.0, -0.5, 0.25]), bias=0.1, width_px=360, height_px=240)
    png = viz.figure_to_png(fig)
    assert viz.png_size(png) == (360, 240) and _decode_png(png).std() > 5
    fig = viz.plot_heatmap_overlay(torch.rand(3, 40, 40), torch.rand(5, 5), scale=2.0, colorbar=True)
    assert viz.png_size(viz.figure_to_png(fig)) == (40 * 2 + 90, 40 * 2 + 20)
    panel = viz.bar_panel(torch.tensor([1.0, -0.5, 0.25]), bias=0.1, size=(300, 220))
    assert panel.shape == (220, 300, 3) and panel.std() > 0.05
    one = viz.png_size(viz.render_contributions(torch.randn(1, 3), bias=0.0, max_cols=4))
    five = viz.png_size(viz.render_contributions(torch.randn(5, 3), bias=torch.zeros(5), max_cols=4))
    assert five[0] - one[0] == 3 * (300 + 8) and five[1] - one[1] == 220 + 8
    patches = [[torch.rand(3, 12, 12) for _ in range(4)], [torch.rand(3, 12, 12)], []]
    png = viz.render_gallery(patches, cell_px=40)
    w, h = viz.png_size(png)
    assert w >= 4 * 40 + 3 * 3 and h >= 3 * 40 + 2 * 3 and _decode_png(png).std() > 5
    with pytest.raises(ShapeError, match=r"\[k\]"):
        viz.plot_contributions(torch.zeros(2, 3))


# ----------------------------------------------------------------------------------------- explain_image_file


def _publish(setup, registry: Path, *, checkpoint: str | None, arch: str = "synthparts_cnn", digest: str | None = None,
             tag: str = "0123456789abcdef") -> tuple[str, str]:
    reg = PrototypeRegistry(registry)
    entry = PrototypeRegistry.entry_id(arch, "synthparts", K, tag)
    hd = setup["hd"]
    reg.write_classes(entry, hd.classes, decomposition_tensors(hd))
    meta = {"config": {"model": {"arch": arch, "checkpoint": checkpoint},
                       "dataset": {"kind": "synthparts", "image_size": S}},
            "features": {"train": str(setup["run"] / "features" / "train.zarr")},
            "model_checkpoint_digest": digest if digest is not None else setup["digest"]}
    reg.publish(entry, n_classes=N_CLASSES, bias=setup["bias"], metadata=meta)
    return str(registry), entry


@pytest.fixture(scope="module")
def image_file(setup):
    path = setup["root"] / "input.png"
    item = setup["test"][6]  # class 1
    Image.fromarray((item["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).resize((90, 70)).save(path)
    return path


def test_explain_image_file_with_the_run_layout(setup, image_file):
    # config checkpoint None (the run trained the CNN): found at <registry>/../model/ and digest-verified
    registry, entry = _publish(setup, setup["run"] / "registry", checkpoint=None)
    out = setup["root"] / "explained" / "x.png"
    assert explain_image_file(image_file, registry_uri=registry, entry_id=entry, out=out, top=2) == out
    with Image.open(out) as im:
        im.load()
        assert im.text["phpn:normalization"] == "synthparts"
        classes = [int(c) for c in im.text["phpn:classes"].split(",")]
        pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert len(classes) == 2
    with torch.inference_mode():
        from phpn_core.data.images import load_image
        from phpn_core.data.base import normalize

        x, _ = load_image(image_file, image_size=S)
        logits = setup["model"](normalize(x[None], (0.5,) * 3, (0.5,) * 3))[0]
    assert classes == logits.topk(2).indices.tolist()  # the original model's top classes
    assert pixels.std() > 10 and pixels.shape[0] > 2 * 64 and pixels.shape[1] > (K + 1) * 64


def test_explain_image_file_with_a_recorded_checkpoint_and_from_the_cli(setup, image_file, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    registry, entry = _publish(setup, tmp_path / "elsewhere" / "registry", checkpoint=str(setup["ckpt"]))
    out = tmp_path / "cli.png"
    res = CliRunner().invoke(app, ["explain", str(image_file), "--registry", registry, "--entry", entry,
                                   "--out", str(out), "--top", "1"])
    assert res.exit_code == 0, res.output
    assert _decode_png(out.read_bytes()).std() > 10


def test_explain_image_file_errors_say_what_to_do(setup, image_file, tmp_path):
    bad = tmp_path / "broken.png"
    data = image_file.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated
    registry, entry = _publish(setup, setup["run"] / "registry", checkpoint=None)
    with pytest.raises(ImageLoadError, match="broken.png"):
        explain_image_file(bad, registry_uri=registry, entry_id=entry, out=tmp_path / "o.png")
    with pytest.raises(ImageLoadError, match="missing.png"):
        explain_image_file(tmp_path / "missing.png", registry_uri=registry, entry_id=entry, out=tmp_path / "o.png")
    # a registry away from its run directory, no checkpoint recorded: a clear error naming the fix
    reg2, entry2 = _publish(setup, tmp_path / "lonely" / "registry", checkpoint=None)
    # (the features URI still points into the run directory, so the model is found there; drop that hint)
    info = PrototypeRegistry(reg2).info(entry2)
    info = info.model_copy(update={"metadata": {**info.metadata, "features": {}}})
    with pytest.raises(CheckpointError, match=r"checkpoint="):
        resolve_checkpoint(info, registry_uri=reg2)
    # the model file found does not have the recorded digest
    reg3, entry3 = _publish(setup, setup["run"] / "registry", checkpoint=None, digest="f" * 64, tag="fedcba9876543210")
    with pytest.raises(CheckpointError, match="sha256"):
        explain_image_file(image_file, registry_uri=reg3, entry_id=entry3, out=tmp_path / "o.png")
    # another architecture without a checkpoint
    info4 = info.model_copy(update={"metadata": {"config": {"model": {"arch": "resnet18", "checkpoint": None}}}})
    with pytest.raises(CheckpointError, match="pass it"):
        resolve_checkpoint(info4, registry_uri=reg2)
    for err in (ImageLoadError, CheckpointError):
        assert issubclass(err, PhpnError)  # what `phpn explain` reports as a clean error
