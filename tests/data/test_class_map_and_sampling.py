"""Issue 14: ImageFolder class maps, per-class sampling (and its identity), class names, partial decomposition."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from phpn_core.config import load_config
from phpn_core.data.factory import (
    PerClassSample,
    build_dataset,
    class_names_for_run,
    sample_per_class,
)
from phpn_core.data.imagefolder import ImageFolderDataset, read_class_map
from phpn_core.errors import ConfigError, InputValueError
from phpn_core.extract import dataset_fingerprint


def _tree(root: Path, counts: dict[str, int], size: int = 8) -> Path:
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (size, size), (i * 20 % 256, 10, 200)).save(root / name / f"{i:03d}.png")
    return root


def test_class_map_gives_head_rows_and_names(tmp_path):
    root = _tree(tmp_path / "t", {"tabby": 2, "espresso": 3, "goldfish": 1})
    cmap = tmp_path / "map.json"
    cmap.write_text(json.dumps({"tabby": 281, "espresso": 967, "goldfish": 1, "unused": 5}))
    ds = ImageFolderDataset(root, image_size=8, class_map=cmap)
    by_id = dict(zip(ds.image_ids, ds.labels))
    assert {i.split("/")[0]: l for i, l in by_id.items()} == {"tabby": 281, "espresso": 967, "goldfish": 1}
    assert all(ds[i]["label"] == ds.labels[i] for i in range(len(ds)))
    assert len(ds.classes) == 968 and ds.mapped_rows == [1, 281, 967]
    assert [ds.classes[r] for r in ds.mapped_rows] == ["goldfish", "tabby", "espresso"]
    assert ds.classes[0] == "class 0"
    # Without a map: folder order, as torchvision.
    plain = ImageFolderDataset(root, image_size=8)
    assert plain.classes == ["espresso", "goldfish", "tabby"] and sorted(set(plain.labels)) == [0, 1, 2]
    # A different map is a different dataset identity.
    assert dataset_fingerprint(ds) != dataset_fingerprint(plain)


def test_class_map_errors_name_what_is_wrong(tmp_path):
    root = _tree(tmp_path / "t", {"a": 1, "b": 1, "c": 1})
    with pytest.raises(InputValueError, match=r"2 class folder\(s\).*not in the class map: 'b', 'c'"):
        ImageFolderDataset(root, class_map={"a": 0})
    with pytest.raises(InputValueError, match="several folders to one head row"):
        read_class_map({"a": 3, "b": 3})
    with pytest.raises(InputValueError, match="head rows"):
        read_class_map({"a": -1})
    with pytest.raises(InputValueError, match="head rows"):
        read_class_map({"a": True})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputValueError, match="not readable JSON"):
        read_class_map(bad)
    with pytest.raises(InputValueError, match="does not exist"):
        read_class_map(tmp_path / "missing.json")
    with pytest.raises(InputValueError, match="non-empty JSON object"):
        read_class_map([1, 2])


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("n", [1, 3, 10])
def test_sample_per_class_properties(seed, n):
    rng = np.random.default_rng(seed + 100)
    labels = rng.integers(0, 6, size=80).tolist()
    idx = sample_per_class(labels, n, seed=seed)
    assert idx == sorted(set(idx))
    got = np.bincount([labels[i] for i in idx], minlength=6)
    have = np.bincount(labels, minlength=6)
    assert (got == np.minimum(have, n)).all()
    assert sample_per_class(labels, n, seed=seed) == idx  # deterministic
    # Class c's sample depends only on its own items: dropping another class leaves it unchanged.
    kept = [i for i, l in enumerate(labels) if l != 0]
    sub = sample_per_class([labels[i] for i in kept], n, seed=seed)
    assert [kept[j] for j in sub] == [i for i in idx if labels[i] != 0]


def test_sample_per_class_seed_changes_sample_and_bad_n():
    labels = [0] * 50 + [1] * 50
    assert sample_per_class(labels, 5, seed=0) != sample_per_class(labels, 5, seed=1)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(InputValueError, match="max_per_class"):
            sample_per_class(labels, bad)


def test_max_per_class_is_in_the_store_identity(tmp_path):
    root = tmp_path / "data"
    _tree(root / "train", {"x": 6, "y": 4})
    _tree(root / "test", {"x": 2, "y": 2})

    def ds(**over):
        return build_dataset(load_config(None, dataset={"kind": "imagefolder", "root": str(root), "image_size": 16,
                                                        **over}).dataset, "train")

    full, s3, s3b, s3seed = ds(), ds(max_per_class=3), ds(max_per_class=3), ds(max_per_class=3, seed=5)
    assert isinstance(s3, PerClassSample) and len(full) == 10 and len(s3) == 6
    assert np.bincount(s3.labels).tolist() == [3, 3]
    assert s3.image_ids == s3b.image_ids and dataset_fingerprint(s3) == dataset_fingerprint(s3b)
    assert len({dataset_fingerprint(full), dataset_fingerprint(s3), dataset_fingerprint(s3seed)}) == 3
    assert s3.image_ids != s3seed.image_ids
    for i in range(len(s3)):
        item = s3[i]
        assert item["image_id"] == s3.image_ids[i] and item["label"] == s3.labels[i]
        assert item["image"].shape == (3, 16, 16)
    assert s3.classes == full.classes and s3.mean == full.mean
    # The test split is never sampled.
    assert len(build_dataset(load_config(None, dataset={"kind": "imagefolder", "root": str(root),
                                                        "max_per_class": 1}).dataset, "test")) == 4
    # The pre-flight image check looks at the sampled files only.
    from tasks.inputs import image_paths

    assert [p.relative_to(root / "train").as_posix() for p in image_paths(s3)] == s3.image_ids


def test_class_names_for_run():
    class DS:
        classes = ["a", "b"]

    assert class_names_for_run(DS(), 4) == ["a", "b", "class 2", "class 3"]
    assert class_names_for_run(DS(), 2, ["x", "y"]) == ["x", "y"]
    with pytest.raises(InputValueError, match="expected 2, got 1"):
        class_names_for_run(DS(), 2, ["x"])


def test_config_keys_and_identity(tmp_path):
    root = _tree(tmp_path / "d" / "train", {"a": 1}).parent
    cmap = tmp_path / "m.json"
    cmap.write_text('{"a": 3}')
    cfg = load_config(None, dataset={"kind": "imagefolder", "root": str(root), "class_map": str(cmap),
                                     "max_per_class": 2}, decompose={"classes": [5, 3]})
    assert cfg.decompose.classes == [3, 5] and cfg.dataset.max_per_class == 2
    d1 = cfg.digest()
    cmap.write_text('{"a": 4}')
    assert cfg.digest() != d1  # the map's content is part of the decomposition's identity
    with pytest.raises(ConfigError, match="class_map: no file"):
        load_config(None, dataset={"kind": "imagefolder", "root": str(root), "class_map": str(tmp_path / "no")})
    with pytest.raises(ConfigError, match="imagefolder only|applies to kind 'imagefolder'"):
        load_config(None, dataset={"class_map": str(cmap)})
    for bad in ([], [1, 1], [-1]):
        with pytest.raises(ConfigError, match="decompose.classes"):
            load_config(None, decompose={"classes": bad})
    with pytest.raises(ConfigError, match="max_per_class"):
        load_config(None, dataset={"max_per_class": 0})


def test_decomposed_rows_defaults_and_errors():
    from tasks.prepare import decomposed_rows

    counts = [0, 4, 0, 2]
    assert decomposed_rows(None, counts) == [1, 3]
    assert decomposed_rows([3], counts) == [3]
    with pytest.raises(InputValueError, match=r"rows \[2\] that have no training image.*rows with images: \[1, 3\]"):
        decomposed_rows([2, 3], counts)
    with pytest.raises(InputValueError, match=r"outside the head's C=4"):
        decomposed_rows([7], counts)


def test_partial_publish_keeps_every_linear_row_exactly(tmp_path):
    from phpn_core import decompose_head
    from phpn_core.storage.registry import PrototypeRegistry

    g = torch.Generator().manual_seed(0)
    C, D, k = 12, 6, 3
    W, b = torch.randn(C, D, generator=g), torch.randn(C, generator=g)
    rows = [2, 7, 11]
    feats = {c: torch.rand(4, 3, 3, D, generator=g) for c in rows}
    hd = decompose_head(feats, W, k, seed=0)
    reg = PrototypeRegistry(str(tmp_path / "reg"))
    eid = PrototypeRegistry.entry_id("m", "d", k, "0123456789abcdef")
    reg.write_classes(eid, hd.classes, {"prototypes": hd.prototypes, "initial": hd.initial, "alpha": hd.alpha,
                                        "residual": hd.residual, "rel_error": hd.rel_error,
                                        "head_error": hd.head_error, **{n: v.double() for n, v in hd.diagnostics.items()}})
    with pytest.raises(Exception, match="missing"):
        reg.publish(eid, n_classes=C, bias=b)  # without decomposed=, every row must be staged
    with pytest.raises(InputValueError, match="needs the linear head weight"):
        reg.publish(eid, n_classes=C, bias=b, decomposed=rows)
    info = reg.publish(eid, n_classes=C, bias=b, decomposed=rows, weight=W, metadata={"run": "x"})
    assert info.metadata["decomposed_classes"] == rows and info.metadata["run"] == "x"
    assert info.mean_rel_error == pytest.approx(float(hd.rel_error.mean()), rel=1e-5)
    head, _ = reg.load(eid)
    fmap = torch.rand(5, D, 3, 3, generator=g)
    assert torch.allclose(head(fmap), fmap.mean((2, 3)) @ W.T + b, atol=1e-5)
    assert torch.allclose(head.prototypes[rows], hd.prototypes, atol=0)
    ex = head.explain(fmap, classes=rows)
    assert ex.contributions.shape == (5, 3, k)


def test_k_fix_hint_is_a_fix_that_works(tmp_path):
    """The too-few-rows hint names a k that then passes (never "at most 0": rows without images are not decomposed)."""
    import re

    from tasks.prepare import check_inputs

    over = {"dataset": {"n_classes": 2, "train_per_class": 1, "test_per_class": 1, "image_size": 48},
            "decompose": {"k": 10}}
    with pytest.raises(InputValueError, match="Fix: add images") as e:
        check_inputs(load_config(None, **over))
    k_ok = int(re.search(r"lower decompose.k to at most (\d+)", str(e.value)).group(1))
    assert k_ok >= 1
    rec = check_inputs(load_config(None, **{**over, "decompose": {"k": k_ok}}))
    assert rec["decomposed_classes"] == [0, 1]
    # decompose.classes naming a row without images is refused with the rows that have images.
    with pytest.raises(InputValueError, match=r"outside the head's C=2"):
        check_inputs(load_config(None, **{**over, "decompose": {"k": k_ok, "classes": [3]}}))
    # A head smaller than the mapped rows: named, with the fix.
    root = _tree(tmp_path / "d" / "train", {"a": 1, "b": 1}).parent
    _tree(root / "test", {"a": 1, "b": 1})
    cmap = tmp_path / "m.json"
    cmap.write_text('{"a": 0, "b": 7}')
    cfg = load_config(None, dataset={"kind": "imagefolder", "root": str(root), "class_map": str(cmap),
                                     "image_size": 16}, model={"num_classes": 4}, decompose={"k": 1})
    with pytest.raises(InputValueError, match=r"rows up to 7, but the model's head has C=4.*model.num_classes"):
        check_inputs(cfg)


def test_weights_by_name_give_the_imagenet_names():
    """model.weights: the names come from weights.meta["categories"] (no weights file needed for the names)."""
    from tasks.prepare import model_class_names

    cfg = load_config(None, model={"arch": "mobilenet_v2", "weights": "IMAGENET1K_V1"})
    names = model_class_names(cfg, {"arch": "mobilenet_v2"})
    assert len(names) == 1000 and names[281] == "tabby" and names[967] == "espresso"

    class DS:
        classes = ["class 0", "my_cat_folder"]

    assert class_names_for_run(DS(), 1000, names)[281] == "tabby"
    assert model_class_names(load_config(None), {"arch": "synthparts_cnn"}) is None
