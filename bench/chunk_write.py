"""Chunk writes: ``FeatureStore.write_chunk`` (chunkio: encode with the array's own codecs, write the file) vs the same
whole chunks through zarr's own ``array[rows] = block`` (the path it replaced), same run, same data.

Per compression (zstd, lz4, none) and dtype, a fresh local store of 40 chunks of 30 x 14 x 14 x 128 (the demo CNN's
maps, about 3 MiB per float32 chunk, post-ReLU-like: ~30% zeros) is written both ways, alternated, best of N.
Reported: ms per chunk (features + keypoints + done marker) and the process CPU time per chunk, and the ratio
zarr / chunkio. A single thread writes, with no forward pass beside it: this isolates the write itself.

Usage: ``python bench/chunk_write.py [--reps 3] [--threads 1]`` (under a minute).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phpn_core.storage.feature_store import FeatureSchema, FeatureStore
from phpn_core.storage.schema import COMPRESSIONS  # noqa: E402

N_CHUNKS, IPC, SHAPE, P = 40, 30, (14, 14, 128), 12


def make_store(uri: str, dtype: str, compression: str) -> FeatureStore:
    n = N_CHUNKS * IPC
    schema = FeatureSchema(model="bench", checkpoint_digest="none", layer="features", input_size=112,
                           dataset="bench", dataset_fingerprint="bench", split="train", dtype=dtype, n_images=n,
                           n_classes=1, feature_shape=SHAPE, class_names=["c"], part_names=[f"p{i}" for i in range(P)])
    return FeatureStore.create(uri, schema, labels=np.zeros(n, dtype=np.int64), image_ids=[f"i{i}" for i in range(n)],
                               keypoints_shape=P, images_per_chunk=IPC, compression=compression, overwrite=True)


def via_chunkio(store: FeatureStore, feats: np.ndarray, kps: np.ndarray) -> None:
    for k in range(store.n_chunks):
        store.write_chunk(k, feats, keypoints=kps)


def via_zarr(store: FeatureStore, feats: np.ndarray, kps: np.ndarray) -> None:
    g = store._group  # the zarr group: the same arrays, written through zarr's own indexing path
    fa, ka, da = g["features"].with_config({"write_empty_chunks": True}), g["keypoints"], g["done"]
    dtype = store.schema.dtype
    for k in range(store.n_chunks):
        start = k * IPC
        fa[start : start + IPC] = feats.astype(dtype)
        ka[start : start + IPC] = kps
        da[k : k + 1] = np.ones(1, dtype=bool)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (write_chunk's cast and min/max)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    feats = np.maximum(rng.normal(0.3, 1.0, size=(IPC, *SHAPE)), 0).astype(np.float32)
    kps = rng.uniform(0, 112, size=(IPC, P, 3)).astype(np.float32)
    work = tempfile.mkdtemp(prefix="phpn-chunk-write-")
    print(f"{N_CHUNKS} chunks of {IPC} x {SHAPE}, best of {args.reps}; ms per chunk (wall / CPU)")
    print(f"{'compression':11s} {'dtype':7s} {'chunkio ms':>10s} {'cpu':>6s} {'zarr ms':>8s} {'cpu':>6s} "
          f"{'zarr/chunkio':>12s}")
    try:
        for compression in COMPRESSIONS:
            for dtype in ("float32", "float16"):
                best = {"chunkio": (float("inf"), 0.0), "zarr": (float("inf"), 0.0)}
                for _ in range(args.reps):
                    for name, fn in (("chunkio", via_chunkio), ("zarr", via_zarr)):
                        store = make_store(f"{work}/{name}", dtype, compression)
                        t, c = time.perf_counter(), time.process_time()
                        fn(store, feats, kps)
                        wall, cpu = time.perf_counter() - t, time.process_time() - c
                        if wall < best[name][0]:
                            best[name] = (wall, cpu)
                (wo, co), (wz, cz) = best["chunkio"], best["zarr"]
                per = 1e3 / N_CHUNKS
                print(f"{compression:11s} {dtype:7s} {wo * per:10.2f} {co * per:6.2f} {wz * per:8.2f} {cz * per:6.2f} "
                      f"{wz / wo:12.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
