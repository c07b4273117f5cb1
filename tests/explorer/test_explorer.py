"""The prototype explorer (``phpn serve``): API and pages over a real tiny run, on local disk and on S3 (moto), and
in real headless Chromium (pages load, every image decodes, an upload is explained, screenshots are not blank).

One small real run is built once for the module (SynthParts 3 classes at 64 px, a briefly trained SynthPartsCNN,
train and test feature stores, two published entries with k = 3 and k = 2, the run's metrics.json), laid out as
``phpn demo`` lays out its run directory.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.filterwarnings("ignore::phpn_core.method.nmf.NMFConvergenceWarning")

N_CLASSES, S = 3, 64
DATASET = {"kind": "synthparts", "image_size": S, "n_classes": N_CLASSES, "train_per_class": 8, "test_per_class": 4,
           "seed": 3}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _decode(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        im.load()
        return np.asarray(im.convert("RGB"), dtype=np.float64)


def _publish(run: Path, registry_uri: str, *, hd, bias, k: int, tag: str, stores: dict, digest: str,
             storage_options=None) -> str:
    from phpn_core.storage.registry import PrototypeRegistry, decomposition_tensors

    reg = PrototypeRegistry(registry_uri, storage_options=storage_options)
    entry = PrototypeRegistry.entry_id("synthparts_cnn", "synthparts", k, tag)
    reg.write_classes(entry, hd.classes, decomposition_tensors(hd))
    meta = {"config": {"model": {"arch": "synthparts_cnn", "checkpoint": None}, "dataset": DATASET},
            "run": f"explorer-test-k{k}", "features": stores, "model_checkpoint_digest": digest}
    reg.publish(entry, n_classes=N_CLASSES, bias=bias, metadata=meta)
    return entry


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from phpn_core import decompose_head
    from phpn_core.config import DatasetConfig
    from phpn_core.data.factory import build_dataset
    from phpn_core.extract import extract_features
    from phpn_core.models.spec import checkpoint_digest
    from phpn_core.models.split import split_classifier
    from phpn_core.models.synthparts_cnn import save_model, train_synthparts_cnn

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    root = tmp_path_factory.mktemp("explorer") / "run"
    train = build_dataset(DatasetConfig(**DATASET), "train")
    test = build_dataset(DatasetConfig(**DATASET), "test")
    model = train_synthparts_cnn(train, epochs=1, width=16, progress=False, seed=0).eval()
    ckpt = root / "model" / "synthparts_cnn.safetensors"
    save_model(model, ckpt)
    digest = checkpoint_digest(ckpt)
    features, weight, bias = split_classifier(model)
    stores, fps = {}, {}
    for split, ds in (("train", train), ("test", test)):
        res = extract_features(features, ds, root / "features" / f"{split}.zarr", model="synthparts_cnn",
                               checkpoint_digest=digest, split=split, progress=False)
        stores[split], fps[split] = str(root / "features" / f"{split}.zarr"), res.store.fingerprint
    meta_stores = {**stores, "train_fingerprint": fps["train"], "test_fingerprint": fps["test"]}
    from phpn_core.storage.feature_store import FeatureStore

    store = FeatureStore.open(stores["train"])
    feats = {c: store.class_features(c) for c in store.classes}
    hds = {k: decompose_head(feats, weight, k, seed=0, refine_iter=10, nmf_options={"max_iter": 60}) for k in (3, 2)}
    registry = str(root / "registry")
    entries = {k: _publish(root, registry, hd=hds[k], bias=bias, k=k, tag=f"{k}" * 16, stores=meta_stores,
                           digest=digest) for k in (3, 2)}
    metrics = {"entry_id": entries[3], "accuracy_original": 0.75, "accuracy_decomposed": 0.75,
               "max_abs_logit_diff": 1e-6, "consistency": 66.5, "stability": 80.25,
               "insertion_auc": 0.6125, "deletion_auc": 0.2375, "box_stability": 0.8125, "redundancy": 0.4375,
               "duplicate_rate": 0.0,
               "baselines": {"plain_nmf": {"consistency": 70.0, "stability": 81.0, "insertion_auc": 0.5625},
                             "gradcam": {"insertion_auc": 0.6875, "deletion_auc": 0.1875}}}
    (root / "metrics.json").write_text(json.dumps(metrics))
    return {"root": root, "registry": registry, "entries": entries, "hds": hds, "bias": bias, "model": model,
            "test": test, "train": train, "stores": meta_stores, "digest": digest, "metrics": metrics}


@pytest.fixture(scope="module")
def client(run):
    from fastapi.testclient import TestClient

    from explorer.app import create_app

    return TestClient(create_app(run["registry"]), raise_server_exceptions=False)


def _png_of(run, c: int) -> bytes:
    item = next(run["test"][i] for i in range(len(run["test"])) if run["test"][i]["label"] == c)
    buf = io.BytesIO()
    Image.fromarray((item["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).resize((80, 70)).save(
        buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ API and pages


def test_entries_api_and_table_show_every_entry_with_its_metrics(run, client):
    r = client.get("/api/entries")
    assert r.status_code == 200
    rows = r.json()
    assert isinstance(rows, list) and sorted(x["entry_id"] for x in rows) == sorted(run["entries"].values())
    by_k = {x["k"]: x for x in rows}
    assert by_k[3]["metrics"]["consistency"] == 66.5 and by_k[3]["metrics_source"].endswith("metrics.json")
    assert by_k[3]["baselines"] == run["metrics"]["baselines"]
    assert by_k[3]["metrics"]["insertion_auc"] == 0.6125 and by_k[3]["metrics"]["redundancy"] == 0.4375
    assert by_k[2]["metrics"] == {}  # metrics.json names the other entry: not borrowed
    assert all(x["n_classes"] == N_CLASSES and x["model"] == "synthparts_cnn" for x in rows)
    page = client.get("/").text
    for eid in run["entries"].values():
        assert f'href="/entries/{eid}"' in page
    assert "66.5" in page and "80.25" in page and "plain_nmf: 70 / 81" in page
    assert "insertion AUC" in page and "0.613" in page and "0.438" in page
    # the entry's page: the keypoint-free metrics, one row per method
    entry = client.get(f"/entries/{run['entries'][3]}").text
    table = entry[entry.index('<table id="keypoint-free"'):]
    table = table[: table.index("</table>")]
    for method in ("phpn", "plain_nmf", "gradcam"):
        assert f'<th scope="row">{method}</th>' in table
    assert "0.6125" in table and "0.5625" in table and "0.1875" in table and "n/a" in table
    assert page.count('class="sortable"') >= 12 and "phpnFilter" in page  # sortable, filterable


def test_class_api_by_index_and_name_is_exact(run, client):
    eid = run["entries"][3]
    by_index = client.get(f"/api/entries/{eid}/classes/1").json()
    by_name = client.get(f"/api/entries/{eid}/classes/class_01").json()
    assert by_index == by_name and by_index["name"] == "class_01" and by_index["k"] == 3
    hd = run["hds"][3]
    for i, p in enumerate(by_index["prototypes"]):
        assert p["alpha"] == pytest.approx(float(hd.alpha[1, i]), rel=1e-5)
        assert p["sign"] == (1 if float(hd.alpha[1, i]) >= 0 else -1)
        assert len(p["gallery"]) == 6 and all(g["image_id"].startswith("train-") for g in p["gallery"])
        scores = [g["score"] for g in p["gallery"]]
        assert scores == sorted(scores, reverse=True)
    # contributions + bias = logit (the explanation is exact), and the logit is the original model's
    from phpn_core.data.base import normalize

    test = run["test"]
    for img in by_index["test_images"]:
        assert sum(img["contributions"]) + by_index["bias"] == pytest.approx(img["logit"], abs=1e-4)
        idx = next(i for i in range(len(test)) if test[i]["image_id"] == img["image_id"])
        with torch.inference_mode():
            logits = run["model"](normalize(test[idx]["image"][None], test.mean, test.std))[0]
        assert float(logits[1]) == pytest.approx(img["logit"], abs=1e-3)
        assert int(logits.argmax()) == img["predicted"]
    assert [c["name"] for c in client.get(f"/api/entries/{eid}/classes").json()] == ["class_00", "class_01",
                                                                                       "class_02"]


def test_class_page_and_its_figures(run, client):
    eid = run["entries"][3]
    r = client.get(f"/entries/{eid}/classes/2")
    assert r.status_code == 200 and "Class 2: class_02" in r.text
    srcs = re.findall(r'<img src="([^"]+)"', r.text)
    assert len(srcs) == 3
    for src in srcs:
        png = client.get(src.replace("&amp;", "&"))
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        px = _decode(png.content)
        assert px.shape[0] > 60 and px.shape[1] > 100 and px.std() > 5, src
    assert client.get(f"/entries/{eid}/class", params={"q": "CLASS_02"}, follow_redirects=False).headers[
        "location"] == f"/entries/{eid}/classes/2"
    assert client.get(f"/entries/{eid}").text.count('class="cls"') == N_CLASSES
    # rendered once, then served from the cache
    stats = client.get("/api/stats").json()
    again = client.get(srcs[0].replace("&amp;", "&"))
    assert again.status_code == 200 and client.get("/api/stats").json()["pngs"]["hits"] == stats["pngs"]["hits"] + 1


def test_compare_two_entries_side_by_side(run, client):
    a, b = run["entries"][3], run["entries"][2]
    r = client.get("/api/compare", params=[("ids", a), ("ids", b), ("cls", "class_00")])
    assert r.status_code == 200
    body = r.json()
    assert [e["entry_id"] for e in body["entries"]] == [a, b]
    assert [len(c["prototypes"]) for c in body["class"]] == [3, 2]
    html = client.get("/compare", params=[("ids", a), ("ids", b), ("cls", "0")]).text
    assert "compare-metrics" in html and html.count("gallery of class_00") == 2


@pytest.mark.parametrize("path,status", [
    ("/entries/%2e%2e", 400), ("/api/entries/%2E%2E", 400), ("/entries/.hidden", 400), ("/api/entries/a..b", 400),
    ("/entries/%2e%2e%2f%2e%2e%2fetc%2fpasswd", 404), ("/api/entries/..%2f..%2fetc/classes/0", 404),
    ("/api/entries/nope--x--k1--000000000000", 404), ("/entries/{e}/classes/7", 404),
    ("/entries/{e}/classes/no-such-class", 404), ("/api/entries/{e}/classes/0/evil.png", 404),
    ("/api/compare?ids=../../x&ids=y", 400),
])
def test_ids_are_validated_and_errors_are_pages(run, client, path, status):
    r = client.get(path.replace("{e}", run["entries"][3]))
    assert r.status_code == status, r.text[:300]
    if path.startswith("/api"):
        assert r.json()["status"] == status and r.json()["detail"]
    else:
        assert r.headers["content-type"].startswith("text/html") and 'role="alert"' in r.text


def test_missing_and_corrupt_objects_give_error_pages(run, tmp_path):
    from fastapi.testclient import TestClient

    from explorer.app import create_app

    reg = tmp_path / "registry"
    shutil.copytree(run["registry"], reg)
    e3, e2 = run["entries"][3], run["entries"][2]
    (head,) = list((reg / "objects" / e3).glob("*/head.safetensors"))
    data = bytearray(head.read_bytes())
    data[-10:] = b"\x00" * 10
    head.write_bytes(bytes(data))  # corrupt: the sha256 no longer matches the pointer
    pointer = reg / "entries" / f"{e2}.json"
    info = json.loads(pointer.read_text())
    info["metadata"]["features"]["train"] = str(tmp_path / "gone.zarr")  # a training store that does not exist
    pointer.write_text(json.dumps(info))
    (reg / "entries" / "broken--x--k1--000000000000.json").write_text("{not json")
    c = TestClient(create_app(str(reg)), raise_server_exceptions=False)
    rows = c.get("/api/entries").json()
    assert {r["entry_id"]: bool(r["error"]) for r in rows} == {e3: False, e2: False,
                                                               "broken--x--k1--000000000000": True}
    assert "unreadable" in c.get("/").text
    r = c.get(f"/entries/{e3}/classes/0")
    assert r.status_code == 502 and "Corrupt object head.safetensors" in r.text and 'role="alert"' in r.text
    assert c.get(f"/api/entries/{e3}/classes/0/gallery.png").status_code == 502
    r = c.get(f"/entries/{e2}/classes/0")  # no training store: the page still renders, saying why
    assert r.status_code == 200 and "No gallery: " in r.text and "gone.zarr" in r.text
    assert c.get(f"/api/entries/{e2}/classes/0/gallery.png").status_code == 404
    assert c.get(f"/api/entries/{e2}/classes/0/heatmaps.png").status_code == 200
    assert c.get("/entries/broken--x--k1--000000000000").status_code == 502
    assert c.get("/").status_code == 200  # still serving


def test_upload_is_explained_as_phpn_explain_does_and_capped(run, tmp_path):
    from fastapi.testclient import TestClient

    from explorer.app import create_app
    from phpn_core.report.explain import explain_image_file

    c = TestClient(create_app(run["registry"], max_upload_bytes=200_000, max_pixels=200 * 200),
                   raise_server_exceptions=False)
    eid = run["entries"][3]
    png = _png_of(run, 2)
    r = c.post("/api/explain", data={"entry": eid, "top": "2"}, files={"image": ("bird.png", png, "image/png")})
    assert r.status_code == 200, r.text
    res = r.json()
    (tmp_path / "bird.png").write_bytes(png)
    out = explain_image_file(tmp_path / "bird.png", registry_uri=run["registry"], entry_id=eid,
                             out=tmp_path / "cli.png", top=2)
    with Image.open(out) as im:
        assert [t["class"] for t in res["top"]] == [int(x) for x in im.text["phpn:classes"].split(",")]
    for t in res["top"]:
        assert sum(t["contributions"]) + t["bias"] == pytest.approx(t["logit"], abs=1e-4)
    assert (res["width"], res["height"]) == (80, 70) and res["image_size"] == S
    assert _decode(base64.b64decode(res["png_data_uri"].split(",", 1)[1])).std() > 10
    page = c.post("/explain", data={"entry": eid}, files={"image": ("bird.png", png, "image/png")})
    assert page.status_code == 200 and 'id="explanation"' in page.text
    # caps and bad input
    big = io.BytesIO()
    Image.new("RGB", (300, 300), "white").save(big, format="PNG")
    r = c.post("/api/explain", data={"entry": eid}, files={"image": ("big.png", big.getvalue(), "image/png")})
    assert r.status_code == 413 and "pixels" in r.json()["detail"]
    r = c.post("/api/explain", data={"entry": eid}, files={"image": ("x.png", os.urandom(200_001), "image/png")})
    assert r.status_code == 413 and "bytes" in r.json()["detail"]
    r = c.post("/api/explain", data={"entry": eid}, files={"image": ("x.png", os.urandom(3000), "image/png")})
    assert r.status_code == 400 and "not an image" in r.json()["detail"]
    r = c.post("/api/explain", data={"entry": "../etc"}, files={"image": ("b.png", png, "image/png")})
    assert r.status_code == 400
    r = c.post("/explain", data={"entry": eid, "top": "0"}, files={"image": ("b.png", png, "image/png")})
    assert r.status_code == 400 and 'role="alert"' in r.text


def test_api_against_an_s3_registry(run, s3_server, s3_bucket):
    import s3fs
    from fastapi.testclient import TestClient

    from explorer.app import create_app

    opts = s3_server.storage_options
    fs = s3fs.S3FileSystem(**opts)
    bucket = s3_bucket.removeprefix("s3://")
    stores = dict(run["stores"])
    for split in ("train", "test"):
        fs.put(run["stores"][split], f"{bucket}/features/{split}.zarr", recursive=True)
        stores[split] = f"{s3_bucket}/features/{split}.zarr"
    registry = f"{s3_bucket}/registry"
    eid = _publish(run["root"], registry, hd=run["hds"][3], bias=run["bias"], k=3, tag="3" * 16, stores=stores,
                   digest=run["digest"], storage_options=opts)
    eid2 = _publish(run["root"], registry, hd=run["hds"][2], bias=run["bias"], k=2, tag="2" * 16, stores=stores,
                    digest=run["digest"], storage_options=opts)
    from phpn_core.storage.registry import PrototypeRegistry

    # far from any run directory: the metrics the run recorded beside the version are what the explorer shows
    s3reg = PrototypeRegistry(registry, storage_options=opts)
    s3reg.record_metrics(eid, {**run["metrics"], "entry_id": eid, "consistency": 61.25},
                         version=s3reg.info(eid).version)
    c = TestClient(create_app(registry, storage_options=s3_server.storage_options), raise_server_exceptions=False)
    rows = c.get("/api/entries").json()
    assert sorted(r["entry_id"] for r in rows) == sorted([eid, eid2]) and all(r["error"] is None for r in rows)
    by_id = {r["entry_id"]: r for r in rows}
    assert by_id[eid]["metrics"]["consistency"] == 61.25 and by_id[eid]["metrics_source"].startswith("registry")
    assert by_id[eid]["baselines"]["plain_nmf"] == run["metrics"]["baselines"]["plain_nmf"]
    assert by_id[eid2]["metrics"] == {} and by_id[eid2]["metrics_source"] is None
    assert "61.25" in c.get("/").text
    one = c.get(f"/api/entries/{eid}").json()
    assert one["info"]["metadata"]["features"]["train"].startswith("s3://") and one["info"]["n_classes"] == N_CLASSES
    cls = c.get(f"/api/entries/{eid}/classes/class_02").json()
    assert cls["notes"] == [] and len(cls["test_images"]) == 4  # read from the S3 stores
    local = c.get(f"/api/entries/{eid}/classes/2").json()
    assert local == cls
    for kind in ("gallery", "heatmaps", "contributions"):
        r = c.get(f"/api/entries/{eid}/classes/2/{kind}.png")
        assert r.status_code == 200 and _decode(r.content).std() > 5
    assert c.get("/api/compare", params=[("ids", eid), ("ids", eid2), ("cls", "1")]).status_code == 200
    assert c.get("/api/entries/%2e%2e").status_code == 400
    assert c.get("/api/entries/nope--x--k1--000000000000").status_code == 404


# -------------------------------------------------------------------- the real server in real headless Chromium


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
    """``phpn serve`` in a subprocess (the CLI command itself), on a free port of 127.0.0.1."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--registry", run["registry"],
                                 "--port", str(port)], stdout=f, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).resolve().parents[2])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/entries", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"phpn serve did not come up: {log.read_text()[-2000:]}")
        time.sleep(0.3)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_serve_binds_localhost_is_prefect_free_and_keeps_the_contract(server):
    with urllib.request.urlopen(f"{server}/api/entries") as r:
        rows = json.loads(r.read())
    assert isinstance(rows, list) and rows and all(isinstance(x, dict) and x["entry_id"] for x in rows)
    with urllib.request.urlopen(f"{server}/api/stats") as r:
        stats = json.loads(r.read())
    assert stats["process"]["modules"] == {"prefect": False, "ray": False}
    with urllib.request.urlopen(f"{server}/") as r:
        assert r.headers["content-type"].startswith("text/html") and b"<table id=\"entries\"" in r.read()
    with urllib.request.urlopen(f"{server}/openapi.json") as r:
        paths = json.loads(r.read())["paths"]
    assert {"/api/entries", "/api/entries/{entry_id}/classes/{cls}", "/api/explain"} <= set(paths)
    # bound to 127.0.0.1 only: another local address of this machine does not answer
    port = int(server.rsplit(":", 1)[1])
    other = _other_local_address()
    if other is not None:
        with pytest.raises(OSError):
            socket.create_connection((other, port), timeout=2).close()


def _other_local_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent: picks the outgoing interface's address
            addr = s.getsockname()[0]
        return None if addr.startswith("127.") else addr
    except OSError:
        return None


class _CDP:
    """A tiny Chrome DevTools Protocol client over one page target (synchronous websockets)."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=64 * 2**20, open_timeout=20)
        self.n = 0

    def call(self, method: str, timeout: float = 30.0, **params):
        self.n += 1
        my = self.n
        self.ws.send(json.dumps({"id": my, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == my:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expr: str):
        return self.call("Runtime.evaluate", expression=expr, returnByValue=True)["result"].get("value")

    def goto(self, url: str, ready: str = "document.readyState === 'complete'", timeout: float = 30.0) -> None:
        self.call("Page.navigate", url=url)
        self.wait(ready, timeout)

    def wait(self, expr: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.eval(expr):
                    return
            except RuntimeError:
                pass  # the page is navigating
            time.sleep(0.1)
        raise TimeoutError(f"timed out waiting for {expr!r} on {self.eval('location.href')}")

    def screenshot(self) -> np.ndarray:
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        return _decode(data)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Debian's headless Chromium with the DevTools protocol on a free port; yields a :class:`_CDP`."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium is not installed (make test installs it: apt-get install -y chromium)")
    pytest.importorskip("websockets.sync.client")
    tmp = tmp_path_factory.mktemp("chromium")
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars", f"--user-data-dir={tmp / 'profile'}",
         f"--remote-debugging-port={port}", "--remote-allow-origins=*", "--window-size=1300,1600", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "HOME": str(tmp)})
    deadline = time.monotonic() + 60
    ws = None
    while ws is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                pages = [t for t in json.loads(r.read()) if t.get("type") == "page"]
            ws = pages[0]["webSocketDebuggerUrl"] if pages else None
        except OSError:
            pass
        if ws is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("headless chromium did not start its DevTools endpoint")
            time.sleep(0.2)
    cdp = _CDP(ws)
    cdp.call("Page.enable")
    try:
        yield cdp
    finally:
        cdp.ws.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _assert_not_blank(px: np.ndarray) -> None:
    gray = px.mean(-1)
    assert px.shape[0] > 500 and px.shape[1] > 800
    assert gray.std() > 10.0 and (gray < 200).mean() > 0.02, "the screenshot is (nearly) blank"


# The page's own counter (pages.py) says every <img> decoded; scrolling down first lets lazy images load.
_ALL_IMAGES_LOADED = ("(window.scrollTo(0, document.body.scrollHeight), true) && document.images.length > 0 && "
                      "document.body.getAttribute('data-images-loaded') === "
                      "document.images.length + '/' + document.images.length")


def test_pages_in_headless_chromium_load_with_every_image(run, server, browser):
    eid = run["entries"][3]
    browser.goto(f"{server}/")
    assert browser.eval("document.querySelectorAll('tr.entry').length") == 2
    _assert_not_blank(browser.screenshot())
    # sorting by k and filtering work in the browser
    browser.eval("Array.from(document.querySelectorAll('th.sortable')).find(t => t.textContent.trim() === 'k')"
                 ".click()")  # cells: compare, entry, kind, model, dataset, k
    ks = browser.eval("Array.from(document.querySelectorAll('tr.entry')).map(r => r.cells[5].textContent)")
    assert ks == ["2", "3"]
    browser.eval("var f = document.getElementById('filter'); f.value = 'k3'; f.dispatchEvent(new Event('input'))")
    assert browser.eval("document.querySelectorAll('tr.entry:not(.hidden)').length") == 1
    for path in (f"/entries/{eid}/classes/1", f"/compare?ids={eid}&ids={run['entries'][2]}&cls=class_01"):
        browser.goto(f"{server}{path}", ready=_ALL_IMAGES_LOADED)
        n = browser.eval("document.images.length")
        widths = browser.eval("Array.from(document.images).map(i => i.naturalWidth)")
        assert n >= 2 and len(widths) == n and all(w > 0 for w in widths), (path, widths)
        assert browser.eval("document.body.getAttribute('data-images-loaded')") == f"{n}/{n}"
        browser.eval("window.scrollTo(0, 0)")
        _assert_not_blank(browser.screenshot())


def test_an_upload_is_explained_in_headless_chromium(run, server, browser, tmp_path):
    eid = run["entries"][3]
    img = tmp_path / "upload.png"
    img.write_bytes(_png_of(run, 1))
    browser.goto(f"{server}/explain?entry={eid}")
    doc = browser.call("DOM.getDocument")
    node = browser.call("DOM.querySelector", nodeId=doc["root"]["nodeId"], selector="input[type=file]")["nodeId"]
    browser.call("DOM.setFileInputFiles", nodeId=node, files=[str(img)])
    assert browser.eval("document.querySelector('select[name=entry]').value") == eid
    browser.eval("document.getElementById('explain-form').submit()")
    browser.wait("document.getElementById('explanation') !== null", timeout=60)
    browser.wait(_ALL_IMAGES_LOADED)
    assert browser.eval("document.getElementById('explanation').naturalWidth") > 200
    assert browser.eval("document.querySelectorAll('#explain-top tbody tr').length") == 3
    _assert_not_blank(browser.screenshot())


def test_api_docs_render_offline_in_headless_chromium(server, browser):
    """/docs is Swagger UI served from the installed package, not a CDN: this machine has no network, so the
    operations only render when every script came from the explorer itself."""
    with urllib.request.urlopen(f"{server}/docs") as r:
        html = r.read().decode()
    assert "/static/swagger-ui/swagger-ui-bundle.js" in html and "cdn" not in html.lower()
    with urllib.request.urlopen(f"{server}/static/swagger-ui/swagger-ui-bundle.js") as r:
        assert r.status == 200 and len(r.read()) > 100_000
    browser.goto(f"{server}/docs", ready="document.querySelectorAll('.opblock').length > 0", timeout=60)
    paths = browser.eval("Array.from(document.querySelectorAll('.opblock-summary-path')).map(e => e.textContent)")
    assert any("/api/entries" in p for p in paths), paths
    _assert_not_blank(browser.screenshot())
