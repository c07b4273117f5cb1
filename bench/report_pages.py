"""How fast the class pages of a 1000-class run are written: serial vs parallel, in the same process.

Builds (under a temporary folder, or --dir) the same synthetic but complete C-class run as
``bench/explorer_pages.py`` (an ImageFolder dataset of tiny PNGs, 7 x 7 x D float16 train and test feature stores,
one registry entry with C classes and k random prototypes each), then writes its class pages
(:func:`phpn_core.report.class_pages.build_class_pages`: the paged index and one page per class) twice, with
``workers=1`` and ``workers=--workers``, and prints pages written per second for each, the speed-up, the largest
index and class page in bytes, and whether both runs wrote the same bytes.

``features`` is a fixed random 1x1 convolution after pooling to 7 x 7 (the pages only need its output shape
``[B, D, 7, 7]``), so the forward passes are cheap and the timing is the pages' own: explanations, galleries read
from the training store, PNG rendering and writing.

Usage: ``.venv/bin/python bench/report_pages.py [--n-classes 1000] [--k 10] [--D 256] [--workers 4]``.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from explorer_pages import add_run_arguments, build_from_args  # noqa: E402  (the same synthetic run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(ap)
    ap.add_argument("--images-per-class", type=int, default=2)
    ap.add_argument("--gallery-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torch

    from phpn_core.data.imagefolder import ImageFolderDataset
    from phpn_core.report.class_pages import build_class_pages
    from phpn_core.storage.feature_store import FeatureStore
    from phpn_core.storage.registry import PrototypeRegistry

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    tmp, root, registry, entry = build_from_args(args, prefix="phpn-bench-pages-")
    head, _ = PrototypeRegistry(registry).load(entry)
    arrays = PrototypeRegistry(registry).load_arrays(entry)
    train = ImageFolderDataset(root / "data" / "train", image_size=args.image_size)
    test = ImageFolderDataset(root / "data" / "test", image_size=args.image_size)
    store = FeatureStore.open(str(root / "features" / "train.zarr"))
    torch.manual_seed(0)
    features = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(7), torch.nn.Conv2d(3, args.D, 1),
                                   torch.nn.ReLU()).eval()

    common = dict(head=head, features=features, test_dataset=test, train_dataset=train, train_store=store,
                  per_class_metrics={"nmf_rel_error": arrays["rel_error"], "head_error": arrays["head_error"]},
                  images_per_class=args.images_per_class, gallery_size=args.gallery_size, device=args.device,
                  title=f"bench {args.n_classes} classes")
    rates = {}
    for workers in (1, args.workers):
        out = root / f"pages-w{workers}"
        t = time.perf_counter()
        index = build_class_pages(out_dir=out, workers=workers, **common)
        dt = time.perf_counter() - t
        d = index.parent
        n_pages = len(list(d.glob("c*.html")))
        rates[workers] = n_pages / dt
        idx_max = max(p.stat().st_size for p in d.glob("index*.html"))
        cls_max = max(p.stat().st_size for p in d.glob("c*.html"))
        print(f"workers={workers}: {n_pages} class pages + {len(list(d.glob('index*.html')))} index pages in "
              f"{dt:.1f} s = {rates[workers]:.1f} pages/s; largest index page {idx_max / 1024:.1f} KiB, largest "
              f"class page {cls_max / 1024:.1f} KiB")
    a, b = root / "pages-w1" / "classes", root / f"pages-w{args.workers}" / "classes"
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())  # pages, search.js, png/*.png
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    print(f"parallel / serial: {rates[args.workers] / rates[1]:.2f}x ({args.workers} workers, {os.cpu_count()} CPUs); "
          f"same bytes: {not mismatch and not errors} ({len(match)} files compared)")


if __name__ == "__main__":
    main()
