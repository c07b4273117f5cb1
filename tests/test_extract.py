"""extract_features: exact features, float16, keypoints, resume after SIGKILL and after an exception (byte-identical,
only missing chunks computed), refusals, error propagation, S3 round trip."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from phpn_core.models.split import split_classifier
from phpn_core.data.base import normalize
from phpn_core.data.images import ImageLoadError
from phpn_core.data.synthparts import SynthParts
from phpn_core.errors import InputValueError, SchemaMismatchError, ShapeError, StoreError
from phpn_core.extract import build_schema, dataset_fingerprint, extract_features
from phpn_core.models.synthparts_cnn import SynthPartsCNN, save_model
from phpn_core.storage.feature_store import FeatureStore

THREADS = 2  # the same in the killed child process, so that its chunks are bit-identical to ours
torch.set_num_threads(THREADS)
ROOT = Path(__file__).resolve().parents[1]
DS_ARGS = dict(split="train", n_classes=4, n_per_class=6, image_size=64, seed=3)
IPC, BATCH = 2, 2  # 12 chunks of 2 images


def make_model() -> SynthPartsCNN:
    """A small untrained SynthPartsCNN with BatchNorm statistics of real images (so features are not ~0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SynthPartsCNN(4, width=16)
    ds = SynthParts(split="test", n_classes=4, n_per_class=4, image_size=64)
    x = normalize(torch.stack([ds[i]["image"] for i in range(len(ds))]), ds.mean, ds.std)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


class Counting(nn.Module):
    """Wraps a feature extractor and counts the images it sees; keeps its attributes."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.shift, self.nonnegative, self.arch = inner.shift, inner.nonnegative, inner.arch
        self.images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        return self.inner(x)


class Signed(nn.Module):
    """Features with negative values (like ConvNeXt's), declared as such."""

    nonnegative = False
    shift = 0.0
    arch = "signed"

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) - 0.5


@pytest.fixture(scope="module")
def ds() -> SynthParts:
    return SynthParts(**DS_ARGS)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "cnn.safetensors"
    save_model(make_model(), path)
    return path


@pytest.fixture(scope="module")
def features(model_file):
    from phpn_core.models.synthparts_cnn import load_model

    return split_classifier(load_model(model_file))[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, features, ds):
    """An uninterrupted extraction: the store every interrupted-and-resumed one must equal byte for byte."""
    uri = tmp_path_factory.mktemp("ref") / "fs"
    res = extract_features(features, ds, uri, checkpoint_digest="d1", images_per_chunk=IPC, batch_size=BATCH,
                           progress=False)
    return res


def raw(uri) -> dict[str, np.ndarray]:
    """The zarr arrays' raw numpy data (what is on disk), by name."""
    g = zarr.open_group(str(uri), mode="r")
    return {name: np.asarray(g[name][:]) for name in ("features", "keypoints", "labels", "dataset_index", "done")}


def assert_same_bytes(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), f"{name} differs"


def direct_forward(features, ds) -> torch.Tensor:
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    with torch.no_grad():
        return features(normalize(x, ds.mean, ds.std)).permute(0, 2, 3, 1)  # [n, h, w, D]


# -- correctness -----------------------------------------------------------------------------------------------------


def test_features_equal_a_direct_forward_pass(reference, features, ds):
    store = reference.store
    ref = direct_forward(features, ds)
    assert store.schema.feature_shape == tuple(ref.shape[1:]) == (4, 4, 16)
    assert store.schema.dtype == "float32" and store.schema.input_size == 64
    assert store.schema.dataset_fingerprint == dataset_fingerprint(ds)
    assert store.is_complete and reference.chunks_written == tuple(range(store.n_chunks))
    assert reference.images_computed == len(ds) and reference.feature_min >= 0 and reference.feature_max > 0
    labels = np.asarray(ds.labels)
    for c in range(4):
        idx = store.class_indices(c)
        assert np.array_equal(idx, np.flatnonzero(labels == c))
        torch.testing.assert_close(store.class_features(c), ref[idx], rtol=0, atol=1e-6)
        kp = torch.stack([ds[int(i)]["keypoints"] for i in idx])
        assert torch.equal(store.class_keypoints(c), kp)
        assert store.class_image_ids(c) == [ds.image_id(int(i)) for i in idx]
    assert store.schema.part_names == ds.part_names
    rec = reference.record()
    assert rec["images_computed"] == len(ds) and rec["chunks_written"] == store.n_chunks


def test_channels_last_runs_leave_the_callers_module_as_it_was(tmp_path, features, ds, reference):
    before = {n: (p, p.detach().clone(), p.stride()) for n, p in features.named_parameters()}
    plain = extract_features(features, ds, tmp_path / "plain", checkpoint_digest="d1", images_per_chunk=IPC,
                             batch_size=BATCH, channels_last=False, progress=False)
    for n, p in features.named_parameters():  # same objects, values and layout after both runs
        obj, val, stride = before[n]
        assert p is obj and torch.equal(p, val) and p.stride() == stride
        assert p.is_contiguous()  # the default channels-last run (`reference`) restored the standard layout too
    assert plain.store.fingerprint == reference.store.fingerprint  # the layout is not part of the identity
    for c in range(4):  # channels-last (the default, `reference`) equals the plain layout up to float rounding
        torch.testing.assert_close(reference.store.class_features(c), plain.store.class_features(c),
                                   rtol=1e-5, atol=1e-6)


def test_float16_store(tmp_path, features, ds, reference):
    res = extract_features(features, ds, tmp_path / "fs16", checkpoint_digest="d1", dtype="float16",
                           images_per_chunk=IPC, batch_size=BATCH, progress=False)
    assert res.store.schema.dtype == "float16" and raw(tmp_path / "fs16")["features"].dtype == np.float16
    assert res.store.fingerprint != reference.store.fingerprint  # dtype is part of the identity
    for c in range(4):
        want = reference.store.class_features(c)
        assert torch.equal(res.store.class_features(c), want.half().float())  # exactly the rounded float32 values


class InMemory(torch.utils.data.Dataset):
    """A dataset that hands out the same image tensors every time (as a cached dataset does)."""

    def __init__(self, ds) -> None:
        self.items = [ds[i] for i in range(len(ds))]
        self.classes, self.labels, self.part_names = ds.classes, ds.labels, ds.part_names
        self.mean, self.std, self.image_ids = ds.mean, ds.std, [it["image_id"] for it in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def test_dataset_images_are_not_modified_and_min_max_are_the_stored_ones(tmp_path, features, ds, reference):
    mem = InMemory(ds)
    before = [it["image"].clone() for it in mem.items]
    res = extract_features(features, mem, tmp_path / "mem", checkpoint_digest="d1", split="train", images_per_chunk=IPC,
                           batch_size=BATCH, progress=False)
    assert all(torch.equal(it["image"], b) for it, b in zip(mem.items, before))  # normalised in place: a copy
    got = torch.cat([res.store.class_features(c) for c in range(4)])
    assert torch.equal(got, torch.cat([reference.store.class_features(c) for c in range(4)]))
    assert (res.feature_min, res.feature_max) == (float(got.min()), float(got.max()))


def test_worker_processes_and_other_batch_sizes_give_the_same_store(tmp_path, features, ds, reference):
    extract_features(features, ds, tmp_path / "fs", checkpoint_digest="d1", images_per_chunk=IPC, batch_size=64,
                     num_workers=1, progress=True)
    assert_same_bytes(raw(tmp_path / "fs"), raw(reference.store.uri))


# -- resume ----------------------------------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, time, torch
    torch.set_num_threads({threads})
    from phpn_core.data.synthparts import SynthParts
    from phpn_core.extract import extract_features
    from phpn_core.models.synthparts_cnn import load_model

    # The trunk itself (what split_classifier wraps, with no shift): spares importing torchvision in the child.
    features = load_model({model!r}).features

    def on_chunk(ev):
        if ev.chunks_done == 2:
            print("READY", ev.chunk_index, flush=True)
            time.sleep(600)  # killed here

    extract_features(features, SynthParts(**{ds_args!r}), {uri!r}, model="SynthPartsCNN", checkpoint_digest="d1",
                     images_per_chunk={ipc}, batch_size={batch}, progress=False, on_chunk=on_chunk)
    print("FINISHED", flush=True)
    """
)


def resume_and_check(uri, features, ds, reference) -> None:
    """Resume an interrupted store: only its missing chunks are computed, and the result equals the reference."""
    store = FeatureStore.open(uri)
    missing = store.missing_chunks()
    assert 0 < len(missing) < store.n_chunks
    # A chunk whose write was cut short: data partly there, no done marker. It must be rewritten, not trusted.
    start, stop = store.chunk_rows(missing[-1])
    zarr.open_group(str(uri), mode="r+")["features"][start:stop] = np.full((stop - start, 4, 4, 16), 7.0, np.float32)
    counting = Counting(features)
    res = extract_features(counting, ds, uri, schema=reference.store.schema, progress=False)
    assert res.chunks_written == tuple(missing)
    assert res.chunks_skipped == store.n_chunks - len(missing)
    expected_images = sum(len(store.chunk_indices(k)) for k in missing)
    assert counting.images == res.images_computed == expected_images < len(ds)
    assert res.store.is_complete
    assert_same_bytes(raw(uri), raw(reference.store.uri))


def test_resume_after_sigkill(tmp_path, model_file, features, ds, reference):
    uri = str(tmp_path / "fs")
    code = CHILD.format(threads=THREADS, model=str(model_file), ds_args=DS_ARGS, uri=uri, ipc=IPC, batch=BATCH)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    err = tmp_path / "child.stderr"
    with open(err, "w") as err_file:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=err_file, text=True,
                                env=env, cwd=ROOT)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)  # the child has written 2 chunks, or died
        line = proc.stdout.readline() if ready else "(timeout)"
        assert line.startswith("READY"), f"child did not get to chunk 2: {line!r}\n{err.read_text()}"
        time.sleep(0.2)  # let the writer thread get into a later chunk, as a real kill would find it
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(FeatureStore.open(uri).missing_chunks()) < reference.store.n_chunks
    resume_and_check(uri, features, ds, reference)


def test_resume_after_an_exception(tmp_path, features, ds, reference):
    uri = tmp_path / "fs"

    def boom(ev):
        if ev.chunks_done == 3:
            raise KeyboardInterrupt  # what Ctrl-C does; a plain exception behaves the same

    with pytest.raises(KeyboardInterrupt):
        extract_features(features, ds, uri, checkpoint_digest="d1", images_per_chunk=IPC, batch_size=BATCH,
                         progress=False, on_chunk=boom)
    done = reference.store.n_chunks - len(FeatureStore.open(uri).missing_chunks())
    assert done >= 3
    resume_and_check(uri, features, ds, reference)
    # A finished store: nothing computed at all.
    counting = Counting(features)
    res = extract_features(counting, ds, uri, schema=reference.store.schema, progress=False)
    assert res.chunks_written == () and counting.images == 0 and res.complete


def test_writer_failure_is_raised_and_completed_chunks_stay_done(tmp_path, features, ds, monkeypatch):
    real = FeatureStore.write_chunk

    def flaky(self, k, *args, **kwargs):
        if k == 4:
            raise StoreError("Could not write chunk 4 of the store: disk full (simulated).")
        return real(self, k, *args, **kwargs)

    monkeypatch.setattr(FeatureStore, "write_chunk", flaky)
    with pytest.raises(StoreError, match="chunk 4"):
        extract_features(features, ds, tmp_path / "fs", checkpoint_digest="d1", images_per_chunk=IPC,
                         batch_size=BATCH, progress=False)
    missing = FeatureStore.open(tmp_path / "fs").missing_chunks()
    assert 4 in missing and all(k not in missing for k in range(4))


def test_subset_of_chunks(tmp_path, features, ds, reference):
    res = extract_features(features, ds, tmp_path / "fs", checkpoint_digest="d1", images_per_chunk=IPC,
                           batch_size=BATCH, progress=False, chunks=[1, 5, 6])
    assert res.chunks_written == (1, 5, 6) and not res.complete
    assert res.store.missing_chunks() == [k for k in range(res.store.n_chunks) if k not in (1, 5, 6)]


# -- refusals and errors ---------------------------------------------------------------------------------------------


def test_store_of_another_model_is_refused_with_both_fingerprints(tmp_path, features, ds, reference):
    uri = tmp_path / "fs"
    extract_features(features, ds, uri, checkpoint_digest="d1", images_per_chunk=IPC, progress=False)
    other = build_schema(features, ds, checkpoint_digest="other-weights")
    with pytest.raises(SchemaMismatchError) as e:
        extract_features(features, ds, uri, checkpoint_digest="other-weights", progress=False)
    msg = str(e.value)
    assert reference.store.fingerprint in msg and other.fingerprint() in msg and "checkpoint_digest" in msg
    assert "overwrite=True" in msg
    res = extract_features(features, ds, uri, checkpoint_digest="other-weights", overwrite=True, progress=False)
    assert res.store.fingerprint == other.fingerprint() and res.complete


def test_negative_features_are_recorded_not_clamped(tmp_path, features, ds):
    res = extract_features(Signed(features), ds, tmp_path / "fs", checkpoint_digest="d1", progress=False)
    assert res.nonnegative is False and res.feature_min < 0 and res.feature_min == pytest.approx(-0.5)
    assert float(min(res.store.class_features(c).min() for c in range(4))) == pytest.approx(res.feature_min)


class Corrupt(SynthParts):
    """Image 5 cannot be decoded, as a truncated file would."""

    def __getitem__(self, index):
        if index == 5:
            raise ImageLoadError("cannot decode 'images/005.jpg': truncated file. Fix: restore it or on_error='skip'.",
                                 path="images/005.jpg")
        return super().__getitem__(index)


def test_corrupt_image_error_propagates_with_its_file_name(tmp_path, features):
    with pytest.raises(ImageLoadError, match="005.jpg"):
        extract_features(features, Corrupt(**DS_ARGS), tmp_path / "fs", checkpoint_digest="d1", images_per_chunk=IPC,
                         progress=False)


def test_bad_inputs_are_refused(tmp_path, ds, features):
    train_mode = SynthPartsCNN(4, width=8)  # freshly built: training mode
    with pytest.raises(InputValueError, match="eval"):
        extract_features(split_classifier(train_mode)[0], ds, tmp_path / "a", checkpoint_digest="d1")
    with pytest.raises(InputValueError, match="checkpoint_digest"):
        extract_features(features, ds, tmp_path / "b")
    with pytest.raises(InputValueError, match="one or the other"):
        extract_features(features, ds, tmp_path / "c", schema=build_schema(features, ds, checkpoint_digest="x"),
                         checkpoint_digest="x")
    with pytest.raises(InputValueError, match="dtype"):
        extract_features(features, ds, tmp_path / "d", checkpoint_digest="x", dtype="bfloat16")
    with pytest.raises(ShapeError, match="input_size"):
        extract_features(features, ds, tmp_path / "e", checkpoint_digest="x", input_size=224)


def test_dataset_fingerprint_is_cheap_and_tracks_the_content(ds, monkeypatch):
    fp = dataset_fingerprint(ds)
    assert fp == dataset_fingerprint(SynthParts(**DS_ARGS)) and len(fp) == 16
    assert fp != dataset_fingerprint(SynthParts(**{**DS_ARGS, "seed": 4}))
    assert fp != dataset_fingerprint(SynthParts(**{**DS_ARGS, "omit_prob": 0.2}))  # same ids, other pixels
    assert fp != dataset_fingerprint(SynthParts(**{**DS_ARGS, "image_size": 80}))

    def no_decoding(self, index):
        raise AssertionError("dataset_fingerprint decoded an image")

    monkeypatch.setattr(SynthParts, "__getitem__", no_decoding)
    assert dataset_fingerprint(ds) == fp


# -- S3 ----------------------------------------------------------------------------------------------------------------


def test_s3_round_trip(s3_server, s3_bucket, features, ds, reference):
    uri = f"{s3_bucket}/runs/r1/features"
    opts = s3_server.storage_options
    res = extract_features(features, ds, uri, checkpoint_digest="d1", images_per_chunk=6, batch_size=BATCH,
                           storage_options=opts, progress=False)  # one chunk per class: fewer requests
    assert res.store.uri == uri and res.complete and res.store.n_chunks == 4
    reader = FeatureStore.open(uri, storage_options=opts, expected_fingerprint=reference.store.fingerprint)
    for c in range(4):
        assert torch.equal(reader.class_features(c), reference.store.class_features(c))
        assert torch.equal(reader.class_keypoints(c), reference.store.class_keypoints(c))
    again = extract_features(features, ds, uri, checkpoint_digest="d1", storage_options=opts, progress=False)
    assert again.chunks_written == () and again.images_computed == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_extraction_matches_cpu(tmp_path, model_file, ds, reference):
    from phpn_core.models.synthparts_cnn import load_model

    gpu_features = split_classifier(load_model(model_file))[0]  # its own copy: extraction moves it to the GPU
    for dtype in ("float32", "float16"):
        res = extract_features(gpu_features, ds, tmp_path / dtype, checkpoint_digest="d1", dtype=dtype,
                               images_per_chunk=IPC, batch_size=BATCH, device="cuda", progress=False)
        assert res.complete and res.store.schema.dtype == dtype
        for c in range(4):
            want = reference.store.class_features(c)
            torch.testing.assert_close(res.store.class_features(c), want, rtol=1e-2 if dtype == "float16" else 1e-4,
                                       atol=1e-3 if dtype == "float16" else 1e-5)
            assert torch.equal(res.store.class_keypoints(c), reference.store.class_keypoints(c))
