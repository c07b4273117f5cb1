"""phpn's batched NMF vs scikit-learn's NMF class by class, on a CUB-sized problem, in one run.

Default problem: 200 classes x 30 images x 7x7 positions x 512 channels, k = 10, features from the planted-parts
generator (sparse non-negative part dictionary + background + rectified noise: post-ReLU-like, approximately
low rank). Prints both mean relative reconstruction errors, the speed ratio, and the whole decompose_head
(NMF + scaling + refinement) time per class.

    .venv/bin/python bench/nmf_vs_sklearn.py                  # the full problem (sklearn takes minutes)
    .venv/bin/python bench/nmf_vs_sklearn.py --classes 20     # quicker
    .venv/bin/python bench/nmf_vs_sklearn.py --device cuda    # phpn on a GPU (sklearn stays on the CPU)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from phpn_core import decompose_head, nmf  # noqa: E402
from phpn_core.data.planted import planted_features  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--images", type=int, default=30)
    ap.add_argument("--hw", type=int, default=7)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--noise", type=float, default=1.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--skip-sklearn", action="store_true", help="time phpn only (e.g. on a GPU machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    feats, _, _ = planted_features(n_classes=args.classes, n_images=args.images, hw=args.hw, dim=args.dim,
                                   noise=args.noise, seed=0)
    X = torch.stack([f.reshape(-1, args.dim) for f in feats.values()])
    m = X.shape[1]
    print(f"problem: {args.classes} classes x {m} rows x {args.dim} channels, k={args.k}, device={args.device}, "
          f"threads={args.threads}")

    dev = torch.device(args.device)
    Xd = X.to(dev)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":  # warm-up: CUDA context, kernels, cuBLAS handles
        nmf(Xd[:2], args.k)
        sync()
    t = time.perf_counter()
    res = nmf(Xd, args.k, seed=0)
    sync()
    t_phpn = time.perf_counter() - t
    e_phpn = res.rel_error.cpu().numpy()
    print(f"phpn nmf      : {t_phpn:8.2f} s  mean rel. error {e_phpn.mean():.6f}  "
          f"(mean sweeps {res.n_iter.float().mean():.0f}, converged {int(res.converged.sum())}/{args.classes})")

    if not args.skip_sklearn:
        from sklearn.decomposition import NMF

        errs = []
        t = time.perf_counter()
        for c in range(args.classes):
            xn = X[c].numpy()
            model = NMF(args.k, init="nndsvda", max_iter=500, random_state=0).fit(xn)
            errs.append(model.reconstruction_err_ / np.linalg.norm(xn))
        t_sk = time.perf_counter() - t
        e_sk = np.array(errs)
        print(f"sklearn NMF   : {t_sk:8.2f} s  mean rel. error {e_sk.mean():.6f}  "
              f"({t_sk / args.classes:.3f} s per class)")
        print(f"speed ratio   : {t_sk / t_phpn:8.1f}x  (sklearn time / phpn time)")
        print(f"error         : phpn {'<=' if e_phpn.mean() <= e_sk.mean() else '>'} sklearn "
              f"({e_phpn.mean() - e_sk.mean():+.2e}); classes where phpn is lower: "
              f"{int((e_phpn <= e_sk).sum())}/{args.classes}")

    W = torch.randn(args.classes, args.dim, generator=torch.Generator().manual_seed(0)).to(dev)
    featd = {c: f.to(dev) for c, f in feats.items()}
    t = time.perf_counter()
    hd = decompose_head(featd, W, args.k, seed=0)
    sync()
    t_dec = time.perf_counter() - t
    print(f"decompose_head: {t_dec:8.2f} s  ({t_dec / args.classes * 1000:.1f} ms per class; NMF + scaling + "
          f"refinement), max head reconstruction error {float(hd.head_error.max()):.2e}")


if __name__ == "__main__":
    main()
