"""ProtoEval consistency/stability of phpn vs plain NMF and DFF over data seeds, in process (no Prefect, no Ray).

For each seed: the demo's recipe (SynthParts 8 classes, SynthPartsCNN trained 12 epochs at the given stride, k=3),
decomposed with each refinement target, then :func:`phpn_core.evaluation.suite.evaluate_all` on the test split. Prints one
row per (seed, target): consistency and stability of phpn, plain NMF (before scaling/refinement) and DFF. This is
the table in README "Interpretability".

    .venv/bin/python bench/consistency_seeds.py                       # seeds 0-3, both targets (~10 min, 2 cores)
    .venv/bin/python bench/consistency_seeds.py --seeds 0 --targets prototype
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from phpn_core import PartPrototypeHead, decompose_head  # noqa: E402
from phpn_core.models.split import split_classifier  # noqa: E402
from phpn_core.data.base import normalize  # noqa: E402
from phpn_core.data.synthparts import SynthParts  # noqa: E402
from phpn_core.models.synthparts_cnn import train_synthparts_cnn  # noqa: E402
from phpn_core.evaluation.suite import evaluate_all  # noqa: E402


def class_features(features, ds, batch_size: int = 128) -> dict[int, torch.Tensor]:
    """``{class: [n_c, H, W, D]}`` of ``ds`` through ``features``."""
    xs = torch.stack([ds[i]["image"] for i in range(len(ds))])
    ys = torch.tensor(ds.labels)
    with torch.inference_mode():
        F = torch.cat([features(normalize(xs[i:i + batch_size], ds.mean, ds.std))
                       for i in range(0, len(xs), batch_size)])
    F = F.permute(0, 2, 3, 1).contiguous()
    return {c: F[ys == c] for c in ys.unique().tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3", help="data seeds, comma-separated")
    ap.add_argument("--targets", default="prototype,residual", help="refinement targets, comma-separated")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--stride", type=int, default=8, choices=(8, 16))
    ap.add_argument("--epochs", type=int, default=12)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    print(f"{'seed':>4s} {'target':10s} {'phpn cons':>9s} {'stab':>5s} {'nmf cons':>8s} {'stab':>5s} "
          f"{'dff cons':>8s} {'stab':>5s} {'acc':>6s} {'s':>5s}")
    for seed in [int(s) for s in args.seeds.split(",")]:
        t0 = time.perf_counter()
        train = SynthParts(split="train", seed=seed)
        test = SynthParts(split="test", seed=seed)
        model = train_synthparts_cnn(train, epochs=args.epochs, stride=args.stride, seed=seed, progress=False)
        features, W, b = split_classifier(model)
        feats = class_features(features, train)
        test_feats = class_features(features, test)
        acc = sum(int(((f.mean((1, 2)) @ W.T + b).argmax(1) == c).sum()) for c, f in test_feats.items()) / len(test)
        for target in args.targets.split(","):
            dec = decompose_head(feats, W.float(), args.k, seed=0, target=target)
            head = PartPrototypeHead(dec.prototypes, b.float(), signs=torch.sign(dec.alpha))
            s = evaluate_all(features, head, test, initial=dec.initial, train_dataset=train)["summary"]
            nmf, dff = s["baselines"]["plain_nmf"], s["baselines"]["dff"]
            print(f"{seed:4d} {target:10s} {s['consistency']:9.1f} {s['stability']:5.1f} {nmf['consistency']:8.1f} "
                  f"{nmf['stability']:5.1f} {dff['consistency']:8.1f} {dff['stability']:5.1f} {acc:6.4f} "
                  f"{time.perf_counter() - t0:5.0f}", flush=True)


if __name__ == "__main__":
    main()
