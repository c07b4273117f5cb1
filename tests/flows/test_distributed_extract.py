"""Distributed extraction (compute.extract_tasks): disjoint chunk ranges of one store as Ray tasks, byte-identical
to one extraction, resumable when a worker is SIGKILLed mid-range; unreadable images named where they are read.
Session runtime: conftest.phpn_runtime (Prefect test server + local Ray, 2 CPUs)."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from phpn_core.config import load_config

pytestmark = pytest.mark.slow

DATASET = {"n_classes": 4, "train_per_class": 6, "test_per_class": 2, "image_size": 48}


@pytest.fixture(scope="module")
def model_rec(tmp_path_factory):
    """An untrained synthparts CNN saved as a checkpoint (extraction does not need a trained one)."""
    from phpn_core.models.spec import checkpoint_digest
    from phpn_core.models.synthparts_cnn import SynthPartsCNN, save_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "sp.safetensors"
    save_model(SynthPartsCNN(4).eval(), path)
    return {"arch": "synthparts_cnn", "checkpoint": str(path), "num_classes": 4, "input_size": 48,
            "digest": checkpoint_digest(str(path))}


def _cfg(n_tasks, **dataset):
    return load_config(None, name="dx", dataset={**DATASET, **dataset}, compute={"extract_tasks": n_tasks},
                       evaluate={"enabled": False, "report": False})


def _run(cfg, model_rec, uri: str) -> dict:
    from prefect import flow
    from prefect_ray import RayTaskRunner

    from flows.decompose import extract_store

    @flow(name="extract-only", task_runner=RayTaskRunner())
    def extract_only() -> dict:
        return extract_store(cfg, model_rec, "train", uri)

    return extract_only()


def _chunk_bytes(uri: str) -> dict[str, bytes]:
    root = Path(uri) / "features"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(phpn_runtime, model_rec, tmp_path_factory):
    """One extraction task over the whole store (in a Ray worker, as the distributed ones)."""
    uri = str(tmp_path_factory.mktemp("ref") / "train.zarr")
    rec = _run(_cfg(1), model_rec, uri)
    assert rec["extract_tasks"] == 1 and rec["n_chunks"] >= 4
    return uri, rec


def test_disjoint_ranges_write_the_same_bytes_as_one_task(phpn_runtime, model_rec, reference, tmp_path):
    from phpn_core.storage.feature_store import FeatureStore

    ref_uri, ref = reference
    uri = str(tmp_path / "train.zarr")
    rec = _run(_cfg(3), model_rec, uri)
    assert rec["extract_tasks"] == 3 and rec["chunks_written"] == ref["n_chunks"]
    assert all(int(w.split(":")[1]) != os.getpid() for w in rec["workers"]), "extraction must run in Ray workers"
    assert rec["fingerprint"] == ref["fingerprint"] and FeatureStore.open(uri).is_complete
    got, want = _chunk_bytes(uri), _chunk_bytes(ref_uri)
    assert got.keys() == want.keys() and all(got[k] == want[k] for k in want), "chunks differ from one extraction"
    # Nothing left: a second run computes nothing.
    again = _run(_cfg(3), model_rec, uri)
    assert again["chunks_written"] == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def test_killed_extraction_worker_redoes_only_its_unfinished_chunks(phpn_runtime, model_rec, reference, fault_dir,
                                                                   tmp_path):
    from phpn_core.storage.feature_store import FeatureStore

    ref_uri, _ = reference
    uri = str(tmp_path / "train.zarr")
    (fault_dir / "extract.hold").touch()
    try:
        with ThreadPoolExecutor(1) as ex:
            fut = ex.submit(_run, _cfg(2), model_rec, uri)
            t0 = time.monotonic()
            while not list(fault_dir.glob("extract.held-*")):
                assert not fut.done(), f"the run ended before a worker held its range: {fut.result()}"
                assert time.monotonic() - t0 < 240, "no extraction worker held its range"
                time.sleep(0.05)
            pid = int(next(fault_dir.glob("extract.held-*")).name.rsplit("-", 1)[1])
            assert pid != os.getpid()
            done = set(range(FeatureStore.open(uri).n_chunks)) - set(FeatureStore.open(uri).missing_chunks())
            assert done, "the held worker had written one chunk"
            kept = {k: (Path(uri) / "done" / "c" / str(k)).stat().st_mtime_ns for k in done}
            os.kill(pid, signal.SIGKILL)
            rec = fut.result(timeout=240)
    finally:
        (fault_dir / "extract.hold").unlink(missing_ok=True)
        for p in fault_dir.glob("extract.held-*"):
            p.unlink()
    assert not _alive(pid)
    assert f"{os.uname().nodename}:{pid}" not in rec["workers"], "the killed worker cannot have returned"
    assert {k: (Path(uri) / "done" / "c" / str(k)).stat().st_mtime_ns for k in done} == kept, \
        "chunks finished before the kill must be kept, not recomputed"
    got, want = _chunk_bytes(uri), _chunk_bytes(ref_uri)
    assert got.keys() == want.keys() and all(got[k] == want[k] for k in want)


def test_an_unreadable_image_is_named_by_the_extraction_task(phpn_runtime, model_rec, tmp_path):
    """ImageFolder with one truncated JPEG among good ones: the pre-flight sample can miss it (it is not probed up
    front beyond the sample); the extraction task that reads it fails naming it, and its features are never
    written."""
    from PIL import Image

    from phpn_core.data.images import ImageLoadError

    root = tmp_path / "imgs"
    for c in ("a", "b"):
        for split in ("train", "test"):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 40), (40 * i, 90, 30 if c == "a" else 200)).save(root / split / c / f"{i}.jpg")
    bad = root / "train" / "b" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:60])
    cfg = load_config(None, name="dx", dataset={"kind": "imagefolder", "root": str(root), "image_size": 48},
                      model={"arch": "synthparts_cnn", "checkpoint": model_rec["checkpoint"], "num_classes": 2},
                      compute={"extract_tasks": 2}, evaluate={"enabled": False, "report": False})
    rec = {**model_rec, "num_classes": 2}
    from phpn_core.models.spec import checkpoint_digest
    from phpn_core.models.synthparts_cnn import SynthPartsCNN, save_model

    save_model(SynthPartsCNN(2).eval(), tmp_path / "sp2.safetensors")
    rec.update(checkpoint=str(tmp_path / "sp2.safetensors"), digest=checkpoint_digest(tmp_path / "sp2.safetensors"))
    with pytest.raises(ImageLoadError, match=r"b/1\.jpg") as ei:
        _run(cfg, rec, str(tmp_path / "train.zarr"))
    assert "Fix:" in str(ei.value)


@pytest.mark.parametrize("n, limit", [(0, 4), (3, 4), (4, 4), (5, 4), (1000, 7), (4097, 4096), (10**6, 4096)])
def test_preflight_probes_a_bounded_evenly_spaced_sample(n, limit):
    from tasks.prepare import preflight_sample

    paths = list(range(n))
    got = preflight_sample(paths, limit)
    if n <= limit:
        assert got == paths
    else:
        assert len(got) == limit and got[0] == 0 and got[-1] == n - 1
        assert all(a < b for a, b in zip(got, got[1:])), "distinct, in order"
        gaps = [b - a for a, b in zip(got, got[1:])]
        assert max(gaps) - min(gaps) <= 1, "evenly spaced"
