"""phpn_core.storage.chunkio: whole chunks encoded and stored by phpn must be byte-identical to what zarr itself stores.

FeatureStore.write_chunk encodes with numcodecs and writes the objects itself (zarr's indexing path cost the compute
thread GIL time). These tests pin that shortcut to zarr's own output, so that a zarr or numcodecs upgrade that
changes an encoding fails here instead of producing stores that zarr reads differently.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import s3fs
import torch
import zarr

from phpn_core.storage.chunkio import ChunkEncoder, put_chunks
from phpn_core.errors import InputValueError
from phpn_core.storage.feature_store import FeatureStore
from phpn_core.storage.schema import COMPRESSIONS
from tests.storage.test_feature_store import make_data, make_schema


def _objects(root: Path, array: str) -> dict[str, bytes]:
    base = root / array
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def _pair(tmp_path: Path, compression: str, dtype: str, parts: int | None):
    n, C = 11, 3
    labels, ids, feats, kps = make_data(n, C, shape=(3, 2, 5), n_parts=parts, seed=4)
    feats[0, 0, 0, 0] = 0.0  # zeros and exact values survive both paths
    pnames = None if parts is None else [f"p{i}" for i in range(parts)]
    schema = make_schema(n, C, shape=(3, 2, 5), dtype=dtype, parts=pnames)
    kw = dict(labels=labels, image_ids=ids, keypoints_shape=parts, images_per_chunk=2, compression=compression)
    ours = FeatureStore.create(tmp_path / "ours", schema, **kw)
    ref = FeatureStore.create(tmp_path / "zarr", schema, **kw)
    return ours, ref, feats, kps


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_written_chunks_equal_zarrs_own_bytes(tmp_path, compression, dtype):
    ours, ref, feats, kps = _pair(tmp_path, compression, dtype, parts=4)
    for k in range(ours.n_chunks):
        idx = ours.chunk_indices(k)
        ours.write_chunk(k, torch.from_numpy(feats[idx]), keypoints=kps[idx])
        # The reference: zarr's own __setitem__ of the same padded whole chunk, and of the done marker.
        start, stop = ref.chunk_rows(k)
        ipc = ref.images_per_chunk
        block = np.zeros((ipc, *feats.shape[1:]), dtype=dtype)
        block[: stop - start] = feats[idx]
        kblock = np.zeros((ipc, 4, 3), dtype=np.float32)
        kblock[: stop - start] = kps[idx]
        ref._group["features"][start : start + ipc] = block
        ref._group["keypoints"][start : start + ipc] = kblock
        ref._group["done"][k : k + 1] = np.ones(1, dtype=bool)
    for array in ("features", "keypoints", "done"):
        got, want = _objects(tmp_path / "ours", array), _objects(tmp_path / "zarr", array)
        assert got.keys() == want.keys() and len(got) > 1
        assert got == want, f"{array}: chunk bytes differ from zarr's"
    assert ours.missing_chunks() == []
    reopened = FeatureStore.open(tmp_path / "ours")
    for c in reopened.classes:
        members = reopened.class_indices(c)
        assert torch.equal(reopened.class_features(c), torch.from_numpy(feats[members].astype(dtype)).float())
    assert not list((tmp_path / "ours").rglob("*.partial")), "temporary files left behind"


def test_whole_contiguous_chunk_is_written_without_a_copy_and_never_modified(tmp_path):
    ours, _, feats, _ = _pair(tmp_path, "none", "float32", parts=None)
    k = next(k for k in range(ours.n_chunks) if len(ours.chunk_indices(k)) == ours.images_per_chunk)
    rows = np.ascontiguousarray(feats[ours.chunk_indices(k)])
    before = rows.copy()
    lo, hi = ours.write_chunk(k, rows)
    assert np.array_equal(rows, before)
    assert (lo, hi) == (float(rows.min()), float(rows.max()))
    stored = (tmp_path / "ours" / "features" / "c" / str(k) / "0" / "0" / "0").read_bytes()
    assert stored == rows.astype("<f4").tobytes()  # "none": the raw little-endian bytes


def test_write_chunk_reports_stored_min_max_and_refuses_nan(tmp_path):
    ours, _, feats, _ = _pair(tmp_path, "zstd", "float16", parts=None)
    idx = ours.chunk_indices(0)
    rows = feats[idx].copy()
    rows[0, 0, 0, 0] = -3.14159
    lo, hi = ours.write_chunk(0, rows)
    assert lo == float(np.float16(-3.14159)) and hi == float(rows.astype(np.float16).max())
    rows[-1, -1, -1, -1] = np.nan
    with pytest.raises(InputValueError, match="not finite"):
        ours.write_chunk(1 if len(ours.chunk_indices(1)) == len(idx) else 0, rows)


def test_unknown_codec_chains_get_no_encoder_and_fall_back_to_zarr(tmp_path):
    g = zarr.open_group(tmp_path / "g", mode="w", zarr_format=3)
    sharded = g.create_array("s", shape=(8, 4), chunks=(2, 4), shards=(4, 4), dtype="float32")
    filtered = g.create_array("f", shape=(8, 4), chunks=(2, 4), dtype="float32",
                              filters=[zarr.codecs.TransposeCodec(order=(1, 0))])
    plain = g.create_array("p", shape=(8, 4), chunks=(2, 4), dtype="float32", compressors=None)
    assert ChunkEncoder.for_array(sharded) is None
    assert ChunkEncoder.for_array(filtered) is None
    enc = ChunkEncoder.for_array(plain)
    assert enc is not None and enc.key((3, 0)) == "c/3/0"
    with pytest.raises(ValueError, match="whole chunk"):
        enc.encode(np.zeros((1, 4), np.float32))
    block = np.arange(8, dtype=np.float32).reshape(2, 4)
    put_chunks([(enc, (3, 0), enc.encode(block))])
    assert np.array_equal(zarr.open_group(tmp_path / "g", mode="r")["p"][6:8], block)


def test_remote_put_goes_through_the_store(s3_server, s3_bucket):
    opts = s3_server.storage_options
    uri = f"{s3_bucket}/chunkio"
    n, C = 6, 2
    labels, ids, feats, _ = make_data(n, C, shape=(2, 2, 3), seed=1)
    schema = make_schema(n, C, shape=(2, 2, 3))
    store = FeatureStore.create(uri, schema, labels=labels, image_ids=ids, images_per_chunk=2, storage_options=opts)
    for k in store.missing_chunks():
        store.write_chunk(k, feats[store.chunk_indices(k)])
    fs = s3fs.S3FileSystem(**opts)
    keys = fs.find(f"{uri[len('s3://'):]}/features")
    assert sum(k.split("/features/")[1].startswith("c/") for k in keys) == store.n_chunks
    back = FeatureStore.open(uri, storage_options=opts)
    assert back.missing_chunks() == []
    for c in back.classes:
        assert torch.equal(back.class_features(c), torch.from_numpy(feats[back.class_indices(c)]))


def test_gather_settled_lets_every_sibling_finish_before_raising():
    import asyncio

    from phpn_core.storage.chunkio import gather_settled

    finished = []

    async def slow(i: int) -> int:
        await asyncio.sleep(0.05)
        finished.append(i)
        return i

    async def fails() -> None:
        raise OSError("disk vanished")

    async def main() -> None:
        with pytest.raises(OSError, match="disk vanished"):
            await gather_settled([fails(), slow(1), slow(2)])
        assert sorted(finished) == [1, 2]  # plain asyncio.gather would have raised with both still running
        assert await gather_settled(slow(i) for i in (3, 4)) == [3, 4]

    asyncio.run(main())


def test_read_only_and_negatively_strided_inputs_are_written_without_warnings(tmp_path):
    import warnings

    ours, _, feats, _ = _pair(tmp_path, "zstd", "float16", parts=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on non-writable arrays: they must take the numpy path
        for k in range(ours.n_chunks):
            rows = np.ascontiguousarray(feats[ours.chunk_indices(k)])
            if k % 2:
                rows.flags.writeable = False
            else:
                rows = rows[::-1].copy()[::-1]  # same values, negative strides
            lo, hi = ours.write_chunk(k, rows)
            assert (lo, hi) == (float(rows.astype(np.float16).min()), float(rows.astype(np.float16).max()))
    for c in ours.classes:
        want = torch.from_numpy(feats[ours.class_indices(c)].astype("float16")).float()
        assert torch.equal(ours.class_features(c), want)
