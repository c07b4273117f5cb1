"""PrototypeRegistry: stage + publish + load round trips (local and S3 on moto), resume, atomic visibility under
concurrent publishers and readers, integrity checks, refusals (ids, pickles, metadata), bounded failures."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phpn_core.method.decompose import HeadDecomposition
from phpn_core.errors import InputValueError, ShapeError, StoreError
from phpn_core.method.head import PartPrototypeHead
from phpn_core.storage.registry import (
    ARRAY_NAMES,
    EntryInfo,
    PrototypeRegistry,
    RegistryError,
    decomposition_tensors,
)
from phpn_core.storage.uri import safe_join

SECRET = "phpn-test-secret-Zq9x7Lw2"  # distinctive, so that a leak anywhere is found by a plain substring search
KEY_ID = "AKIAPHPNTESTKEY00001"
DIGEST = "sha256:" + hashlib.sha256(b"config").hexdigest()


def make_results(C: int, k: int, D: int, *, seed: int = 0, diagnostics: bool = True):
    """Per-class tensors for C classes (as the decomposition produces them) and a bias [C]."""
    g = torch.Generator().manual_seed(seed)
    T = {
        "prototypes": torch.randn(C, k, D, generator=g),
        "initial": torch.rand(C, k, D, generator=g),
        "alpha": torch.randn(C, k, generator=g),
        "residual": torch.randn(C, k, D, generator=g),
        "rel_error": torch.rand(C, generator=g),
        "head_error": torch.rand(C, generator=g) * 1e-6,
    }
    if diagnostics:
        T["n_iter"] = torch.randint(1, 100, (C,), generator=g)
        T["converged"] = torch.rand(C, generator=g) > 0.5
    return T, torch.randn(C, generator=g)


def rows(T: dict, classes: list[int]) -> dict:
    return {n: t[classes] for n, t in T.items()}


def stage(reg: PrototypeRegistry, eid: str, T: dict, classes: list[int]) -> None:
    reg.write_classes(eid, classes, rows(T, classes))


def stage_all(reg: PrototypeRegistry, eid: str, T: dict, *, shard: int = 3) -> None:
    C = T["prototypes"].shape[0]
    order = list(range(C))[::-1]  # shards arrive in any order
    for i in range(0, C, shard):
        stage(reg, eid, T, order[i : i + shard])


def eid_for(k: int, model: str = "resnet34", dataset: str = "cub200", digest: str = DIGEST) -> str:
    return PrototypeRegistry.entry_id(model, dataset, k, digest)


def publish(reg, eid, C, bias, metadata=None, **kw):
    return reg.publish(eid, n_classes=C, bias=bias, metadata=metadata or {"config": {"k": 1}}, **kw)


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """(registry URI, storage_options) on local disk or on the moto S3 server."""
    if request.param == "local":
        return str(tmp_path / "registry"), None
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/runs/r1/registry", {**server.storage_options, "key": KEY_ID, "secret": SECRET}


@pytest.fixture
def reg(where) -> PrototypeRegistry:
    uri, opts = where
    return PrototypeRegistry(uri, storage_options=opts)


def stored_bytes(reg: PrototypeRegistry) -> dict[str, bytes]:
    """Every object under the registry root (through the registry's own filesystem)."""
    fs = reg._fs
    root = reg._loc.url
    return {p: fs.cat_file(p) for p in fs.find(root)}


def object_path(reg: PrototypeRegistry, info: EntryInfo, name: str) -> str:
    return safe_join(reg._loc.url, f"objects/{info.entry_id}/{info.version}/{name}")


def overwrite(reg: PrototypeRegistry, path: str, data: bytes) -> None:
    if reg._loc.is_remote:
        reg._fs.pipe_file(path, data)
    else:
        with open(path, "wb") as f:
            f.write(data)


# -- round trips ---------------------------------------------------------------------------------------------------


def test_round_trip(reg, where):
    C, k, D = 7, 3, 5
    T, bias = make_results(C, k, D)
    eid = eid_for(k)
    assert eid == f"resnet34--cub200--k{k}--{DIGEST[7:19]}"
    assert reg.entries() == [] and not reg.exists(eid)
    stage_all(reg, eid, T)
    assert reg.staged_classes(eid) == set(range(C))
    meta = {"config": {"k": k, "seed": 0}, "provenance": {"feature_store": "s3://feats/run1", "fingerprint": "ab12"}}
    info = publish(reg, eid, C, bias, meta, model="resnet34", dataset="cub200", config_digest=DIGEST)

    assert (info.entry_id, info.n_classes, info.k, info.D, info.dtype) == (eid, C, k, D, "float32")
    assert (info.model, info.dataset, info.config_digest) == ("resnet34", "cub200", DIGEST)
    assert info.metadata == meta and info.diagnostics == ["converged", "n_iter"]
    assert info.max_head_error == pytest.approx(float(T["head_error"].max()))
    assert reg.exists(eid) and reg.info(eid) == info and reg.entries() == [info]

    head, got = reg.load(eid)
    assert got == info and isinstance(head, PartPrototypeHead)
    assert torch.equal(head.prototypes, T["prototypes"]) and torch.equal(head.bias, bias)
    assert torch.equal(head.signs, torch.where(T["alpha"] < 0, -1.0, 1.0))
    fmap = torch.rand(4, D, 3, 2)
    original = PartPrototypeHead(T["prototypes"], bias)
    assert torch.equal(head(fmap), original(fmap))
    # (torch.allclose, not torch.testing.assert_close: that imports torch.distributed, ~5 s)
    assert torch.allclose(head(fmap), fmap.mean((2, 3)) @ T["prototypes"].sum(1).T + bias, atol=1e-5)

    arrays = reg.load_arrays(eid)
    assert set(arrays) == {*ARRAY_NAMES, "n_iter", "converged"}
    for n, t in arrays.items():
        assert torch.equal(t, T[n]), n
    assert reg.read_staged(eid, [3, 0])["alpha"].equal(T["alpha"][[3, 0]])  # staged data kept, in the given order

    # A fresh registry object (another process) sees the same entry; credentials never reach storage.
    uri, opts = where
    other = PrototypeRegistry(uri, storage_options=opts)
    assert other.entries() == [info] and torch.equal(other.load(eid)[0].prototypes, T["prototypes"])
    shipped = pickle.loads(pickle.dumps(reg))  # what a Ray task would receive
    assert shipped.info(eid) == info and shipped.uri == reg.uri
    blobs = stored_bytes(reg)
    assert any(p.endswith(f"entries/{eid}.json") for p in blobs)
    assert len([p for p in blobs if "/staging/" in p]) == C
    for p, b in blobs.items():
        assert SECRET.encode() not in b and KEY_ID.encode() not in b and b"127.0.0.1" not in b, p
    assert SECRET not in repr(reg) and reg.uri == uri
    # Layout: the pointer names the version folder holding both objects.
    assert reg.versions(eid) == [info.version]
    assert set(info.objects) == {"head.safetensors", "arrays.safetensors"}

    assert reg.clear_staged(eid) == C and reg.staged_classes(eid) == set()
    assert torch.equal(reg.load(eid)[0].prototypes, T["prototypes"])  # the entry does not depend on staging


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(C=st.integers(1, 5), k=st.integers(1, 4), D=st.integers(1, 6), shard=st.integers(1, 3),
       diagnostics=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 99))
def test_round_trip_random_shapes(C, k, D, shard, diagnostics, dtype, seed):
    T, bias = make_results(C, k, D, seed=seed, diagnostics=diagnostics)
    T = {n: t.to(dtype) if t.is_floating_point() else t for n, t in T.items()}
    with tempfile.TemporaryDirectory() as d:
        reg = PrototypeRegistry(d)
        eid = eid_for(k, model=f"m{seed}")
        stage_all(reg, eid, T, shard=shard)
        info = publish(reg, eid, C, bias)  # identity read back from the id; bias cast to the prototypes' dtype
        assert (info.model, info.dataset, info.config_digest) == (f"m{seed}", "cub200", DIGEST[7:19])
        head, _ = reg.load(eid)
        assert torch.equal(head.prototypes, T["prototypes"]) and torch.equal(head.bias, bias.to(dtype))
        fmap = torch.rand(2, D, 2, 3, dtype=dtype)
        assert torch.equal(head(fmap), PartPrototypeHead(T["prototypes"], bias.to(dtype))(fmap))
        arrays = reg.load_arrays(eid)
        assert all(torch.equal(arrays[n], T[n]) for n in arrays) and len(arrays) == len(T) - 1


def test_decomposition_tensors_stage_a_head_decomposition(tmp_path):
    T, bias = make_results(4, 2, 3)
    hd = HeadDecomposition(classes=[2, 3], diagnostics={"n_iter": T["n_iter"][2:]},
                           **{n: T[n][2:] for n in ("prototypes", "initial", "alpha", "residual", "rel_error",
                                                    "head_error")})
    reg = PrototypeRegistry(tmp_path)
    eid = eid_for(2)
    reg.write_classes(eid, hd.classes, decomposition_tensors(hd))
    stage(reg, eid, {n: t for n, t in T.items() if n != "converged"}, [0, 1])
    publish(reg, eid, 4, bias)
    assert torch.equal(reg.load(eid)[0].prototypes, T["prototypes"])


# -- staging and resume -----------------------------------------------------------------------------------------------


def test_staged_classes_resume_and_missing_classes(reg, monkeypatch):
    C, k, D = 6, 2, 3
    T, bias = make_results(C, k, D)
    eid = eid_for(k)
    assert reg.staged_classes(eid) == set()
    stage(reg, eid, T, [0, 1])
    stage(reg, eid, T, [3])

    # A task interrupted mid-shard: class 2 is written whole, class 4 not at all.
    real_put = reg._put

    def crashing_put(path, data, action):
        if path.endswith("class-00004.safetensors"):
            raise KeyboardInterrupt("worker killed")
        real_put(path, data, action)

    monkeypatch.setattr(reg, "_put", crashing_put)
    with pytest.raises(KeyboardInterrupt):
        stage(reg, eid, T, [2, 4, 5])
    monkeypatch.undo()
    staged = reg.staged_classes(eid)  # on S3 the shard's classes are written concurrently: 5 may be there too
    assert {0, 1, 2, 3} <= staged and 4 not in staged

    with pytest.raises(RegistryError, match=r"missing: 4(-5)?\b.*write_classes") as err:
        publish(reg, eid, C, bias)
    assert "0..5" in str(err.value)
    with pytest.raises(RegistryError, match=r"lacks staged classes.*1 missing: 4"):
        reg.read_staged(eid, [0, 4])
    assert not reg.exists(eid) and reg.versions(eid) == []  # nothing was written

    # Resume: recompute exactly the missing classes.
    missing = sorted(set(range(C)) - reg.staged_classes(eid))
    assert missing in ([4], [4, 5])
    stage(reg, eid, T, missing)
    # Recompute one class (e.g. a bad result): drop it, stage it again.
    assert reg.drop_staged(eid, 1) is True and reg.drop_staged(eid, 1) is False
    assert 1 not in reg.staged_classes(eid)
    stage(reg, eid, T, [1])
    got = reg.read_staged(eid, [5, 1, 0])
    assert all(torch.equal(got[n], T[n][[5, 1, 0]]) for n in T)

    # A stray class beyond n_classes (a run with another C) is refused, not silently dropped.
    stage(reg, eid, make_results(9, k, D)[0], [8])
    with pytest.raises(RegistryError, match=r"beyond that: 8.*n_classes"):
        publish(reg, eid, C, bias)
    reg.drop_staged(eid, 8)
    info = publish(reg, eid, C, bias)
    assert torch.equal(reg.load(eid)[0].prototypes, T["prototypes"]) and info.n_classes == C


def test_interrupted_local_write_leaves_nothing_visible(tmp_path, monkeypatch):
    reg = PrototypeRegistry(tmp_path / "reg")
    T, _ = make_results(3, 2, 4)
    eid = eid_for(2)
    stage(reg, eid, T, [0])

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(StoreError, match=r"stage class 1 .*No space left.*writable"):
        stage(reg, eid, T, [1])
    monkeypatch.undo()
    folder = tmp_path / "reg" / "staging" / eid
    assert sorted(os.listdir(folder)) == ["class-00000.safetensors"]  # the temp file was cleaned up

    # A writer killed outright leaves its hidden temp file: it is never taken for a staged class.
    (folder / ".class-00002.safetensors.x1y2.tmp").write_bytes(b"partial")
    assert reg.staged_classes(eid) == {0}


def test_staged_classes_from_different_runs_are_refused(tmp_path):
    reg = PrototypeRegistry(tmp_path)
    eid = eid_for(2)
    stage(reg, eid, make_results(3, 2, 4)[0], [0, 1])
    stage(reg, eid, make_results(3, 2, 5)[0], [2])  # D = 5: another configuration
    with pytest.raises(RegistryError, match=r"disagree.*classes 2 different.*prototypes \[2, 5\]"):
        reg.publish(eid, n_classes=3, bias=torch.zeros(3))
    # A class object planted under another class's name is refused too.
    src = tmp_path / "staging" / eid / "class-00000.safetensors"
    (tmp_path / "staging" / eid / "class-00002.safetensors").write_bytes(src.read_bytes())
    with pytest.raises(RegistryError, match=r"expected class 2 of entry .*got class '0'.*drop_staged"):
        reg.read_staged(eid, [2])


# -- atomic visibility, concurrency --------------------------------------------------------------------------------


def test_reader_during_slow_publish_sees_nothing_or_everything(reg, where):
    C, k, D = 4, 2, 3
    T, bias1 = make_results(C, k, D)
    bias2 = bias1 + 100.0
    eid = eid_for(k)
    stage_all(reg, eid, T)

    data_written, release = threading.Event(), threading.Event()
    real_put = reg._put

    def slow_put(path, data, action):
        if path.endswith(".json"):  # the pointer: every data object is already written
            data_written.set()
            assert release.wait(30)
        real_put(path, data, action)

    reg._put = slow_put
    uri, opts = where
    reader = PrototypeRegistry(uri, storage_options=opts)

    def run(bias):
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(publish, reg, eid, C, bias)
            assert data_written.wait(30)
            yield
            release.set()
            return_value = fut.result(30)
        data_written.clear(), release.clear()
        yield return_value

    # First publish: before the pointer, the entry does not exist for any reader, though its objects do.
    steps = run(bias1)
    next(steps)
    assert not reader.exists(eid) and reader.entries() == []
    with pytest.raises(RegistryError, match="Unknown entry"):
        reader.load(eid)
    (version,) = reader.versions(eid)
    assert {p.rsplit("/", 1)[-1] for p in reader._fs.ls(reader._version_dir(eid, version), detail=False)} == {
        "head.safetensors", "arrays.safetensors"}
    info1 = next(steps)
    assert reader.info(eid) == info1 and torch.equal(reader.load(eid)[0].bias, bias1)

    # Second publish of the same entry: until its pointer lands, readers get the first version, whole.
    steps = run(bias2)
    next(steps)
    assert len(reader.versions(eid)) == 2
    head, info = reader.load(eid)
    assert info == info1 and torch.equal(head.bias, bias1)
    info2 = next(steps)
    head, info = reader.load(eid)
    assert info == info2 != info1 and torch.equal(head.bias, bias2) and reader.entries() == [info2]


def test_concurrent_publishers_of_different_entries(reg):
    C, D = 6, 4
    jobs = {eid_for(k, dataset=f"ds{k}"): make_results(C, k, D, seed=k) for k in (2, 3)}

    def stage_shard(eid, classes):
        stage(reg, eid, jobs[eid][0], classes)

    with ThreadPoolExecutor(4) as pool:  # many tasks staging both entries at once
        list(pool.map(lambda a: stage_shard(*a), [(e, [c, c + 1]) for e in jobs for c in range(0, C, 2)]))
    with ThreadPoolExecutor(2) as pool:
        infos = dict(zip(jobs, pool.map(lambda e: publish(reg, e, C, jobs[e][1]), jobs)))
    assert reg.entries() == sorted(infos.values(), key=lambda i: i.entry_id)
    for eid, (T, bias) in jobs.items():
        head, info = reg.load(eid)
        assert info == infos[eid] and torch.equal(head.prototypes, T["prototypes"]) and torch.equal(head.bias, bias)
        assert torch.equal(reg.load_arrays(eid)["residual"], T["residual"])


def test_same_entry_published_twice_concurrently(reg):
    C, k, D = 5, 2, 3
    T, bias = make_results(C, k, D)
    eid = eid_for(k)
    stage_all(reg, eid, T)
    biases = [bias, bias - 7.0]
    barrier = threading.Barrier(2)
    real_put = reg._put

    def interleaved_put(path, data, action):
        if path.endswith("head.safetensors"):
            barrier.wait(30)  # both publishers are mid-flight together
        real_put(path, data, action)

    reg._put = interleaved_put
    with ThreadPoolExecutor(2) as pool:
        infos = list(pool.map(lambda b: publish(reg, eid, C, b), biases))
    assert infos[0].version != infos[1].version
    head, current = reg.load(eid)
    winner = [i.version for i in infos].index(current.version)  # the last pointer names one version, whole
    assert current == infos[winner] and torch.equal(head.bias, biases[winner])
    assert reg.entries() == [current]
    # Both versions are complete: each object matches what its publisher recorded.
    assert reg.versions(eid) == sorted(i.version for i in infos)
    for info in infos:
        for name, ref in info.objects.items():
            data = reg._fs.cat_file(object_path(reg, info, name))
            assert hashlib.sha256(data).hexdigest() == ref.sha256 and len(data) == ref.size
    # Superseded versions are pruned on request (young ones are kept: a publish may be in flight).
    assert reg.prune(eid) == []
    assert reg.prune(eid, min_age_s=0) == [infos[1 - winner].version]
    assert reg.versions(eid) == [current.version] and torch.equal(reg.load(eid)[0].bias, biases[winner])


# -- integrity and security ----------------------------------------------------------------------------------------


def test_corrupt_data_object_is_refused(reg):
    T, bias = make_results(3, 2, 4)
    eid = eid_for(2)
    stage_all(reg, eid, T)
    info = publish(reg, eid, 3, bias)
    for name, loader in (("head.safetensors", reg.load), ("arrays.safetensors", reg.load_arrays)):
        path = object_path(reg, info, name)
        good = reg._fs.cat_file(path)
        flipped = bytearray(good)
        flipped[-3] ^= 0x01  # one bit in the tensor data: still parses, wrong numbers
        for bad in (bytes(flipped), good[:-4]):
            overwrite(reg, path, bad)
            with pytest.raises(RegistryError, match=rf"Corrupt object {name} .*sha256 is [0-9a-f]{{64}}.*recorded"):
                loader(eid)
        overwrite(reg, path, good)
    assert torch.equal(reg.load(eid)[0].prototypes, T["prototypes"])


def test_metrics_recorded_beside_a_version_travel_with_it(reg, where):
    """record_metrics stores the run's evaluation beside the version (locally and on S3); NaN becomes None,
    secrets are redacted, a re-publish starts a version without metrics, and the pointer is never rewritten."""
    T, bias = make_results(3, 2, 4)
    eid = eid_for(2)
    stage_all(reg, eid, T)
    info = publish(reg, eid, 3, bias)
    assert reg.read_metrics(eid) is None
    pointer = reg._fs.cat_file(reg._pointer(eid))
    metrics = {"entry_id": eid, "consistency": 66.5, "stability": float("nan"), "per_class": [1.0, float("inf")],
               "registry": "s3://bucket/reg?secret=" + SECRET}
    uri = reg.record_metrics(eid, metrics, version=info.version)
    assert uri.endswith(f"{info.version}/metrics.json")
    got = reg.read_metrics(eid)
    assert got["consistency"] == 66.5 and got["stability"] is None and got["per_class"] == [1.0, None]
    assert SECRET not in json.dumps(got)
    assert metrics["stability"] != metrics["stability"], "the caller's dict is not modified"
    assert reg._fs.cat_file(reg._pointer(eid)) == pointer
    assert torch.equal(reg.load(eid)[0].prototypes, T["prototypes"])
    again = publish(reg, eid, 3, bias)
    assert reg.read_metrics(eid) is None and reg.read_metrics(eid, version=info.version)["consistency"] == 66.5
    with pytest.raises(RegistryError, match="version .* does not exist"):
        reg.record_metrics(eid, metrics, version="0" * 32)
    with pytest.raises(InputValueError, match="not JSON-serialisable"):
        reg.record_metrics(eid, {"x": object()}, version=again.version)
    overwrite(reg, object_path(reg, info, "metrics.json"), b"[1, 2]")
    with pytest.raises(RegistryError, match="expected an object"):
        reg.read_metrics(eid, version=info.version)


class _Evil:
    """Unpickling this creates a marker file: a loader that unpickles would be caught red-handed."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_planted_pickle_is_never_unpickled(reg, tmp_path):
    marker = str(tmp_path / "pwned")
    payload = pickle.dumps(_Evil(marker))
    buf_path = tmp_path / "evil.pt"
    torch.save({"prototypes": _Evil(marker)}, buf_path)  # torch's zip format carries a pickle too
    T, bias = make_results(3, 2, 4)
    eid = eid_for(2)
    stage_all(reg, eid, T)
    info = publish(reg, eid, 3, bias)
    head_path = object_path(reg, info, "head.safetensors")
    pointer = safe_join(reg._loc.url, f"entries/{eid}.json")
    for evil in (payload, buf_path.read_bytes()):
        overwrite(reg, head_path, evil)
        with pytest.raises(RegistryError, match="sha256"):  # the checksum catches the swap first
            reg.load(eid)
        # An attacker who can also rewrite the pointer: the object is still parsed as safetensors only.
        doc = json.loads(reg._fs.cat_file(pointer))
        doc["objects"]["head.safetensors"] = {"sha256": hashlib.sha256(evil).hexdigest(), "size": len(evil)}
        overwrite(reg, pointer, json.dumps(doc).encode())
        with pytest.raises(RegistryError, match=r"not a phpn head in safetensors format"):
            reg.load(eid)
    # A pickle planted as a staged class is refused the same way.
    overwrite(reg, safe_join(reg._loc.url, f"staging/{eid}/class-00001.safetensors"), payload)
    with pytest.raises(RegistryError, match=r"Staged class 1 .*expected a safetensors file.*drop_staged"):
        reg.read_staged(eid, [0, 1])
    assert not os.path.exists(marker)
    pickle.loads(payload)  # the payload does work: the test would have seen an unpickling loader
    assert os.path.exists(marker)


BAD_IDS = ["../evil", "..", ".", "a/b", "/etc/passwd", "", "~root", "s3://bucket/x", "a\\b", ".hidden", "x\x00y",
           "a/../b", "evil/", 42, None]


def test_bad_entry_ids_are_refused_before_any_io(monkeypatch):
    def no_io(self):
        raise AssertionError("I/O attempted")

    monkeypatch.setattr(PrototypeRegistry, "_fs", property(no_io))
    reg = PrototypeRegistry("s3://some-bucket/registry", storage_options={"endpoint_url": "http://127.0.0.1:9"})
    T, bias = make_results(2, 1, 2)
    calls = {
        "write_classes": lambda e: reg.write_classes(e, [0, 1], T),
        "staged_classes": reg.staged_classes,
        "read_staged": lambda e: reg.read_staged(e, [0]),
        "drop_staged": lambda e: reg.drop_staged(e, 0),
        "clear_staged": reg.clear_staged,
        "publish": lambda e: reg.publish(e, n_classes=2, bias=bias),
        "info": reg.info, "exists": reg.exists, "load": reg.load, "load_arrays": reg.load_arrays,
        "delete": reg.delete, "versions": reg.versions, "prune": reg.prune,
    }
    for bad in BAD_IDS:
        for name, call in calls.items():
            with pytest.raises(InputValueError, match=r"(Unsafe name|Entry id|not a plain name)") as err:
                call(bad)
            assert "Fix:" in str(err.value), (name, bad)


@settings(max_examples=40, deadline=None)
@given(model=st.text(max_size=60), dataset=st.text(max_size=60), k=st.integers(1, 500))
def test_entry_id_is_always_one_safe_name(model, dataset, k):
    try:
        eid = PrototypeRegistry.entry_id(model, dataset, k, DIGEST)
    except InputValueError as e:  # a name without letters or digits
        assert "Fix:" in str(e)
        return
    assert "/" not in eid and ".." not in eid.split("--") and len(eid) <= 200
    assert safe_join("/registry", eid) == f"/registry/{eid}"
    assert eid.endswith(f"--k{k}--{DIGEST[7:19]}")


def test_entry_id_refuses_bad_identity():
    for args in (("", "cub", 10, DIGEST), ("m", "---", 10, DIGEST), ("m", "d", 0, DIGEST), ("m", "d", True, DIGEST),
                 ("m", "d", 10, "abc"), ("m", "d", 10, "../../etc/passwd0000"), ("m", "d", 10, None)):
        with pytest.raises(InputValueError, match="Fix:"):
            PrototypeRegistry.entry_id(*args)
    assert PrototypeRegistry.entry_id("ResNet-34 (ImageNet)", "CUB_200/2011", 10, DIGEST.upper()[7:]) == (
        f"resnet-34-imagenet--cub_200-2011--k10--{DIGEST[7:19]}")


def test_publish_checks_identity_against_the_id(tmp_path):
    reg = PrototypeRegistry(tmp_path)
    T, bias = make_results(2, 3, 4)
    eid = eid_for(3)
    stage_all(reg, eid, T)
    with pytest.raises(InputValueError, match=r"give 'vgg16--cub200--k3--.*got entry id"):
        publish(reg, eid, 2, bias, model="vgg16", dataset="cub200", config_digest=DIGEST)
    with pytest.raises(InputValueError, match="go together"):
        publish(reg, eid, 2, bias, model="resnet34")
    other = eid_for(2)  # the id says k=2, the staged classes have k=3
    stage_all(reg, other, T)
    with pytest.raises(RegistryError, match=r"says k=2.*k=3"):
        publish(reg, other, 2, bias)
    assert reg.entries() == []


def test_metadata_is_redacted_and_must_be_json(reg, where):
    T, bias = make_results(2, 1, 3)
    eid = eid_for(1)
    stage_all(reg, eid, T)
    meta = {
        "config": {"k": 1, "normalization": "l2", "layers": ("layer4",)},
        "provenance": {"feature_store": f"s3://{KEY_ID}:{SECRET}@feats/run1", "fingerprint": "ab12cd34"},
        "storage_options": {"endpoint_url": "http://x:1", "key": KEY_ID, "secret": SECRET},
        "note": f"ran with aws_secret_access_key={SECRET}",
    }
    if where[1] is not None:
        meta["echo"] = f"the registry's own secret {SECRET} must not be stored"
    for bad, why in (({"x": object()}, "not JSON-serialisable"), ({"x": float("nan")}, "NaN"),
                     ({"x": {1: "a"}}, "str keys"), ({"t": torch.zeros(2)}, "tensor.tolist"), ([1, 2], "dict")):
        with pytest.raises(InputValueError, match=why):
            publish(reg, eid, 2, bias, bad)
    assert not reg.exists(eid) and reg.versions(eid) == []  # refused before anything was written

    info = publish(reg, eid, 2, bias, meta)
    assert info.metadata["config"] == {"k": 1, "normalization": "l2", "layers": ["layer4"]}
    assert info.metadata["storage_options"]["secret"] == "***" and info.metadata["storage_options"]["key"] == "***"
    assert info.metadata["provenance"] == {"feature_store": "s3://***@feats/run1", "fingerprint": "ab12cd34"}
    assert reg.info(eid) == info
    for p, b in stored_bytes(reg).items():
        assert SECRET.encode() not in b and KEY_ID.encode() not in b, p
    assert meta["storage_options"]["secret"] == SECRET  # the caller's dict is untouched


def test_unknown_entry_and_delete(reg):
    with pytest.raises(RegistryError, match=r"Unknown entry 'nope'.*Known entries: none"):
        reg.info("nope")
    ids = []
    for k in (1, 2):
        T, bias = make_results(2, k, 3, seed=k)
        ids.append(eid_for(k))
        stage_all(reg, ids[-1], T)
        publish(reg, ids[-1], 2, bias)
    with pytest.raises(RegistryError, match=rf"Unknown entry 'nope'.*Known entries: '{ids[0]}', '{ids[1]}'"):
        reg.load("nope")
    assert reg.delete(ids[0]) is True
    assert not reg.exists(ids[0]) and reg.versions(ids[0]) == [] and [i.entry_id for i in reg.entries()] == [ids[1]]
    with pytest.raises(RegistryError, match="Unknown entry"):
        reg.delete(ids[0])
    assert reg.delete(ids[0], missing_ok=True) is False
    assert reg.staged_classes(ids[0]) == {0, 1}  # staging is separate: publish again without recomputing
    publish(reg, ids[0], 2, make_results(2, 1, 3, seed=1)[1])
    assert reg.exists(ids[0])


def test_write_classes_refuses_bad_input_and_never_mutates(tmp_path):
    reg = PrototypeRegistry(tmp_path)
    eid = eid_for(2)
    T, _ = make_results(3, 2, 4)
    before = {n: t.clone() for n, t in T.items()}
    cases = [
        ([0, 1], T, ShapeError, r"expected \[n, k, D\] with n = len\(classes\) = 2, got \[3, 2, 4\]"),
        ([0, 1, 1], T, InputValueError, "distinct"),
        ([0, -1, 2], T, InputValueError, "ints >= 0"),
        ([], T, InputValueError, "empty"),
        ([0, 1, 2], {n: t for n, t in T.items() if n != "alpha"}, InputValueError, r"lack \['alpha'\]"),
        ([0, 1, 2], {**T, "alpha": T["alpha"][:, :1]}, ShapeError, r"alpha.*expected \[3, 2\]"),
        ([0, 1, 2], {**T, "rel_error": T["rel_error"].clone().fill_(float("nan"))}, InputValueError, "NaN"),
        ([0, 1, 2], {**T, "n_iter": T["n_iter"][:2]}, ShapeError, r"diagnostic.*\[3\]"),
        ([0, 1, 2], {**T, "../x": T["n_iter"]}, InputValueError, "tensor name"),
        ([0, 1, 2], {**T, "prototypes": T["prototypes"].int()}, InputValueError, "float"),
    ]
    for classes, tensors, exc, match in cases:
        with pytest.raises(exc, match=match):
            reg.write_classes(eid, classes, tensors)
    assert reg.staged_classes(eid) == set()
    reg.write_classes(eid, [0, 1, 2], T)
    assert all(torch.equal(T[n], before[n]) for n in T)
    with pytest.raises(ShapeError, match=r"bias .*expected \[C\] = \[3\]"):
        reg.publish(eid, n_classes=3, bias=torch.zeros(4))
    with pytest.raises(InputValueError, match="n_classes"):
        reg.publish(eid, n_classes=0, bias=None)


def test_unreachable_endpoint_fails_fast_without_secrets():
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": KEY_ID, "secret": SECRET,
            "client_kwargs": {"region_name": "us-east-1"}}
    reg = PrototypeRegistry("s3://some-bucket/registry", storage_options=opts)  # no I/O yet
    for call in (reg.entries,):  # one call: each try at a dead endpoint costs seconds
        t0 = time.monotonic()
        with pytest.raises(RegistryError) as err:
            call()
        elapsed = time.monotonic() - t0
        msg = str(err.value)
        assert isinstance(err.value, StoreError) and elapsed < 20, f"took {elapsed:.1f} s"
        assert f"127.0.0.1:{port}" in msg and "s3://some-bucket/registry" in msg and "Fix:" in msg
        assert SECRET not in msg and KEY_ID not in msg and err.value.__cause__ is None
    assert opts["secret"] == SECRET and "config_kwargs" not in opts  # the caller's options are not mutated
