"""The cost curve of `phpn decompose` (issue 15): ImageNet-shaped synthetic feature stores (D = 2048, 7 x 7 maps,
a few images per class), decomposed by the real flow (``flows.decompose.decompose_store_flow``: temporary Prefect
server, local Ray) at C = 10, 100 and 1000 classes.

Stores are written by a child process (``FeatureStore.create`` + ``write_chunk``, as an outsider would), so the
driver's memory is only the flow's. Per C it prints: the flow's stage seconds (inputs, decomposition fan-out,
publish, parity), seconds per class, the orchestration share ((flow wall - summed shard compute) / flow wall),
the driver's peak RSS during the flow (sampled from /proc every 20 ms) next to the head's size, and one shard
worker's peak RSS. Then the floors: s/class at C=1000 <= 1.3 x at C=100; orchestration <= 15 % at C=1000; driver
peak not growing with C beyond the head.

    .venv/bin/python bench/scale.py [--classes 10 100 1000] [--per-class 2] [--k 5] [--device cpu|cuda]
                                    [--work runs/bench-scale] [--shards 8] [--publish-s3]
    .venv/bin/python bench/scale.py --publish-s3-only [--classes 1000]   # after a run: publish 1000 from S3
    .venv/bin/python bench/scale.py --images-per-class 1300 --classes 20 --one-class   # full-size ImageNet classes

Classes larger than ``phpn_core.method.decompose.STREAM_BYTES`` in float32 are streamed from the store in row blocks
(``FeatureStore.class_row_source``); ``--one-class`` then measures one such class alone in a fresh process, streamed
and in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

D, HW = 2048, (7, 7)


def make_store(uri: str, n_classes: int, per_class: int, *, seed: int = 0, split: str = "train") -> None:
    """A post-ReLU-like float16 store: per class a planted rank-8 non-negative structure plus noise."""
    import numpy as np
    import torch

    from phpn_core import FeatureSchema, FeatureStore

    rng = np.random.default_rng(seed)
    n = n_classes * per_class
    labels = np.repeat(np.arange(n_classes), per_class)
    schema = FeatureSchema(model="synthetic-resnet50", checkpoint_digest=f"sha256:scale{seed}", layer="layer4",
                           input_size=224, dataset=f"imagenet-shaped-{n_classes}", dataset_fingerprint=f"s{seed}",
                           split=split, dtype="float16", n_images=n, n_classes=n_classes, feature_shape=(*HW, D),
                           class_names=[f"n{c:08d}" for c in range(n_classes)])
    store = FeatureStore.create(uri, schema, labels=labels, image_ids=[f"{split}_{i:07d}" for i in range(n)],
                                # full-size classes: the default 1-4 MiB chunks (one class per chunk would be 260 MB)
                                images_per_chunk=per_class if per_class <= 16 else None, compression="none",
                                overwrite=True)
    basis = rng.gamma(0.6, 1.0, size=(64, D)).astype(np.float32)
    for k in range(store.n_chunks):
        idx = store.chunk_indices(k)
        if len(idx) == 0:
            continue
        c = int(labels[idx[0]])
        crng = np.random.default_rng(seed * 1_000_003 + c)
        parts = basis[crng.choice(64, 8, replace=False)]
        if k != store.class_chunks(c)[0]:  # a class's later chunks (full-size classes): their own images
            crng = np.random.default_rng([seed, c, k])
        E = crng.gamma(0.5, 1.0, size=(len(idx) * HW[0] * HW[1], 8)).astype(np.float32)
        F = E @ parts + crng.gamma(0.3, 0.1, size=(E.shape[0], D)).astype(np.float32)
        store.write_chunk(k, torch.from_numpy(F.reshape(len(idx), *HW, D)))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakRSS:
    """Peak RSS of this process while the context is open (sampled every ``every`` s)."""

    def __init__(self, every: float = 0.02) -> None:
        self.every, self.peak, self._stop = every, 0.0, threading.Event()

    def __enter__(self):
        self.start = _rss_mb()
        self.peak = self.start
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(self.every)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_mb())


def run_scale(work: Path, classes: list[int], *, per_class: int, k: int, device: str, shards: int,
              nmf_iter: int, refine_iter: int, num_cpus: int | None = None, warmup: bool = True) -> list[dict]:
    from flows.runtime import quiet_environment

    quiet_environment()
    work.mkdir(parents=True, exist_ok=True)
    # 1. Stores and heads, in a child process (its memory is not the driver's).
    for C in classes:
        store = work / f"c{C}" / "train.zarr"
        if not (store / "zarr.json").exists() or not (work / f"c{C}" / "head.safetensors").exists():
            t = time.perf_counter()
            code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from bench.scale import make_store, make_head; "
                    f"make_store({str(store)!r}, {C}, {per_class}); make_head({str(work / f'c{C}' / 'head.safetensors')!r}, {C})")
            subprocess.run([sys.executable, "-c", code], check=True)
            print(f"store C={C}: {C * per_class} images written in {time.perf_counter() - t:.1f} s", flush=True)
    # 2. The flow on each, one Prefect server and one local Ray for all.
    from flows.decompose import decompose_store_flow
    from flows.runtime import runtime
    from phpn_core.config import load_config

    rows = []
    with runtime(num_cpus=num_cpus) as rt:
        import ray

        slots = max(1, int(ray.cluster_resources().get("CPU", 1)))  # cpus_per_task = 1
        print(f"one-time starts: Prefect server {rt.prefect_started_s:.1f} s, Ray {rt.ray_started_s:.1f} s; "
              f"{slots} shard slots", flush=True)
        if warmup:  # Ray workers start and import torch once: an untimed run on the smallest store first
            C0 = classes[0]
            t = time.perf_counter()
            decompose_store_flow(load_config(None, name="scale-warmup", decompose={"k": k, "nmf_max_iter": 5,
                                                                                  "refine_iter": 1},
                                             compute={"classes_per_task": 1}),
                                 str(work / f"c{C0}" / "train.zarr"), str(work / f"c{C0}" / "head.safetensors"),
                                 str(work / "warmup"))
            shutil.rmtree(work / "warmup", ignore_errors=True)
            print(f"warm-up (untimed): {time.perf_counter() - t:.1f} s", flush=True)
        for C in classes:
            out = work / f"c{C}" / "run"
            shutil.rmtree(out, ignore_errors=True)
            cfg = load_config(None, name=f"scale-{C}", decompose={"k": k, "nmf_max_iter": nmf_iter,
                                                                  "refine_iter": refine_iter},
                              compute={"classes_per_task": max(1, -(-C // shards)), "device": device})
            with PeakRSS() as mem:
                t = time.perf_counter()
                m = decompose_store_flow(cfg, str(work / f"c{C}" / "train.zarr"),
                                         str(work / f"c{C}" / "head.safetensors"), str(out))
                wall = time.perf_counter() - t
            st = m["stage_seconds"]
            rows.append({
                "C": C, "images": C * per_class, "shards": m["shards"], "wall_s": round(wall, 2),
                **{f"{s}_s": round(v, 2) for s, v in st.items()},
                "s_per_class": round(wall / C, 4),
                "shard_compute_s": m["shard_compute_seconds"],
                "orchestration": round((wall - m["shard_compute_seconds"]) / wall, 3),
                # with `slots` shards running at once, the share of the slots' time not spent in shard compute
                "idle_share": round(1 - m["shard_compute_seconds"] / (wall * slots), 3),
                "driver_peak_mb": round(mem.peak, 1), "driver_growth_mb": round(mem.peak - mem.start, 1),
                "head_mb": round(C * D * 4 / 2**20, 1), "shard_peak_mb": m["shard_peak_rss_mb"],
                "shard_start_mb": m.get("shard_start_rss_mb"),
                "s_per_class_shard": round(m["shard_compute_seconds"] / C, 3),
                "max_head_error": m["max_head_reconstruction_error"],
            })
            print(json.dumps(rows[-1]), flush=True)
    return rows


def publish_from_s3(work: Path, C: int) -> dict:
    """Publishing C staged classes from S3 (moto, real HTTP on 127.0.0.1): the C = ``C`` run's staged class objects
    are uploaded to a fresh bucket, then ``PrototypeRegistry.publish`` gathers them (up to 16 requests in flight)
    and writes the entry; timed against the same publish from the local registry."""
    import s3fs

    from bench._loopback_s3 import loopback_s3
    from phpn_core.storage.registry import PrototypeRegistry
    from phpn_core.storage.tensorio import read_tensors

    local = work / f"c{C}" / "run" / "registry"
    entry = next((local / "staging").iterdir()).name
    bias = read_tensors(str(next((local / "inputs").iterdir()) / "linear.safetensors"))[0]["bias"].float()
    with loopback_s3("scale") as opts:
        fs = s3fs.S3FileSystem(**opts)
        t = time.perf_counter()
        fs.put(str(local / "staging" / entry), f"scale/registry/staging/{entry}", recursive=True)
        upload = time.perf_counter() - t
        reg = PrototypeRegistry("s3://scale/registry", storage_options=opts)
        t = time.perf_counter()
        info = reg.publish(entry, n_classes=C, bias=bias)
        s3_s = time.perf_counter() - t
        t = time.perf_counter()
        PrototypeRegistry(str(local)).publish(entry, n_classes=C, bias=bias)
        local_s = time.perf_counter() - t
    return {"C": C, "staged_objects": C, "upload_s": round(upload, 2), "publish_s3_s": round(s3_s, 2),
            "publish_local_s": round(local_s, 2), "n_classes": info.n_classes}


def one_class_memory(store_uri: str, head_uri: str, c: int, k: int) -> dict:
    """Class ``c`` decomposed twice in this process: streamed from the store (``class_row_source``), then read whole
    in float32 and decomposed in memory (``stream_bytes`` off). RSS before each (after imports and the store's
    metadata) and its peak during each, sampled every 5 ms; the two results' NMF errors and head errors."""
    import torch

    from phpn_core import FeatureStore, decompose_head
    from phpn_core.storage.tensorio import read_tensors

    torch.set_num_threads(os.cpu_count() or 1)
    store = FeatureStore.open(store_uri)
    W = read_tensors(head_uri)[0]["weight"].float()
    out = {"class": c, "images": int(store.class_counts[c]), "k": k}
    for name, feats, kw in (("streamed", lambda: {c: store.class_row_source(c)}, {}),
                            ("in_memory", lambda: {c: store.class_features(c)}, {"stream_bytes": 1 << 62})):
        base = _rss_mb()
        t = time.perf_counter()
        with PeakRSS(every=0.005) as mem:
            hd = decompose_head(feats(), W, k, seed=0, **kw)
        out[name] = {"rss_before_mb": round(base, 1), "peak_mb": round(mem.peak, 1),
                     "growth_mb": round(mem.peak - base, 1), "seconds": round(time.perf_counter() - t, 2),
                     "rel_error": float(hd.rel_error[0]), "head_error": float(hd.head_error[0])}
        del hd
    a, b = out["streamed"]["rel_error"], out["in_memory"]["rel_error"]
    out["rel_error_rel_diff"] = abs(a - b) / b
    return out


def make_head(path: str, n_classes: int, seed: int = 0) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    save_file({"weight": torch.randn(n_classes, D, generator=g) * 0.02, "bias": torch.zeros(n_classes)}, path)


def table(rows: list[dict]) -> str:
    cols = ["C", "images", "shards", "wall_s", "inputs_s", "decomposition_s", "publish_s", "parity_s", "s_per_class",
            "orchestration", "idle_share", "driver_peak_mb", "driver_growth_mb", "head_mb", "shard_start_mb", "shard_peak_mb", "s_per_class_shard", "max_head_error"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def floors(rows: list[dict]) -> list[str]:
    by = {r["C"]: r for r in rows}
    out = []
    if 100 in by and 1000 in by:
        ratio = by[1000]["s_per_class"] / by[100]["s_per_class"]
        out.append(f"s/class C=1000 / C=100 = {ratio:.2f} (floor <= 1.3): {'ok' if ratio <= 1.3 else 'MISSED'}")
    if 1000 in by:
        o, idle = by[1000]["orchestration"], by[1000]["idle_share"]
        # (wall - summed compute) / wall goes negative when shards run in parallel: the idle share of the shard
        # slots, 1 - compute / (slots x wall), is the meaningful reading then.
        out.append(f"orchestration at C=1000: (wall - compute) / wall = {100 * o:.1f}%; idle share of the shard slots "
                   f"{100 * idle:.1f}% (floor <= 15%): {'ok' if max(o, idle) <= 0.15 else 'MISSED'}")
    if len(rows) >= 2:
        lo, hi = rows[0], rows[-1]
        extra = (hi["driver_growth_mb"] - lo["driver_growth_mb"]) - (hi["head_mb"] - lo["head_mb"])
        out.append(f"driver growth C={hi['C']} vs C={lo['C']}: {hi['driver_growth_mb'] - lo['driver_growth_mb']:.0f} MB "
                   f"(head: {hi['head_mb'] - lo['head_mb']:.0f} MB; beyond the head {extra:.0f} MB)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--per-class", "--images-per-class", dest="per_class", type=int, default=2,
                    help="images per class (7x7 each: 49 rows per image; ImageNet: ~1300)")
    ap.add_argument("--one-class", action="store_true", help="also measure one class alone in a fresh process: "
                    "peak memory streamed from the store vs decomposed in memory, and their results")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--nmf-iter", type=int, default=200)
    ap.add_argument("--refine-iter", type=int, default=50)
    ap.add_argument("--shards", type=int, default=8, help="shards per run (classes_per_task = ceil(C / shards))")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--num-cpus", type=int, default=None)
    ap.add_argument("--work", default="runs/bench-scale")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--publish-s3", action="store_true", help="also time publishing the largest C's staged classes "
                    "from S3 (moto)")
    ap.add_argument("--publish-s3-only", action="store_true", help="only that, from the staged classes of an "
                    "earlier run in --work")
    args = ap.parse_args()
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    if args.publish_s3_only:
        print(json.dumps(publish_from_s3(Path(args.work), max(args.classes))))
        return
    rows = run_scale(Path(args.work), sorted(args.classes), per_class=args.per_class, k=args.k, device=args.device,
                     shards=args.shards, nmf_iter=args.nmf_iter, refine_iter=args.refine_iter, num_cpus=args.num_cpus,
                     warmup=not args.no_warmup)
    print()
    print(table(rows))
    for line in floors(rows):
        print(line)
    if args.one_class:
        C = max(args.classes)
        code = (f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); from bench.scale import one_class_memory; "
                f"print(json.dumps(one_class_memory({str(Path(args.work) / f'c{C}' / 'train.zarr')!r}, "
                f"{str(Path(args.work) / f'c{C}' / 'head.safetensors')!r}, 0, {args.k})))")
        res = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
        print("one class alone:", res.stdout.strip().splitlines()[-1])
    if args.publish_s3:
        print("publish from S3 (moto):", json.dumps(publish_from_s3(Path(args.work), max(args.classes))))


if __name__ == "__main__":
    main()
