"""Feature-extraction throughput: extraction into a local feature store vs the bare forward pass, and S3 vs local reads.

For each model, the same images go through the same DataLoader settings and the same batches (a batch never
straddles a store chunk) in several modes, each run once per round, in a shuffled order, for several rounds:

- ``forward``: decode -> normalise -> forward, output discarded (the model as given: the baseline);
- ``forward cl``: the same with the model in channels-last layout, as extraction runs it (to separate the storage
  overhead from the layout's gain);
- ``extract``: ``extract_features`` into a fresh local store (store creation, channels-last copy, background writes
  and the done markers included): float32 and float16 with the default zstd compression, and float32 uncompressed
  (``compression="none"``, "raw").

``ratio`` = extract images/s / forward images/s (the target is >= 0.9). Two input paths are measured:
``decoded`` renders SynthParts images in the loop (what a real run does: decoding costs as much as the tiny CNN),
``cached`` feeds pre-rendered tensors (isolates the forward pass from decoding, the harder case for the ratio).

Then one class's features are read back from an S3 store (a moto server started here on a free loopback port)
and from the local store: best of N ``store.class_features(c)``.

Usage: ``python bench/extract_throughput.py [--quick] [--threads 2] [--no-resnet]`` (about 5 minutes on 2 CPU cores;
``--quick`` about one).
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision.models as tvm
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phpn_core.models.split import split_classifier  # noqa: E402
from phpn_core.data.base import normalize  # noqa: E402
from phpn_core.data.synthparts import SynthParts  # noqa: E402
from phpn_core.extract import extract_features  # noqa: E402
from phpn_core.extract.pipeline import collate as _collate  # noqa: E402
from phpn_core.models.synthparts_cnn import SynthPartsCNN  # noqa: E402
from phpn_core.storage.feature_store import FeatureStore  # noqa: E402


class Cached(Dataset):
    """A dataset's items rendered once into memory, with the same attributes (classes, labels, ids, mean, std)."""

    def __init__(self, ds: SynthParts) -> None:
        self.items = [ds[i] for i in range(len(ds))]
        self.classes, self.labels, self.part_names = ds.classes, ds.labels, ds.part_names
        self.mean, self.std, self.split, self.image_size = ds.mean, ds.std, ds.split, ds.image_size
        self.image_ids = [it["image_id"] for it in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def batch_plan(store: FeatureStore, batch_size: int) -> list[list[int]]:
    """The batches extract_features uses: each chunk's dataset indices cut into batches of <= batch_size."""
    plan = []
    for k in range(store.n_chunks):
        idx = store.chunk_indices(k).tolist()
        plan += [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    return plan


def bare_forward(features: nn.Module, ds, plan: list[list[int]], num_workers: int, *,
                 channels_last: bool = False) -> tuple[float, float, float]:
    """(wall s, process CPU s, 0) of decode -> normalise -> forward over the batches ``plan``, output discarded;
    ``channels_last``: with the weights and inputs in channels-last layout, as extraction runs them."""
    loader = DataLoader(ds, batch_sampler=plan, num_workers=num_workers, collate_fn=_collate)
    model = copy.deepcopy(features).to(memory_format=torch.channels_last) if channels_last else features
    t, c = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for batch in loader:
            model(normalize(batch["image"], ds.mean, ds.std))
    return time.perf_counter() - t, time.process_time() - c, 0.0


def extract(features: nn.Module, ds, uri: str, *, dtype: str, batch_size: int,
            num_workers: int, compression: str = "zstd") -> tuple[float, float, float]:
    """(wall s, process CPU s (all threads), setup s) of extract_features into a fresh local store."""
    shutil.rmtree(uri, ignore_errors=True)
    t, c = time.perf_counter(), time.process_time()
    res = extract_features(features, ds, uri, checkpoint_digest="none", dtype=dtype, batch_size=batch_size,
                           num_workers=num_workers, progress=False, compression=compression)
    return time.perf_counter() - t, time.process_time() - c, res.setup_seconds


def compare(name: str, features: nn.Module, ds, workdir: str, *, batch_size: int, num_workers: int, reps: int,
            rows: list) -> str:
    """``reps`` rounds; each runs every mode once, in a shuffled order. The machine's speed drifts by tens of percent
    from second to second, so each mode is compared with the forward pass of its own round (paired), and the median
    of those paired ratios is reported, with the best-of-rounds ratio beside it."""
    uri = os.path.join(workdir, name.replace(" ", "_"))
    # Create the store only (chunks=[] computes nothing): its layout gives the batches extraction uses.
    extract_features(features, ds, uri, checkpoint_digest="none", batch_size=batch_size, chunks=[], progress=False)
    plan = batch_plan(FeatureStore.open(uri), batch_size)
    bare_forward(features, ds, plan[:2], num_workers)  # warm-up (oneDNN primitives, allocator)
    bare_forward(features, ds, plan[:2], num_workers, channels_last=True)
    modes = {
        "forward": lambda: bare_forward(features, ds, plan, num_workers),
        "forward cl": lambda: bare_forward(features, ds, plan, num_workers, channels_last=True),
        "extract f32": lambda: extract(features, ds, uri, dtype="float32", batch_size=batch_size,
                                       num_workers=num_workers),
        "extract f16": lambda: extract(features, ds, uri + "16", dtype="float16", batch_size=batch_size,
                                       num_workers=num_workers),
        "extract f32 raw": lambda: extract(features, ds, uri + "raw", dtype="float32", batch_size=batch_size,
                                           num_workers=num_workers, compression="none"),
    }
    runs: dict[str, list[tuple[float, float, float]]] = {m: [] for m in modes}
    order = list(modes)
    rng = random.Random(0)
    for _ in range(reps):
        rng.shuffle(order)
        for m in order:
            runs[m].append(modes[m]())
    n = len(ds)
    fw = [r[0] for r in runs["forward"]]
    fcl = [r[0] for r in runs["forward cl"]]
    for mode, rs in runs.items():
        walls = [r[0] for r in rs]
        paired = statistics.median(f / w for f, w in zip(fw, walls))
        paired_cl = statistics.median(f / w for f, w in zip(fcl, walls))
        steady = statistics.median(f / (w - r[2]) for f, w, r in zip(fw, walls, rs))
        best = min(walls)
        rows.append((name, mode, n, best, n / best, min(fw) / best, paired, steady, paired_cl,
                     statistics.median(r[2] for r in rs)))
    return uri


def s3_vs_local(local_uri: str, features: nn.Module, ds, *, reps: int) -> list[tuple]:
    from bench._loopback_s3 import loopback_s3

    with loopback_s3("bench") as opts:
        s3_uri = "s3://bench/features"
        extract_features(features, ds, s3_uri, checkpoint_digest="none", storage_options=opts, progress=False)
        rows = []
        for where, uri, o in (("local", local_uri, None), ("s3 (moto)", s3_uri, opts)):
            store = FeatureStore.open(uri, storage_options=o)
            store.class_features(0)  # warm-up: metadata, connections
            c = store.classes[-1]
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                f = store.class_features(c)
                times.append(time.perf_counter() - t)
            nbytes = f.numel() * (2 if store.schema.dtype == "float16" else 4)
            rows.append((where, list(f.shape), len(store.class_chunks(c)), nbytes / 2**20, min(times)))
        return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer images and repetitions (well under a minute)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on 2 shared cores it leaves one for decoding and writing; "
                         "OpenMP threads spin when the cores are busy)")
    ap.add_argument("--num-workers", type=int, default=0, help="DataLoader workers, the same for both (default 0)")
    ap.add_argument("--no-resnet", action="store_true", help="skip the ResNet-34 case")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    quick = args.quick
    reps = 3 if quick else 7
    rows: list[tuple] = []
    t_all = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="phpn-bench-")
    try:
        # SynthParts CNN at 112 px.
        n_pc = 20 if quick else 150  # enough images that per-image costs, not the store's creation, decide
        sp = SynthParts(split="train", n_classes=8, n_per_class=n_pc, image_size=112)
        torch.manual_seed(0)
        cnn_features = split_classifier(SynthPartsCNN(8, stride=8).eval())[0]  # the demo's model
        local_uri = compare("synthparts_cnn 112px decoded", cnn_features, sp, workdir, batch_size=64,
                            num_workers=args.num_workers, reps=reps, rows=rows)
        compare("synthparts_cnn 112px cached", cnn_features, Cached(sp), workdir, batch_size=64,
                num_workers=args.num_workers, reps=reps, rows=rows)

        # ResNet-34 at 224 px, random init.
        if not args.no_resnet:
            # ~5 s a run on 2 cores: fewer rounds (its ratio is far from the floor either way)
            rn_pc = 4 if quick else 8
            rds = Cached(SynthParts(split="train", n_classes=4, n_per_class=rn_pc, image_size=224))
            rn_features = split_classifier(tvm.resnet34(weights=None, num_classes=4).eval())[0]
            compare("resnet34 224px cached", rn_features, rds, workdir, batch_size=32, num_workers=args.num_workers,
                    reps=max(2, reps // 2), rows=rows)

        print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} intra-op threads, {os.cpu_count()} cores, "
              f"num_workers={args.num_workers}, {reps} rounds, modes in shuffled order each round")
        print("ratio = forward wall s / mode wall s (>= 0.9 wanted). median = median over rounds of the ratio to the "
              "same round's forward (paired; the headline figure); best = best forward / best mode; steady = median "
              "paired ratio without the extraction's fixed setup (dry run, store creation: the per-image rate of a "
              "long run); vs cl = median paired ratio to a channels-last forward (storage overhead alone); setup = "
              "median setup s")
        print(f"{'case':30s} {'mode':15s} {'images':>6s} {'best s':>7s} {'img/s':>7s} {'best':>5s} {'median':>6s} "
              f"{'steady':>6s} {'vs cl':>5s} {'setup s':>7s}")
        for name, mode, n, wall, ips, best, med, steady, vs_cl, setup in rows:
            print(f"{name:30s} {mode:15s} {n:6d} {wall:7.3f} {ips:7.1f} {best:5.2f} {med:6.2f} {steady:6.2f} "
                  f"{vs_cl:5.2f} {setup:7.3f}")

        s3_rows = s3_vs_local(local_uri, cnn_features, sp, reps=5 if quick else 10)
        print(f"\nread one class (store.class_features), best of {5 if quick else 10}")
        print(f"{'where':12s} {'shape':>20s} {'chunks':>6s} {'MiB':>6s} {'best ms':>8s}")
        for where, shape, nchunks, mib, secs in s3_rows:
            print(f"{where:12s} {str(shape):>20s} {nchunks:6d} {mib:6.2f} {secs * 1e3:8.1f}")
        print(f"s3 / local time ratio: {s3_rows[1][4] / s3_rows[0][4]:.1f}x")
        print(f"\ntotal {time.perf_counter() - t_all:.0f} s")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
