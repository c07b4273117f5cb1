"""Prototype quality at scale: phpn vs plain NMF vs DFF on SynthParts with 8, 160 (and more) classes, several seeds.

For each (number of classes, data seed): SynthParts train/test splits (3 parts per class, the distractor on top),
the synthparts CNN trained on the train split (stride 8; weights cached under ``--cache``), every class's train
features decomposed with each phpn variant (``--variants``), then on the test split:

- ProtoEval consistency and stability (keypoints) of phpn, of its plain NMF prototypes and of DFF (grad-cam's
  recipe, sklearn NMF with random init, one NMF per class);
- the keypoint-free box stability, redundancy and duplicate rate (:mod:`phpn_core.evaluation.keypoint_free`);
  with ``--auc`` also the insertion/deletion AUCs (costly: ``2 + 2 (k+1) (steps-1)`` forward passes per image);
- ``part_dup``: the share of classes where two prototypes have the same best part (ProtoEval's part-rate argmax),
  i.e. one part covered twice while another may be missed.

Prints one row per (classes, seed, method) and a mean over seeds; ``--json FILE`` writes every row.

    .venv/bin/python bench/quality_scale.py                              # 8 and 160 classes, seeds 0-2, k=5
    .venv/bin/python bench/quality_scale.py --classes 160,8 --variants residual,sparse,auto_sparse   # README table
    .venv/bin/python bench/quality_scale.py --classes 1000 --n-train 10 --n-test 10 --variants residual,sparse
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from phpn_core import PartPrototypeHead, decompose_head  # noqa: E402
from phpn_core.data.base import normalize  # noqa: E402
from phpn_core.data.synthparts import SynthParts  # noqa: E402
from phpn_core.evaluation.baselines import dff_concepts  # noqa: E402
from phpn_core.evaluation.keypoint_free import keypoint_free  # noqa: E402
from phpn_core.evaluation.protoeval import protoeval  # noqa: E402
from phpn_core.models.split import split_classifier  # noqa: E402
from phpn_core.models.synthparts_cnn import SynthPartsCNN, train_synthparts_cnn  # noqa: E402

# phpn variants: decompose_head keyword options on top of (k, seed=0).
VARIANTS: dict[str, dict] = {
    "residual": {"target": "residual"},
    "prototype": {"target": "prototype"},
    "auto": {"target": "residual", "auto_k": True},
    "auto_prototype": {"target": "prototype", "auto_k": True},
    "random": {"target": "residual", "nmf_options": {"init": "random"}},
    "random_prototype": {"target": "prototype", "nmf_options": {"init": "random"}},
    "auto_random": {"target": "residual", "auto_k": True, "nmf_options": {"init": "random"}},
    "auto_random_prototype": {"target": "prototype", "auto_k": True, "nmf_options": {"init": "random"}},
    "restarts": {"target": "residual", "nmf_options": {"restarts": 8}},
    "restarts_prototype": {"target": "prototype", "nmf_options": {"restarts": 8}},
    "auto_restarts": {"target": "residual", "auto_k": True, "nmf_options": {"restarts": 8}},
    "auto_restarts_prototype": {"target": "prototype", "auto_k": True, "nmf_options": {"restarts": 8}},
    # nmf(..., sparsity=0.6): the best of 0.3, 0.6, 1, 1.4, 2, 4, 8 for plain NMF on 160 classes, seed 0
    "sparse": {"target": "residual", "nmf_options": {"sparsity": 0.6}},
    "sparse_prototype": {"target": "prototype", "nmf_options": {"sparsity": 0.6}},
    "auto_sparse": {"target": "residual", "auto_k": True, "nmf_options": {"sparsity": 0.6}},
}


def class_features(features, ds, batch_size: int = 256) -> dict[int, torch.Tensor]:
    """``{class: [n_c, H, W, D]}`` of ``ds`` through ``features``."""
    ys = torch.tensor(ds.labels)
    out = []
    with torch.inference_mode():
        for s in range(0, len(ds), batch_size):
            xs = torch.stack([ds[i]["image"] for i in range(s, min(s + batch_size, len(ds)))])
            out.append(features(normalize(xs, ds.mean, ds.std)))
    F = torch.cat(out).permute(0, 2, 3, 1).contiguous()
    return {c: F[ys == c] for c in ys.unique().tolist()}


def trained_model(train, *, n_classes: int, seed: int, epochs: int, cache: Path | None) -> SynthPartsCNN:
    path = cache / f"synthparts-{n_classes}c-{len(train) // n_classes}n-s{seed}-e{epochs}.pt" if cache else None
    if path is not None and path.exists():
        model = SynthPartsCNN(n_classes=n_classes, stride=8)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    model = train_synthparts_cnn(train, epochs=epochs, stride=8, seed=seed, progress=False)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval()


def part_duplicates(pe, active: torch.Tensor) -> float:
    """Share of classes where two prototypes in use have the same best part (part-rate argmax over the pool)."""
    best = pe.part_rate.argmax(2)  # [C', k]
    act = active[pe.classes]
    dup = [len(set(row[a].tolist())) < int(a.sum()) for row, a in zip(best, act)]
    return sum(dup) / max(len(dup), 1)


def measure(features, head, test, prototypes, *, auc: bool, steps: int) -> dict:
    pe = protoeval(features, head, test, prototypes_override=prototypes)
    active = ((prototypes if prototypes is not None else head.prototypes) != 0).any(-1)
    kf = keypoint_free(features, head, test, prototypes_override=prototypes, max_images=2 if auc else 1,
                       steps=steps if auc else 3)
    row = {"consistency": pe.consistency, "stability": pe.stability, "part_dup": 100 * part_duplicates(pe, active),
           "mean_k": float(active.sum(1).double().mean()),
           "box_stability": 100 * kf.box_stability, "redundancy": kf.redundancy,
           "duplicate_rate": 100 * kf.duplicate_rate}
    if auc:
        row.update(insertion_auc=kf.insertion_auc, deletion_auc=kf.deletion_auc)
    return row


COLS = ("mean_k", "consistency", "stability", "part_dup", "box_stability", "redundancy", "duplicate_rate", "insertion_auc",
        "deletion_auc")


def fmt(row: dict) -> str:
    return " ".join(f"{row[c]:8.3f}" if c in ("mean_k", "redundancy", "insertion_auc", "deletion_auc") else f"{row[c]:8.1f}"
                    for c in COLS if c in row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", default="8,160", help="numbers of classes, comma-separated")
    ap.add_argument("--seeds", default="0,1,2", help="data seeds, comma-separated")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--variants", default="residual,prototype", help=f"phpn variants: {', '.join(VARIANTS)}")
    ap.add_argument("--n-train", type=int, default=None, help="train images per class (default: SynthParts' 50)")
    ap.add_argument("--n-test", type=int, default=None, help="test images per class (default: SynthParts' 20)")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--train-only", action="store_true", help="train and cache the models, evaluate nothing")
    ap.add_argument("--no-dff", action="store_true", help="skip DFF (sklearn NMF per class)")
    ap.add_argument("--auc", action="store_true", help="also insertion/deletion AUC (2 images per class)")
    ap.add_argument("--steps", type=int, default=8, help="insertion/deletion steps with --auc")
    ap.add_argument("--cache", default="runs/quality-cache", help="trained weights cache ('' for none)")
    ap.add_argument("--json", default=None, help="write every row to this file")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(int(os.environ.get("PHPN_BENCH_THREADS", "2")))
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; expected one of {', '.join(VARIANTS)}")
    cache = Path(args.cache) if args.cache else None
    head_line = "".join(f"{c[:8]:>9s}" for c in COLS if args.auc or "auc" not in c)
    print(f"{'classes':>7s} {'seed':>4s} {'method':18s}{head_line}   acc     s", flush=True)
    rows = []
    for n_classes in [int(c) for c in args.classes.split(",")]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            t0 = time.perf_counter()
            # more classes than the base pool's 165 part sets: colour variants of every part type
            pv = 1 if n_classes <= 165 else 2
            train = SynthParts(split="train", n_classes=n_classes, n_per_class=args.n_train, seed=seed, part_variants=pv)
            test = SynthParts(split="test", n_classes=n_classes, n_per_class=args.n_test, seed=seed, part_variants=pv)
            model = trained_model(train, n_classes=n_classes, seed=seed, epochs=args.epochs, cache=cache)
            if args.train_only:
                print(f"{n_classes:7d} {seed:4d} trained in {time.perf_counter() - t0:.0f} s", flush=True)
                continue
            features, W, b = split_classifier(model)
            feats = class_features(features, train)
            test_feats = class_features(features, test)
            acc = sum(int(((f.mean((1, 2)) @ W.T + b).argmax(1) == c).sum()) for c, f in test_feats.items()) / len(test)

            def emit(method: str, row: dict) -> None:
                row = {"classes": n_classes, "seed": seed, "method": method, "accuracy": acc, **row}
                rows.append(row)
                print(f"{n_classes:7d} {seed:4d} {method:18s} {fmt(row)} {acc:6.3f} {time.perf_counter() - t0:5.0f}",
                      flush=True)

            seen_nmf: set[str] = set()
            for v in variants:
                opts = VARIANTS[v]
                dec = decompose_head(feats, W.float(), args.k, seed=0, **opts)
                head = PartPrototypeHead(dec.prototypes, b.float(), signs=torch.sign(dec.alpha))
                emit(f"phpn:{v}", measure(features, head, test, None, auc=args.auc, steps=args.steps))
                # plain NMF depends only on the NMF's own options, not on the refinement's
                nmf_key = json.dumps({key: val for key, val in opts.items() if not key.startswith(("target", "refine"))},
                                     sort_keys=True)
                if nmf_key not in seen_nmf:
                    seen_nmf.add(nmf_key)
                    emit(f"plain_nmf:{v}", measure(features, head, test, dec.initial, auc=args.auc, steps=args.steps))
            if not args.no_dff:
                concepts = dff_concepts(features, train, k=args.k, seed=0)
                emit("dff", measure(features, head, test, concepts, auc=args.auc, steps=args.steps))
    print("\nmean over seeds", flush=True)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["classes"], r["method"]), []).append(r)
    for (n_classes, method), rs in groups.items():
        mean = {c: sum(r[c] for r in rs) / len(rs) for c in COLS if c in rs[0]}
        print(f"{n_classes:7d} {len(rs):4d} {method:18s} {fmt(mean)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
