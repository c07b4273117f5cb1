"""FeatureStore.class_row_source: a class of a float16 store read in blocks of whole chunks, decomposed as the
same class read whole (phpn_core.method.rows streams it; see tests/method/test_streaming.py)."""

from __future__ import annotations

import numpy as np
import torch

from phpn_core import decompose_head


def test_store_rows_stream_whole_chunks_of_a_float16_store(tmp_path):
    from phpn_core.storage.feature_store import FeatureStore
    from tests.storage.test_feature_store import fill, make_schema

    n, C, shape = 30, 2, (7, 7, 64)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(C), n // C)
    ids = [f"img_{i:04d}" for i in range(n)]
    parts = rng.gamma(0.6, 1.0, size=(5, 64)).astype(np.float32)
    feats = (rng.gamma(0.5, 1.0, size=(n * 49, 5)) @ parts).astype(np.float32).reshape(n, *shape)
    store = FeatureStore.create(tmp_path / "f.zarr", make_schema(n, C, shape=shape, dtype="float16"), labels=labels,
                                image_ids=ids, images_per_chunk=4)
    fill(store, feats)
    src = store.class_row_source(1)
    assert src.dtype == torch.float16 and src.n_rows == (n // C) * 49 and src.dim == 64
    sizes = [b.shape[0] for _, b in src.blocks(4 * 49 * 2)]  # two chunks of 4 images per block
    assert sizes[:-1] == [8 * 49] * (len(sizes) - 1) and sum(sizes) == src.n_rows
    W = torch.randn(C, 64, generator=torch.Generator().manual_seed(0))
    s = decompose_head({1: src}, W, 3, seed=0, nmf_options={"block_bytes": 8 * 49 * 64 * 4})
    d = decompose_head({1: store.class_features(1)}, W, 3, seed=0, stream_bytes=0)  # the same class, streamed
    m = decompose_head({1: store.class_features(1)}, W, 3, seed=0)  # in memory
    for other in (d, m):
        assert abs(float(s.rel_error[0]) - float(other.rel_error[0])) < 1e-3 * float(other.rel_error[0])
    assert (s.prototypes.sum(1) - W[1]).abs().max() < 1e-5
