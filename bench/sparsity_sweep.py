"""Plain NMF's ProtoEval quality against its sparsity, and DFF's against its iteration limit (issue 22's causes).

On one SynthParts problem (the synthparts CNN of ``bench/quality_scale.py``, trained and cached the same way): each
class's train features factorised by ``nmf(X, k, sparsity=s)`` for every ``--sparsity`` value (one batch, item
seed 0 for every class) and by DFF (grad-cam's recipe, ``dff_concepts``) for every ``--dff-iters`` value, each
factor's rows scored as prototypes by ProtoEval on the test split. Prints consistency, stability, the NMF's mean
relative error and its coefficient density (share of entries above 1e-6 of the largest).

    .venv/bin/python bench/sparsity_sweep.py --classes 160 --seed 0                       # README figures
    .venv/bin/python bench/sparsity_sweep.py --sparsity 0,0.6 --dff-iters 50,200,2000 --dff-tol 1e-6
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quality_scale import class_features, trained_model  # noqa: E402

from phpn_core import PartPrototypeHead  # noqa: E402
from phpn_core.data.synthparts import SynthParts  # noqa: E402
from phpn_core.evaluation.baselines import dff_concepts  # noqa: E402
from phpn_core.evaluation.protoeval import protoeval  # noqa: E402
from phpn_core.method.nmf import nmf  # noqa: E402
from phpn_core.models.split import split_classifier  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0, help="data seed (as bench/quality_scale.py)")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--sparsity", default="0,0.3,0.6,1,1.4,2,4,8", help="comma-separated ('' for none)")
    ap.add_argument("--dff-iters", default="", help="DFF max_iter values, comma-separated (e.g. 50,200,2000)")
    ap.add_argument("--dff-tol", type=float, default=1e-4, help="DFF's tol (grad-cam: 1e-4)")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--cache", default="runs/quality-cache")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(int(os.environ.get("PHPN_BENCH_THREADS", "2")))
    n = args.classes
    pv = 1 if n <= 165 else 2
    train = SynthParts(split="train", n_classes=n, seed=args.seed, part_variants=pv)
    test = SynthParts(split="test", n_classes=n, seed=args.seed, part_variants=pv)
    model = trained_model(train, n_classes=n, seed=args.seed, epochs=args.epochs,
                          cache=Path(args.cache) if args.cache else None)
    features, W, b = split_classifier(model)
    feats = class_features(features, train)
    X = torch.stack([feats[c].reshape(-1, feats[c].shape[-1]) for c in range(n)])  # [C, m, D]: equal class sizes
    # only prototypes_override is scored: the head just supplies shapes and the bias
    head = PartPrototypeHead(W[:, None].float().expand(n, args.k, -1) / args.k, b.float())
    print(f"{n} classes, seed {args.seed}, k = {args.k}: X {tuple(X.shape)}", flush=True)
    for s in [float(v) for v in args.sparsity.split(",") if v]:
        t = time.perf_counter()
        r = nmf(X, args.k, sparsity=s, item_seeds=[0] * n)
        pe = protoeval(features, head, test, prototypes_override=r.P)
        density = float((r.E > 1e-6 * r.E.amax()).double().mean())
        print(f"nmf sparsity {s:<5g} consistency {pe.consistency:6.2f} stability {pe.stability:6.2f} "
              f"rel_error {float(r.rel_error.mean()):.4f} density {density:.3f}  {time.perf_counter() - t:.0f} s",
              flush=True)
    for it in [int(v) for v in args.dff_iters.split(",") if v]:
        t = time.perf_counter()
        C = dff_concepts(features, train, k=args.k, seed=0, max_iter=it, tol=args.dff_tol)
        pe = protoeval(features, head, test, prototypes_override=C)
        print(f"dff max_iter {it:<5d} consistency {pe.consistency:6.2f} stability {pe.stability:6.2f}  "
              f"{time.perf_counter() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
