"""Load: a sweep of N configurations (default 8) on the local cluster, all entries checked, peak memory printed.

Runs on the embedded runtime (temporary Prefect server + a local Ray sized to the machine) unless PREFECT_API_URL /
RAY_ADDRESS (or --ray-address) name existing ones. One synthparts classifier is trained first (in-process, once);
the N configurations decompose it with different k / seeds / normalisations into ONE shared registry, at most
``--concurrency`` runs at a time (the sweep flow's subflows), so publishers of different entries overlap.

Measured in the same process, same cluster:
- baseline: one configuration alone (the first of the sweep, into its own registry), timed on warm workers after
  an untimed cold run (whose time is printed too: fresh Ray workers import torch and Prefect first);
- the sweep: wall time, and the ratio (sweep wall / N) / baseline: < 1 means the sweep overlaps runs, > 1 that it
  pays for contention;
- peak RSS of the driver plus every descendant process (Ray's GCS, raylet and workers, the Prefect server), sampled
  every 0.2 s from /proc (on a remote Ray cluster only the driver side is seen);
- correctness of every entry: published, prototypes sum exactly to the head rows (<= 1e-4), the decomposed logits
  equal the original (max_abs_logit_diff <= 1e-4), and the entry listing holds exactly the N entries.

    .venv/bin/python bench/sweep_load.py [--configs 8] [--classes 4] [--out runs/bench-sweep-load]

Exit status 1 when an entry is missing or wrong. ``run_sweep_load`` is what tests/flows/test_faults.py calls.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read().decode("latin-1")
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss(root: int | None = None) -> tuple[int, int, int]:
    """``(total bytes, driver bytes, processes)`` of ``root`` (default: this process) and all its descendants."""
    root = os.getpid() if root is None else root
    kids = _children()
    todo, seen = [root], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        todo.extend(kids.get(p, []))
    return sum(_rss(p) for p in seen), _rss(root), len(seen)


class PeakRSS:
    """Samples :func:`tree_rss` in a daemon thread every ``interval`` seconds; ``peak`` / ``peak_driver`` in bytes."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak, self.peak_driver, self.peak_procs = interval, 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="peak-rss")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        total, driver, n = tree_rss()
        self.peak, self.peak_driver = max(self.peak, total), max(self.peak_driver, driver)
        self.peak_procs = max(self.peak_procs, n)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()


def sweep_configs(checkpoint: str, n_configs: int, n_classes: int, registry: str) -> list[dict]:
    """``n_configs`` distinct run overrides (k, seed, normalization) of one base, sharing ``registry``."""
    variants = []
    for i in range(n_configs):
        variants.append({"name": f"load-{i}", "decompose": {"k": 2 + i % 3, "seed": i // 3,
                                                            "normalization": "l2" if i % 2 == 0 else "none"}})
    return variants


def base_config(checkpoint: str, n_classes: int, registry: str) -> dict:
    return {"name": "load", "model": {"arch": "synthparts_cnn", "checkpoint": checkpoint},
            "dataset": {"n_classes": n_classes, "train_per_class": 10, "test_per_class": 4, "image_size": 64},
            "decompose": {"k": 3, "nmf_max_iter": 200, "refine_iter": 30},
            "compute": {"classes_per_task": 2}, "storage": {"registry_uri": registry},
            "evaluate": {"enabled": False, "report": False}}


def check_entries(out: Path, rows: list[dict], registry: str) -> list[str]:
    """Problems with the sweep's entries (empty: all correct)."""

    from phpn_core.storage.registry import PrototypeRegistry
    from phpn_core.storage.tensorio import read_tensors

    problems = []
    reg = PrototypeRegistry(registry)
    listed = {e.entry_id for e in reg.entries()}
    ids = [r.get("entry_id") for r in rows]
    if len(set(ids)) != len(rows) or listed != set(ids):
        problems.append(f"the registry lists {sorted(listed)}, the sweep produced {ids}")
    for r in rows:
        if r.get("status") != "ok":
            problems.append(f"{r['name']}: {r.get('status')}")
            continue
        if not (r.get("max_abs_logit_diff") is not None and r["max_abs_logit_diff"] <= 1e-4):
            problems.append(f"{r['name']}: max_abs_logit_diff {r.get('max_abs_logit_diff')}")
        head, info = reg.load(r["entry_id"])
        linear, _ = read_tensors(f"{registry}/inputs/{r['entry_id']}/linear.safetensors")
        err = float((head.prototypes.sum(1) - linear["weight"].to(head.prototypes.dtype)).abs().max())
        if err > 1e-4 or info.k != r["k"]:
            problems.append(f"{r['name']}: head reconstruction error {err:.3g}, k {info.k} vs {r['k']}")
        if reg.versions(r["entry_id"]) != [info.version]:
            problems.append(f"{r['name']}: versions {reg.versions(r['entry_id'])}, pointer names {info.version}")
    return problems


def run_sweep_load(out: str | Path, *, n_configs: int = 8, n_classes: int = 4, concurrency: int = 2,
                   train_epochs: int = 1) -> dict:
    """Train once, run the baseline and the sweep on the current (or an embedded) runtime; return the figures."""
    import torch

    from flows.decompose import decompose_flow
    from flows.sweep import sweep_flow
    from phpn_core.config import DatasetConfig, SweepConfig, load_config
    from phpn_core.data.factory import build_dataset
    from phpn_core.models.synthparts_cnn import save_model, train_synthparts_cnn

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with PeakRSS() as mem:
        ckpt = out / "model.safetensors"
        if not ckpt.is_file():
            torch.manual_seed(0)
            ds = build_dataset(DatasetConfig(n_classes=n_classes, train_per_class=10, test_per_class=4,
                                             image_size=64), "train")
            save_model(train_synthparts_cnn(ds, epochs=train_epochs, seed=0, device="cpu", progress=False), ckpt)
        registry = str(out / "registry")
        base = base_config(str(ckpt), n_classes, registry)
        runs = sweep_configs(str(ckpt), n_configs, n_classes, registry)

        def alone(name: str) -> float:
            cfg = load_config(None, **{**base, **runs[0], "decompose": {**base["decompose"], **runs[0]["decompose"]},
                                       "name": name, "storage": {"registry_uri": str(out / f"{name}-registry")}})
            t = time.perf_counter()
            decompose_flow(cfg, str(out / name))
            return time.perf_counter() - t

        cold_s = alone("cold")  # fresh Ray workers import torch/prefect: not what a sweep pays per config
        baseline_s = alone("baseline")  # warm workers, fresh registry: every class recomputed

        sweep = SweepConfig.model_validate({"name": "load", "max_concurrency": concurrency, "base": base,
                                            "runs": runs})
        t = time.perf_counter()
        rows = sweep_flow(sweep, str(out / "sweep"))
        sweep_s = time.perf_counter() - t
    problems = check_entries(out, rows, registry)
    return {"configs": n_configs, "classes": n_classes, "concurrency": concurrency,
            "cold_one_config_s": round(cold_s, 2), "baseline_one_config_s": round(baseline_s, 2),
            "sweep_s": round(sweep_s, 2),
            "sweep_per_config_s": round(sweep_s / n_configs, 2),
            "ratio_per_config_vs_alone": round(sweep_s / n_configs / baseline_s, 3),
            "peak_rss_mb": round(mem.peak / 2**20, 1), "peak_driver_rss_mb": round(mem.peak_driver / 2**20, 1),
            "peak_processes": mem.peak_procs, "entries_ok": not problems, "problems": problems}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", type=int, default=8)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--out", default="runs/bench-sweep-load")
    ap.add_argument("--ray-address", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the output directory of an earlier run")
    args = ap.parse_args()
    if args.configs < 1:
        ap.error("--configs must be >= 1")
    from flows.runtime import quiet_environment

    quiet_environment()
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from flows.runtime import runtime

    out = Path(args.out)
    if out.exists() and not args.keep:
        shutil.rmtree(out)
    t = time.perf_counter()
    with runtime(ray_address=args.ray_address) as rt:
        starts = {"prefect_start_s": round(rt.prefect_started_s, 1), "ray_start_s": round(rt.ray_started_s, 1),
                  "ray": rt.ray_address or "local"}
        res = run_sweep_load(out, n_configs=args.configs, n_classes=args.classes, concurrency=args.concurrency)
    res.update(starts, total_s=round(time.perf_counter() - t, 1))
    print(json.dumps(res, indent=2))
    print(f"peak RSS (driver + Ray + Prefect processes): {res['peak_rss_mb']:.0f} MiB "
          f"(driver {res['peak_driver_rss_mb']:.0f} MiB, up to {res['peak_processes']} processes)")
    print(f"sweep of {res['configs']}: {res['sweep_s']:.1f} s = {res['sweep_per_config_s']:.2f} s per config; one "
          f"config alone {res['baseline_one_config_s']:.2f} s (cold: {res['cold_one_config_s']:.2f} s); ratio "
          f"{res['ratio_per_config_vs_alone']:.2f}")
    print("all entries correct" if res["entries_ok"] else "PROBLEMS:\n  " + "\n  ".join(res["problems"]))
    return 0 if res["entries_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
