"""FeatureStore: round trips (local and S3 on moto), layout, chunk-local reads, resume, refusals, bounded failures."""

from __future__ import annotations

import socket
import tempfile
import time

import boto3
import numpy as np
import pytest
import s3fs
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phpn_core.errors import InputValueError, SchemaMismatchError, ShapeError, StoreError
from phpn_core.storage.feature_store import FeatureSchema, FeatureStore, default_images_per_chunk

SECRET = "phpn-test-secret-Zq9x7Lw2"  # distinctive, so that a leak anywhere is found by a plain substring search
KEY_ID = "AKIAPHPNTESTKEY00001"


def make_schema(n: int, n_classes: int, shape=(2, 3, 4), *, dtype="float32", parts=None, **over) -> FeatureSchema:
    fields = dict(
        model="tinynet",
        checkpoint_digest="sha256:0123abcd",
        layer="layer4",
        input_size=32,
        dataset="synthetic",
        dataset_fingerprint="ds-fp-1",
        split="train",
        dtype=dtype,
        n_images=n,
        n_classes=n_classes,
        feature_shape=shape,
        class_names=[f"class_{c}" for c in range(n_classes)],
        part_names=parts,
    )
    fields.update(over)
    return FeatureSchema(**fields)


def make_data(n: int, n_classes: int, shape=(2, 3, 4), n_parts: int | None = None, seed: int = 0):
    """labels [n] (every class present when n allows, shuffled), ids [n], features [n, H, W, D], keypoints."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(min(n, n_classes)), rng.integers(0, n_classes, max(0, n - n_classes))])
    rng.shuffle(labels)
    ids = [f"img_{seed}_{i:04d}" for i in range(n)]
    feats = rng.gamma(2.0, 1.0, size=(n, *shape)).astype(np.float32)
    kps = None if n_parts is None else rng.uniform(0, 32, size=(n, n_parts, 3)).astype(np.float32)
    return labels, ids, feats, kps


def fill(store: FeatureStore, feats, kps=None, chunks=None) -> None:
    """Write chunks (all missing by default) as an extraction task would: look up the dataset indices, write."""
    for k in store.missing_chunks() if chunks is None else chunks:
        idx = store.chunk_indices(k)
        store.write_chunk(k, torch.from_numpy(feats[idx]), keypoints=None if kps is None else kps[idx])


def check_round_trip(store: FeatureStore, schema, labels, ids, feats, kps) -> None:
    assert store.schema == schema
    assert store.missing_chunks() == []
    assert len(store) == len(labels)
    assert np.array_equal(store.labels.numpy(), labels)
    assert store.image_ids == ids
    assert store.classes == sorted(set(int(c) for c in labels))
    expected = feats.astype(schema.dtype).astype(np.float32)  # what the storage dtype can hold
    for c in range(schema.n_classes):
        members = np.flatnonzero(labels == c)  # dataset order within the class
        got = store.class_features(c)
        assert got.dtype == torch.float32 and got.shape == (len(members), *schema.feature_shape)
        assert torch.equal(got, torch.from_numpy(expected[members]))
        assert store.class_image_ids(c) == [ids[i] for i in members]
        assert np.array_equal(store.class_indices(c), members)
        if kps is None:
            assert store.class_keypoints(c) is None
        else:
            assert torch.equal(store.class_keypoints(c), torch.from_numpy(kps[members]))


# -- round trips ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_local(tmp_path, dtype):
    n, C = 41, 5
    labels, ids, feats, kps = make_data(n, C, n_parts=3)
    schema = make_schema(n, C, dtype=dtype, parts=["head", "wing", "tail"])
    store = FeatureStore.create(tmp_path / "fs", schema, labels=labels, image_ids=ids, keypoints_shape=(3, 3),
                                images_per_chunk=4)
    fill(store, feats, kps)
    check_round_trip(FeatureStore.open(tmp_path / "fs"), schema, labels, ids, feats, kps)
    half = FeatureStore.open(tmp_path / "fs").class_features(1, dtype=torch.float16)
    assert half.dtype == torch.float16


@pytest.mark.parametrize("compression", ["zstd", "lz4", "none"])
def test_every_compression_round_trips_and_is_recorded(tmp_path, compression):
    import zarr

    n, C = 23, 3
    labels, ids, feats, kps = make_data(n, C, n_parts=2)
    schema = make_schema(n, C, parts=["a", "b"])
    store = FeatureStore.create(tmp_path / "fs", schema, labels=labels, image_ids=ids, keypoints_shape=2,
                                images_per_chunk=4, compression=compression)
    fill(store, feats, kps)
    check_round_trip(FeatureStore.open(tmp_path / "fs"), schema, labels, ids, feats, kps)
    codecs = zarr.open_array(tmp_path / "fs" / "features", mode="r").compressors
    assert len(codecs) == (0 if compression == "none" else 1)
    # A resume keeps the store's own compression whatever the caller asks for now.
    again = FeatureStore.create(tmp_path / "fs", schema, labels=labels, image_ids=ids, keypoints_shape=2,
                                compression="none" if compression != "none" else "zstd")
    assert again.missing_chunks() == []
    assert zarr.open_array(tmp_path / "fs" / "features", mode="r").compressors == codecs
    with pytest.raises(InputValueError, match=r"compression must be one of .*got 'gzip'"):
        FeatureStore.create(tmp_path / "other", schema, labels=labels, image_ids=ids, compression="gzip")


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_s3(s3_server, s3_bucket, dtype):
    n, C = 14, 3
    labels, ids, feats, kps = make_data(n, C, n_parts=2, seed=1)
    schema = make_schema(n, C, dtype=dtype)
    uri = f"{s3_bucket}/runs/a/features"
    opts = {**s3_server.storage_options, "key": KEY_ID, "secret": SECRET}  # moto accepts any credentials
    store = FeatureStore.create(uri, schema, labels=labels, image_ids=ids, keypoints_shape=2, images_per_chunk=3,
                                storage_options=opts)
    fill(store, feats, kps)
    reopened = FeatureStore.open(uri, storage_options=opts, expected_fingerprint=schema.fingerprint())
    check_round_trip(reopened, schema, labels, ids, feats, kps)
    assert reopened.is_complete

    # Credentials never reach the URI, the repr or any stored object (attributes included).
    assert reopened.uri == uri and SECRET not in repr(reopened) and KEY_ID not in repr(reopened)
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    bucket = s3_bucket[len("s3://"):]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="runs/a/features/")["Contents"]]
    assert "runs/a/features/zarr.json" in keys
    for k in (k for k in keys if k.endswith("zarr.json")):
        body = client.get_object(Bucket=bucket, Key=k)["Body"].read()
        assert SECRET.encode() not in body and KEY_ID.encode() not in body and b"127.0.0.1" not in body, k


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 25),
    n_classes=st.integers(1, 5),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 6)),
    ipc=st.one_of(st.none(), st.integers(1, 7)),
    dtype=st.sampled_from(["float16", "float32"]),
    seed=st.integers(0, 1000),
)
def test_round_trip_random_shapes(n, n_classes, shape, ipc, dtype, seed):
    labels, ids, feats, _ = make_data(n, n_classes, shape, seed=seed)
    schema = make_schema(n, n_classes, shape, dtype=dtype)
    with tempfile.TemporaryDirectory() as d:
        store = FeatureStore.create(d + "/fs", schema, labels=labels, image_ids=ids, images_per_chunk=ipc)
        fill(store, feats)
        check_round_trip(FeatureStore.open(d + "/fs"), schema, labels, ids, feats, None)


# -- layout --------------------------------------------------------------------------------------------------------


def test_layout_is_class_contiguous_and_chunk_aligned(tmp_path):
    n, C, ipc = 37, 6, 4
    labels, ids, _, _ = make_data(n, C, seed=3)
    labels[labels == 5] = 4  # class 5 has no images
    store = FeatureStore.create(tmp_path / "fs", make_schema(n, C), labels=labels, image_ids=ids,
                                images_per_chunk=ipc)
    assert store.classes == [0, 1, 2, 3, 4]
    assert store.class_chunks(5) == [] and store.class_features(5).shape == (0, 2, 3, 4)
    # storage order: sorted by label, dataset order within a class
    assert np.array_equal(store.order, np.argsort(labels, kind="stable"))
    assert np.array_equal(labels[store.order], np.sort(labels))
    seen_chunks = []
    for c in range(C):
        start, stop = store.class_rows(c)
        assert start % ipc == 0 and stop - start == (labels == c).sum()
        for i in np.flatnonzero(labels == c):
            assert start <= store.row_of(int(i)) < stop
        chunks = store.class_chunks(c)
        assert chunks == list(range(start // ipc, -(-stop // ipc)))
        seen_chunks += chunks
    assert seen_chunks == list(range(store.n_chunks))  # every chunk belongs to exactly one class
    for k in range(store.n_chunks):
        a, b = store.chunk_rows(k)
        assert a == k * ipc and 1 <= b - a <= ipc
        assert np.array_equal(store.chunk_indices(k), store.order[np.isin(store.order, store.chunk_indices(k))])
    rows = [store.row_of(int(i)) for i in store.order]
    assert rows == sorted(rows) and len(set(rows)) == n


def test_default_images_per_chunk_gives_1_to_4_mib_chunks():
    # CUB-like: 30 images per class of 7x7x512 float32 (98 KiB each): whole classes per chunk, no padding.
    image_bytes = 7 * 7 * 512 * 4
    ipc = default_images_per_chunk([30] * 200, image_bytes)
    assert ipc == 30 and 1 << 20 <= ipc * image_bytes <= 4 << 20
    ipc = default_images_per_chunk([600, 577, 613], 14 * 14 * 1024 * 2)
    assert 1 << 20 <= ipc * 14 * 14 * 1024 * 2 <= 4 << 20
    assert default_images_per_chunk([3, 5], 16) == 5  # tiny features: never more than the largest class


# -- chunk-local reads on S3 ---------------------------------------------------------------------------------------


def test_reading_one_class_from_s3_touches_only_its_chunks(s3_server, s3_bucket, monkeypatch):
    n, C, ipc = 20, 4, 3
    labels, ids, feats, kps = make_data(n, C, n_parts=2, seed=4)
    uri = f"{s3_bucket}/fs"
    store = FeatureStore.create(uri, make_schema(n, C), labels=labels, image_ids=ids, keypoints_shape=2,
                                images_per_chunk=ipc, storage_options=s3_server.storage_options)
    fill(store, feats, kps)
    reader = FeatureStore.open(uri, storage_options=s3_server.storage_options)

    # Counting only: wrap s3fs's object GET; the bytes still come from moto over HTTP.
    gets: list[str] = []
    real_cat_file = s3fs.S3FileSystem._cat_file

    async def counting_cat_file(self, path, *args, **kwargs):
        gets.append(path)
        return await real_cat_file(self, path, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_cat_file", counting_cat_file)
    c = 2
    own = reader.class_chunks(c)
    assert 0 < len(own) < reader.n_chunks  # other classes' chunk objects exist, so not reading them means something
    prefix = s3_bucket[len("s3://"):] + "/fs"
    members = np.flatnonzero(labels == c)

    got = reader.class_features(c)
    assert torch.equal(got, torch.from_numpy(feats[members]))
    chunk_gets = [p for p in gets if "/c/" in p]  # chunk objects (the rest is zarr.json metadata)
    expected = [f"{prefix}/features/c/{k}/0/0/0" for k in own] + [f"{prefix}/done/c/{k}" for k in own]
    assert sorted(chunk_gets) == sorted(expected)  # only class c's chunks, each read once

    gets.clear()
    assert torch.equal(reader.class_keypoints(c), torch.from_numpy(kps[members]))
    chunk_gets = [p for p in gets if "/c/" in p]
    expected = [f"{prefix}/keypoints/c/{k}/0/0" for k in own] + [f"{prefix}/done/c/{k}" for k in own]
    assert sorted(chunk_gets) == sorted(expected)


# -- resume --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "s3"])
def test_resume_after_crash_rewrites_only_missing_chunks(where, tmp_path, request, monkeypatch):
    n, C = 17, 3
    labels, ids, feats, _ = make_data(n, C, seed=5)
    schema = make_schema(n, C)
    if where == "s3":
        s3 = request.getfixturevalue("s3_server")
        uri, opts = f"{request.getfixturevalue('s3_bucket')}/fs", s3.storage_options
    else:
        uri, opts = str(tmp_path / "fs"), None
    store = FeatureStore.create(uri, schema, labels=labels, image_ids=ids, images_per_chunk=4, storage_options=opts)
    all_chunks = store.missing_chunks()
    assert all_chunks == list(range(store.n_chunks))
    written = all_chunks[::2]
    fill(store, feats, chunks=written)
    del store  # "crash": the writer goes away

    # A chunk interrupted between its data and its done marker stays missing.
    interrupted = all_chunks[1]
    victim = FeatureStore.open(uri, storage_options=opts)

    class Crash(RuntimeError):
        pass

    def crash(self, k):
        raise Crash("power cut")

    monkeypatch.setattr(FeatureStore, "_mark_done", crash)
    with pytest.raises(Crash):
        victim.write_chunk(interrupted, feats[victim.chunk_indices(interrupted)])
    monkeypatch.undo()

    resumed = FeatureStore.create(uri, schema, labels=labels, image_ids=ids, storage_options=opts)
    assert resumed.missing_chunks() == [k for k in all_chunks if k not in written]
    assert not resumed.is_complete
    with pytest.raises(StoreError, match="incomplete"):
        resumed.class_features(int(labels[resumed.chunk_indices(interrupted)[0]]))
    fill(resumed, feats)
    check_round_trip(FeatureStore.open(uri, storage_options=opts), schema, labels, ids, feats, None)


def test_interrupted_create_is_rebuilt_not_resumed(tmp_path, monkeypatch):

    n, C = 8, 2
    labels, ids, feats, _ = make_data(n, C, seed=8)
    schema = make_schema(n, C)
    from zarr.core.group import AsyncGroup

    real_create_array = AsyncGroup.create_array

    async def dies_at_done(self, name, **kwargs):
        if name == "done":
            raise OSError("disk vanished")
        return await real_create_array(self, name, **kwargs)

    monkeypatch.setattr(AsyncGroup, "create_array", dies_at_done)
    with pytest.raises(StoreError, match="disk vanished"):
        FeatureStore.create(tmp_path / "fs", schema, labels=labels, image_ids=ids)
    monkeypatch.undo()
    with pytest.raises(StoreError, match="interrupted"):
        FeatureStore.open(tmp_path / "fs")
    store = FeatureStore.create(tmp_path / "fs", schema, labels=labels, image_ids=ids)
    fill(store, feats)
    check_round_trip(FeatureStore.open(tmp_path / "fs"), schema, labels, ids, feats, None)


def test_resume_refuses_other_labels_or_layout(tmp_path):
    n, C = 12, 3
    labels, ids, _, _ = make_data(n, C, seed=6)
    schema = make_schema(n, C)
    FeatureStore.create(tmp_path / "fs", schema, labels=labels, image_ids=ids, images_per_chunk=2)
    other = labels.copy()
    other[0] = (other[0] + 1) % C
    with pytest.raises(SchemaMismatchError, match="other labels"):
        FeatureStore.create(tmp_path / "fs", schema, labels=other, image_ids=ids)
    with pytest.raises(SchemaMismatchError, match="images_per_chunk"):
        FeatureStore.create(tmp_path / "fs", schema, labels=labels, image_ids=ids, images_per_chunk=3)
    with pytest.raises(SchemaMismatchError, match="keypoints_shape"):
        FeatureStore.create(tmp_path / "fs", schema, labels=labels, image_ids=ids, keypoints_shape=2)


# -- refusals --------------------------------------------------------------------------------------------------------


def test_schema_mismatch_names_both_fingerprints_and_fields(tmp_path):
    n, C = 10, 2
    labels, ids, feats, _ = make_data(n, C, seed=7)
    a = make_schema(n, C)
    b = make_schema(n, C, layer="layer3", dtype="float16")
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == make_schema(n, C, created="2020-01-01T00:00:00+00:00").fingerprint()
    store = FeatureStore.create(tmp_path / "fs", a, labels=labels, image_ids=ids)
    fill(store, feats)
    with pytest.raises(SchemaMismatchError) as err:
        FeatureStore.create(tmp_path / "fs", b, labels=labels, image_ids=ids)
    msg = str(err.value)
    assert a.fingerprint() in msg and b.fingerprint() in msg and "layer" in msg and "dtype" in msg
    assert "overwrite=True" in msg
    assert FeatureStore.open(tmp_path / "fs").is_complete  # the refusal left the store alone

    with pytest.raises(SchemaMismatchError) as err:
        FeatureStore.open(tmp_path / "fs", expected_fingerprint=b.fingerprint())
    assert a.fingerprint() in str(err.value) and b.fingerprint() in str(err.value)

    fresh = FeatureStore.create(tmp_path / "fs", b, labels=labels, image_ids=ids, overwrite=True)
    assert fresh.schema == b and fresh.missing_chunks() == list(range(fresh.n_chunks))


def test_missing_store_is_a_clear_error(tmp_path, s3_server, s3_bucket):
    with pytest.raises(StoreError, match=r"No feature store at .*FeatureStore\.create"):
        FeatureStore.open(tmp_path / "nothing-here")
    with pytest.raises(StoreError, match=r"No feature store at s3://"):
        FeatureStore.open(f"{s3_bucket}/nothing", storage_options=s3_server.storage_options)


def test_foreign_zarr_node_is_not_overwritten_silently(tmp_path):
    import zarr

    zarr.open_group(str(tmp_path / "fs"), mode="w").attrs["someone"] = "else"
    labels, ids, _, _ = make_data(4, 2)
    with pytest.raises(StoreError, match="not a phpn feature store"):
        FeatureStore.create(tmp_path / "fs", make_schema(4, 2), labels=labels, image_ids=ids)
    with pytest.raises(StoreError, match="not a phpn feature store"):
        FeatureStore.open(tmp_path / "fs")
    FeatureStore.create(tmp_path / "fs", make_schema(4, 2), labels=labels, image_ids=ids, overwrite=True)


def test_unreachable_endpoint_fails_fast_without_secrets():
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": KEY_ID, "secret": SECRET,
            "client_kwargs": {"region_name": "us-east-1"}}
    t0 = time.monotonic()
    with pytest.raises(StoreError) as err:
        FeatureStore.open("s3://some-bucket/fs", storage_options=opts)
    elapsed = time.monotonic() - t0
    msg = str(err.value)
    assert elapsed < 20, f"took {elapsed:.1f} s"
    assert f"127.0.0.1:{port}" in msg and "s3://some-bucket/fs" in msg
    assert SECRET not in msg and KEY_ID not in msg
    assert err.value.__cause__ is None  # nothing chained that could carry more than the redacted text
    assert opts["secret"] == SECRET and "config_kwargs" not in opts  # the caller's options are not mutated


# -- input checks ----------------------------------------------------------------------------------------------------


def test_write_chunk_refuses_bad_input(tmp_path):
    n, C = 9, 2
    labels, ids, feats, kps = make_data(n, C, n_parts=2)
    store = FeatureStore.create(tmp_path / "fs", make_schema(n, C, dtype="float16"), labels=labels, image_ids=ids,
                                keypoints_shape=(2, 3), images_per_chunk=2)
    idx = store.chunk_indices(0)
    good, good_kp = feats[idx], kps[idx]
    with pytest.raises(ShapeError, match=r"expected \[m, H, W, D\]"):
        store.write_chunk(0, good[:, :, :, :2], keypoints=good_kp)
    with pytest.raises(ShapeError, match="expected"):
        store.write_chunk(0, feats[: len(idx) + 1], keypoints=kps[: len(idx) + 1])
    with pytest.raises(ShapeError, match=r"expected \[m, P, 3\]"):
        store.write_chunk(0, good, keypoints=good_kp[:, :1])
    bad = good.copy()
    bad.flat[0] = np.nan
    with pytest.raises(InputValueError, match="NaN"):
        store.write_chunk(0, bad, keypoints=good_kp)
    with pytest.raises(InputValueError, match="float16"):
        store.write_chunk(0, good * 1e6, keypoints=good_kp)
    with pytest.raises(InputValueError, match="keypoints .* missing"):
        store.write_chunk(0, good)
    with pytest.raises(InputValueError, match="out of range"):
        store.write_chunk(store.n_chunks, good, keypoints=good_kp)
    assert store.missing_chunks() == list(range(store.n_chunks))  # nothing was marked done
    before = good.copy()
    store.write_chunk(0, good, keypoints=good_kp)
    assert np.array_equal(good, before)  # inputs are never mutated
    assert store.missing_chunks()[0] == 1


def test_create_refuses_bad_input(tmp_path):
    n, C = 5, 2
    labels, ids, _, _ = make_data(n, C)
    schema = make_schema(n, C)
    with pytest.raises(ShapeError, match="labels"):
        FeatureStore.create(tmp_path / "a", schema, labels=labels[:-1], image_ids=ids)
    with pytest.raises(InputValueError, match=r"\[0, 2\)"):
        FeatureStore.create(tmp_path / "a", schema, labels=np.full(n, 2), image_ids=ids)
    with pytest.raises(InputValueError, match="unique"):
        FeatureStore.create(tmp_path / "a", schema, labels=labels, image_ids=["x"] * n)
    with pytest.raises(InputValueError, match="images_per_chunk"):
        FeatureStore.create(tmp_path / "a", schema, labels=labels, image_ids=ids, images_per_chunk=0)
    with pytest.raises(ShapeError, match="keypoints_shape"):
        FeatureStore.create(tmp_path / "a", schema, labels=labels, image_ids=ids, keypoints_shape=(2, 2))
    with pytest.raises(InputValueError, match="no bucket"):
        FeatureStore.create("s3://", schema, labels=labels, image_ids=ids)
    with pytest.raises(ValueError):  # pydantic: class_names must match n_classes; unknown fields refused
        make_schema(n, C, class_names=["only-one"])
    with pytest.raises(ValueError):
        make_schema(n, C, colour="blue")
    assert not (tmp_path / "a").exists()  # nothing was written by a refused call
