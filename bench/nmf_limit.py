"""The cost of ``phpn_core.decompose_head`` per class, in passes over F.

The unit: one streaming pass over the same features, ``F_c @ G`` with ``G [D, l]``, ``l = min(m, D, k +
oversample)`` (the NMF range finder's width, ``oversample`` read from ``nmf``'s defaults), batched over the classes
as the solver does it (``torch.bmm``), best of ``--repeats``. Every stage of ``decompose_head`` is then timed on the
same batch and printed as seconds per class and as stage time / one-pass time.

The stages are measured inside ``decompose_head`` itself (``phpn_core.method.stages.stage_clock``: each stage
device-synchronised at its boundaries, and its reads of F counted), best end-to-end run of ``--repeats``:
``checks`` (one ``aminmax`` per class), ``padding`` (the batch ``X [C, m, D]``), ``stats`` (``||X||^2``, mean),
``range_finder`` (1 + 2 x power_iters reads, QRs), ``project_start`` (``Q^T X``, SVD, NNDSVDa), ``compressed`` (HALS
sweeps on the compressed problem), ``polish`` (exact iterations, 2 reads each; the final error is the last one's),
``scaling``, ``refine_gram`` (the maps ``X [P; R]^T``, 1 read) and ``refine_solve``; ``other`` is the rest of the
end-to-end time. Also printed: the mean NMF error, sweeps and refinement iterations, and the float16 / bfloat16
pass time next to float32's.

    .venv/bin/python bench/nmf_limit.py                      # 20 classes x 1470 x 512, k = 10 (~1 min on 2 cores)
    .venv/bin/python bench/nmf_limit.py --classes 200 --device cuda --json

Measured here (2 shared cores, 20 x 1470 x 512, k = 10, rhals, 2026-12-07, back to back with the code before):
one pass ~0.3 ms per class; decompose_head 267 passes (85 ms per class) vs 275 before, at the same mean error
0.297368; 38 reads of F; the compressed sweeps (~120 passes), the polish (~56) and the refinement's solve (~62)
are the rest (README "Benchmarks").
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from phpn_core import decompose_head  # noqa: E402
from phpn_core.data.planted import planted_features  # noqa: E402
from phpn_core.method.stages import stage_clock  # noqa: E402

# the module, not the function of the same name that phpn_core.method re-exports
nmf_mod = importlib.import_module("phpn_core.method.nmf")


def _timer(dev: torch.device):
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def best(fn, repeats: int):
        """(best seconds over repeats, last result)."""
        out, ts = None, []
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            out = fn()
            sync()
            ts.append(time.perf_counter() - t)
        return min(ts), out

    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--rows-per-class", type=int, default=1470, help="n images x hw x hw (a multiple of hw^2)")
    ap.add_argument("--hw", type=int, default=7)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--noise", type=float, default=1.0, help="planted-parts noise (as bench/nmf_vs_sklearn.py)")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many for every timing (the pass: x3)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("nmf_limit: --device cuda asked for but CUDA is not available.")
    if args.rows_per_class % (args.hw * args.hw):
        sys.exit(f"nmf_limit: --rows-per-class must be a multiple of hw^2 = {args.hw ** 2}; got {args.rows_per_class}.")
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    dev = torch.device(args.device)
    best = _timer(dev)
    R = max(1, args.repeats)

    C, k, D = args.classes, args.k, args.dim
    feats, _, _ = planted_features(n_classes=C, n_images=args.rows_per_class // args.hw ** 2, hw=args.hw, dim=D,
                                   noise=args.noise, seed=0)
    feats = {c: f.to(dev) for c, f in feats.items()}
    weight = torch.randn(C, D, generator=torch.Generator().manual_seed(0)).to(dev)
    classes = sorted(feats)
    flat = [feats[c].reshape(-1, D) for c in classes]
    m = flat[0].shape[0]

    defaults = {n: p.default for n, p in inspect.signature(nmf_mod.nmf).parameters.items()
                if p.default is not inspect.Parameter.empty}
    oversample = defaults["oversample"]
    l = min(m, D, k + oversample)
    solver = "rhals" if (m * D) >= 4 * l * (m + D) else "hals"  # nmf's "auto" rule

    X = torch.stack(flat)  # [C, m, D], as _decompose_batch builds it (no padding needed: equal rows)
    bytes_F = X.numel() * X.element_size()
    print(f"problem: {C} classes x {m} rows x {D} channels (F {bytes_F / 1e6:.1f} MB), k={k}, l={l}, "
          f"solver={solver}, device={dev}, threads={args.threads}")

    # ---- the unit: one streaming pass over F
    G = torch.randn(C, D, l, generator=torch.Generator().manual_seed(1)).to(dev)
    t_pass, _ = best(lambda: torch.bmm(X, G), 3 * R)
    gbps = bytes_F / t_pass / 1e9
    extra = {}
    for name, dt in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        try:
            Xh, Gh = X.to(dt), G.to(dt)
            extra[name] = best(lambda a=Xh, b=Gh: torch.bmm(a, b), 3 * R)[0]
            del Xh, Gh  # the lambda holds its own references until it is dropped
        except RuntimeError as e:  # an op without a kernel for that dtype on this device
            extra[name] = float("nan")
            print(f"({name} pass not measured: {str(e).splitlines()[0]})")

    # ---- decompose_head end to end, every stage measured inside it (phpn_core.method.stages), best of R
    runs = []
    for _ in range(R):
        with stage_clock(dev) as clock:
            sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
            sync()
            t = time.perf_counter()
            hd = decompose_head(feats, weight, k, seed=0, device=dev)
            sync()
            runs.append((time.perf_counter() - t, dict(clock.seconds), dict(clock.reads), hd))
    t_dh, T, reads, hd = min(runs, key=lambda r: r[0])
    order = ["checks", "padding", "stats", "range_finder", "project_start", "compressed", "polish", "start", "sweeps",
             "scaling", "refine_gram", "refine_solve"]
    stages = [s for s in order if s in T] + sorted(set(T) - set(order))
    T["other"] = max(0.0, t_dh - sum(T[s] for s in stages))
    stages.append("other")
    passes = {s: T[s] / t_pass for s in stages}
    total = sum(passes.values())
    rel = float(hd.rel_error.mean())
    n_it = hd.diagnostics["nmf_iter"].double()
    r_it = hd.diagnostics["refine_iter"].double()
    print(f"\none pass F @ G [D, {l}]: {t_pass / C * 1e3:.3f} ms per class, {gbps:.2f} GB/s (bytes of F / time); "
          f"float16 {extra['float16'] / t_pass:.2f}x, bfloat16 {extra['bfloat16'] / t_pass:.2f}x that time")
    print(f"\n{'stage':<14} {'ms/class':>10} {'passes':>9} {'reads':>6} {'share':>7}")
    for s in stages:
        print(f"{s:<14} {T[s] / C * 1e3:>10.3f} {passes[s]:>9.1f} {reads.get(s, 0):>6d} {passes[s] / total:>6.1%}")
    print(f"{'decompose_head':<14} {t_dh / C * 1e3:>10.3f} {total:>9.1f} {sum(reads.values()):>6d}   "
          "(end to end; passes = time / one pass, reads = products with F counted)")
    print(f"\nnmf rel. error: mean {rel:.6f}; NMF sweeps per class mean {float(n_it.mean()):.1f} (compressed + "
          f"polish), refinement iterations mean {float(r_it.mean()):.1f} (max {int(r_it.max())}); "
          f"max head error {float(hd.head_error.max()):.2e}")
    if args.json:
        print(json.dumps({
            "passes_total": total, "passes": passes, "reads": reads, "reads_total": sum(reads.values()),
            "gbps": gbps, "device": str(dev), "rel_error": rel,
            "classes": C, "rows_per_class": m, "dim": D, "k": k, "solver": solver, "l": l, "threads": args.threads,
            "pass_seconds_per_class": t_pass / C, "seconds_per_class": {s: T[s] / C for s in stages},
            "decompose_head_seconds_per_class": t_dh / C, "decompose_head_passes": t_dh / t_pass,
            "pass_ratio_float16": extra["float16"] / t_pass, "pass_ratio_bfloat16": extra["bfloat16"] / t_pass,
            "nmf_iter": float(n_it.mean()), "refine_iter": float(r_it.mean()),
        }))


if __name__ == "__main__":
    main()
