"""`phpn decompose FEATURES_URI --head HEAD --k K --out DIR` on stores made as an outsider makes them
(``FeatureStore.create`` + ``write_chunk``, D = 2048), under the session's Prefect server and local Ray."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.slow

C, D, HW = 3, 2048, (2, 2)


def make_store(path: Path, *, per_class: int, split: str, seed: int, dtype: str = "float32") -> str:
    """A post-ReLU store of ``C * per_class`` images (labels shuffled), written chunk by chunk as an outsider
    would: look up each chunk's dataset indices, write their features."""
    from phpn_core import FeatureSchema, FeatureStore

    rng = np.random.default_rng(seed)
    n = C * per_class
    labels = rng.permutation(np.repeat(np.arange(C), per_class))
    ids = [f"{split}_{i:03d}" for i in range(n)]
    # class-dependent non-negative features: a few strong channels per class on top of gamma noise
    feats = rng.gamma(1.0, 0.5, size=(n, *HW, D)).astype(np.float32)
    for c in range(C):
        feats[labels == c, :, :, c * 40:(c + 1) * 40] += 3.0
    schema = FeatureSchema(model="outsider-net", checkpoint_digest="sha256:abc123", layer="layer4", input_size=64,
                           dataset="toy", dataset_fingerprint="toy-1", split=split, dtype=dtype, n_images=n,
                           n_classes=C, feature_shape=(*HW, D), class_names=["cat", "dog", "fox"])
    store = FeatureStore.create(str(path), schema, labels=labels, image_ids=ids, images_per_chunk=2)
    for k in store.missing_chunks():
        store.write_chunk(k, torch.from_numpy(feats[store.chunk_indices(k)]))
    return str(path)


@pytest.fixture(scope="module")
def stores(phpn_runtime, tmp_path_factory):
    # Prefect sets its console log handler up on the first flow run of the process, on the sys.stderr of that
    # moment; CliRunner's stderr is closed when its invoke ends. One flow run here binds it to pytest's instead.
    from prefect import flow

    flow(name="warm-up")(lambda: None)()
    root = tmp_path_factory.mktemp("outsider")
    train = make_store(root / "train.zarr", per_class=4, split="train", seed=0)
    test = make_store(root / "test.zarr", per_class=3, split="test", seed=1)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(C, D, generator=g) * 0.05
    weight[:, :120] += torch.eye(C).repeat_interleave(40, dim=1)  # each class's channels vote for it
    bias = torch.randn(C, generator=g)
    head = root / "head.safetensors"
    save_file({"weight": weight, "bias": bias}, str(head))
    return {"train": train, "test": test, "head": str(head), "weight": weight, "bias": bias, "root": root}


def _cli(*args: str):
    from typer.testing import CliRunner

    from flows.cli import app

    res = CliRunner().invoke(app, list(args))
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(res.exception))
        return res.exit_code, f"{res.output[-1500:]}\n{tb[-6000:]}"
    return res.exit_code, res.output


def test_decompose_cli_on_an_outsider_store_is_exact(phpn_runtime, stores, tmp_path):
    from phpn_core import FeatureStore
    from phpn_core.storage.registry import PrototypeRegistry

    out = tmp_path / "run"
    code, output = _cli("decompose", stores["train"], "--head", stores["head"], "--k", "3", "--out", str(out),
                        "--test", stores["test"])
    assert code == 0, output[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_classes"] == C and m["k"] == 3 and m["seconds"] > 0
    assert m["max_head_reconstruction_error"] <= 1e-4
    assert m["accuracy_original"] == m["accuracy_decomposed"] and m["max_abs_logit_diff"] <= 1e-4
    assert m["n_test_images"] == 9 and m["decomposed_classes"] == [0, 1, 2]
    assert all(int(w.split(":")[1]) != os.getpid() for w in m["shard_workers"]), "shards must run in Ray workers"
    assert set(m["stage_seconds"]) == {"inputs", "decomposition", "publish", "parity"}
    # The registry entry: exact head, identity from the store's schema, provenance of store and head.
    reg = PrototypeRegistry(str(out / "registry"))
    head, info = reg.load(m["entry_id"])
    assert reg.read_metrics(m["entry_id"]) == m  # the metrics travel with the registry
    assert info.model == "outsider-net" and info.dataset == "toy" and info.k == 3 and info.n_classes == C
    assert info.metadata["features"]["train_fingerprint"] == FeatureStore.open(stores["train"]).fingerprint
    assert torch.allclose(head.prototypes.sum(1), stores["weight"], atol=1e-5)
    F = FeatureStore.open(stores["test"]).class_features(1)
    want = F.mean((1, 2)) @ stores["weight"].T + stores["bias"]
    assert torch.allclose(head(F.permute(0, 3, 1, 2)), want, atol=1e-4)

    # Again: everything reused, the same entry.
    code, output = _cli("decompose", stores["train"], "--head", stores["head"], "--k", "3", "--out", str(out))
    assert code == 0, output[-3000:]
    again = json.loads((out / "metrics.json").read_text())
    assert again["entry_id"] == m["entry_id"] and again["classes_computed"] == 0 and again["classes_reused"] == C
    assert again["accuracy_original"] is None  # no --test this time: parity on the head only


def test_decompose_cli_classes_by_name_and_row(phpn_runtime, stores, tmp_path):
    from phpn_core.storage.registry import PrototypeRegistry

    out = tmp_path / "sub"
    code, output = _cli("decompose", stores["train"], "--head", stores["head"], "--k", "2", "--out", str(out),
                        "--classes", "fox", "--classes", "0")
    assert code == 0, output[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["decomposed_classes"] == [0, 2] and m["classes_computed"] == 2 and m["n_classes"] == C
    head, _ = PrototypeRegistry(str(out / "registry")).load(m["entry_id"])
    assert torch.allclose(head.prototypes.sum(1), stores["weight"], atol=1e-5)  # row 1 keeps its linear row


@pytest.mark.parametrize("case, pattern", [
    ("wrong D", r"expected weight \[C=3, D=2048\].*got weight \[3, 512\]"),
    ("no bias", r"lacks \['bias'\]"),
    ("unknown class", r"'wolf' is neither a head row nor a class name"),
])
def test_decompose_cli_refuses_bad_inputs_with_a_clear_message(phpn_runtime, stores, tmp_path, case, pattern):
    import re

    head = tmp_path / "bad.safetensors"
    args = []
    if case == "wrong D":
        save_file({"weight": torch.zeros(C, 512), "bias": torch.zeros(C)}, str(head))
    elif case == "no bias":
        save_file({"weight": torch.zeros(C, D)}, str(head))
    else:
        head = Path(stores["head"])
        args = ["--classes", "wolf"]
    code, output = _cli("decompose", stores["train"], "--head", str(head), "--k", "3", "--out",
                        str(tmp_path / "out"), *args)
    assert code == 2, output[-2000:]
    assert re.search(pattern, " ".join(output.split())), output[-2000:]
    assert not (tmp_path / "out" / "registry" / "entries").exists()


def test_bench_scale_smallest(phpn_runtime, tmp_path):
    """bench/scale.py at its smallest (C = 2 and 4, one image per class): every row and floor line is produced,
    the decomposition is exact, and publishing from S3 (moto) gathers every staged class."""
    import importlib.util

    from phpn_core import FeatureStore

    spec = importlib.util.spec_from_file_location("scale", Path(__file__).resolve().parents[2] / "bench" / "scale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.run_scale(tmp_path, [2, 4], per_class=1, k=2, device="cpu", shards=2, nmf_iter=20, refine_iter=5,
                           warmup=False)
    assert [r["C"] for r in rows] == [2, 4] and all(r["max_head_error"] <= 1e-5 for r in rows)
    assert all(r["shards"] == 2 and r["driver_peak_mb"] > 0 and r["shard_peak_mb"] > 0 for r in rows)
    assert FeatureStore.open(str(tmp_path / "c4" / "train.zarr")).schema.feature_shape == (7, 7, 2048)
    assert len(bench.floors(rows)) == 1 and "| 4 |" in bench.table(rows)
    pub = bench.publish_from_s3(tmp_path, 4)
    assert pub["n_classes"] == 4 and pub["publish_s3_s"] > 0


def test_deployment_entrypoint_decomposes_a_store(phpn_runtime, stores, tmp_path):
    """flows/deployments.py:decompose_store (infra/prefect.yaml's `decompose-store`) with plain JSON parameters."""
    import yaml

    from flows.deployments import decompose_store

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "infra" / "prefect.yaml").read_text())
    assert any(d["entrypoint"] == "flows/deployments.py:decompose_store" for d in spec["deployments"])
    m = decompose_store(features_uri=stores["train"], head=stores["head"], k=2, out_dir=str(tmp_path / "dep"),
                        test_features_uri=stores["test"], classes=[1])
    assert m["decomposed_classes"] == [1] and m["max_abs_logit_diff"] <= 1e-4
    assert json.loads((tmp_path / "dep" / "metrics.json").read_text())["entry_id"] == m["entry_id"]
