"""How fast the explorer answers on a 1000-class entry (the issue's bar: a class page in under 1 s when warm).

Builds, under a temporary folder (or --dir), a synthetic but complete 1000-class run: an ImageFolder dataset of
tiny PNGs (``--per-class`` train and test images per class), train and test feature stores (7 x 7 x D float16,
random non-negative features, the dataset's ids and class names), and one published registry entry with
``C = 1000``, ``k``, ``D`` (random prototypes; the bias is zero). Then it serves the registry with uvicorn (the same
app as ``phpn serve``) in this process and times real HTTP requests from a client thread:

- ``/`` and ``/api/entries`` (the listing);
- per class (``--classes`` of them, spread over the 1000): the class page cold (its view is computed: stored test
  features through the head, gallery from the training store + dataset), then its three PNGs cold (rendered), then
  the page and the PNGs again warm (cached);
- the class JSON warm.

Prints one line per measure: median and max over the classes, in milliseconds, and the warm page + images total.
Usage: ``.venv/bin/python bench/explorer_pages.py [--classes 8] [--k 10] [--D 256] [--per-class 3]``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(root: Path, *, C: int, k: int, D: int, per_class: int, image_size: int) -> tuple[str, str]:
    import torch
    from PIL import Image

    from phpn_core.data.imagefolder import ImageFolderDataset
    from phpn_core.storage.feature_store import FeatureStore
    from phpn_core.storage.registry import PrototypeRegistry
    from phpn_core.storage.schema import FeatureSchema

    rng = np.random.default_rng(0)
    H = W = 7
    for split in ("train", "test"):
        for c in range(C):
            folder = root / "data" / split / f"n{c:05d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                px = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
                Image.fromarray(px).save(folder / f"img{i}.png")
    stores = {}
    for split in ("train", "test"):
        ds = ImageFolderDataset(root / "data" / split, image_size=image_size)
        n = len(ds.image_ids)
        schema = FeatureSchema(model="bench_model", checkpoint_digest="0" * 64, layer="features",
                               input_size=image_size, dataset="imagefolder", dataset_fingerprint="bench",
                               split=split, dtype="float16", n_images=n, n_classes=C, feature_shape=(H, W, D),
                               class_names=list(ds.classes))
        uri = str(root / "features" / f"{split}.zarr")
        store = FeatureStore.create(uri, schema, labels=ds.labels, image_ids=ds.image_ids, compression="none")
        for ci in range(store.n_chunks):
            m = int(np.subtract(*store.chunk_rows(ci)[::-1]))
            store.write_chunk(ci, rng.random((m, H, W, D), dtype=np.float32).astype(np.float16))
        stores[split] = uri
    registry = str(root / "registry")
    reg = PrototypeRegistry(registry)
    entry = PrototypeRegistry.entry_id("bench_model", "imagefolder", k, "b" * 16)
    g = torch.Generator().manual_seed(0)
    step = 250
    for s in range(0, C, step):
        n = min(step, C - s)
        protos = torch.rand(n, k, D, generator=g) - 0.3
        alpha = torch.rand(n, k, generator=g) + 0.1
        reg.write_classes(entry, list(range(s, s + n)), {
            "prototypes": protos, "initial": protos.abs(), "alpha": alpha, "residual": torch.zeros(n, k, D),
            "rel_error": torch.full((n,), 0.2), "head_error": torch.zeros(n)})
    meta = {"config": {"model": {"arch": "bench_model", "checkpoint": None},
                       "dataset": {"kind": "imagefolder", "root": str(root / "data"), "image_size": image_size}},
            "run": "bench-1000", "features": stores,
            "metrics": {"accuracy_original": 0.5, "accuracy_decomposed": 0.5, "consistency": None, "stability": None}}
    reg.publish(entry, n_classes=C, bias=torch.zeros(C), metadata=meta)
    return registry, entry


def add_run_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of :func:`build_from_args` (the synthetic run both page benches build)."""
    ap.add_argument("--n-classes", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--D", type=int, default=256)
    ap.add_argument("--per-class", type=int, default=3, help="train and test images per class")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--dir", type=Path, default=None, help="build here (default: a temporary folder)")


def build_from_args(args: argparse.Namespace, *, prefix: str):
    """:func:`build` under ``args.dir`` or a new temporary folder; returns ``(tmp or None, root, registry, entry)``."""
    tmp = tempfile.TemporaryDirectory(prefix=prefix) if args.dir is None else None
    root = Path(tmp.name) if tmp else args.dir
    t = time.perf_counter()
    registry, entry = build(root, C=args.n_classes, k=args.k, D=args.D, per_class=args.per_class,
                            image_size=args.image_size)
    print(f"built a {args.n_classes}-class run (k={args.k}, D={args.D}, {args.per_class} train + test images per "
          f"class, {args.image_size} px) in {time.perf_counter() - t:.1f} s: {entry}")
    return tmp, root, registry, entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(ap)
    ap.add_argument("--classes", type=int, default=8, help="classes to time (spread over all)")
    args = ap.parse_args()

    import torch
    import uvicorn

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from explorer.app import create_app

    tmp, root, registry, entry = build_from_args(args, prefix="phpn-bench-explorer-")

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(registry), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"

    def get(path: str) -> tuple[float, bytes]:
        t0 = time.perf_counter()
        with urllib.request.urlopen(base + path, timeout=120) as r:
            body = r.read()
            assert r.status == 200, (path, r.status)
        return time.perf_counter() - t0, body

    import re

    times: dict[str, list[float]] = {}

    def rec(name: str, dt: float) -> None:
        times.setdefault(name, []).append(dt * 1000)

    rec("listing / (first)", get("/")[0])
    rec("listing / (warm)", get("/")[0])
    rec("/api/entries (warm)", get("/api/entries")[0])
    picks = np.linspace(0, args.n_classes - 1, args.classes).round().astype(int).tolist()
    for c in picks:
        page = f"/entries/{entry}/classes/{c}"
        dt, body = get(page)
        rec("class page, cold", dt)
        imgs = [s.replace("&amp;", "&") for s in re.findall(r'<img src="([^"]+)"', body.decode())]
        assert len(imgs) == 3, imgs
        rec("class page + 3 PNGs, cold", dt + sum(get(s)[0] for s in imgs))
        dt = get(page)[0]
        rec("class page, warm", dt)
        rec("class page + 3 PNGs, warm", dt + sum(get(s)[0] for s in imgs))
        rec("class JSON, warm", get(f"/api/entries/{entry}/classes/{c}")[0])
    server.should_exit = True
    thread.join(timeout=10)
    print(f"{'measure':28s} {'median ms':>10s} {'max ms':>10s}  (n)")
    for name, vals in times.items():
        print(f"{name:28s} {statistics.median(vals):10.1f} {max(vals):10.1f}  ({len(vals)})")
    warm = max(times["class page + 3 PNGs, warm"])
    print(f"warm class page of a {args.n_classes}-class entry, page + images: max {warm:.1f} ms "
          f"({'under' if warm < 1000 else 'OVER'} the 1 s bar)")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
