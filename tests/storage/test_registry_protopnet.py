"""ProtoPNet baseline entries (kind "protopnet") in the prototype registry: round trip, kind checks, metrics,
corruption, and old pointers (written before kinds existed) still reading as phpn entries."""

from __future__ import annotations

import json

import pytest
import torch

from phpn_core.storage.registry import PrototypeRegistry, RegistryError


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"state.prototypes": torch.rand(6, 8, 1, 1, generator=g), "state.last_layer.weight": torch.randn(3, 6,
            generator=g), "push.image_index": torch.tensor([0, 1, 2, 3, 4, 5]), "push.cell": torch.zeros(6, 2,
            dtype=torch.long)}


def _publish(reg: PrototypeRegistry, **over):
    kw = dict(model="protopnet-synthparts_cnn", dataset="synthparts", config_digest="ab" * 32, tensors=_tensors(),
              n_classes=3, prototypes_per_class=2, prototype_dim=8, metadata={"config": {"k": 2}})
    return reg.publish_protopnet(**{**kw, **over})


def test_round_trip_is_bit_identical_and_the_entry_is_listed(tmp_path):
    reg = PrototypeRegistry(str(tmp_path / "reg"))
    info = _publish(reg)
    assert info.kind == "protopnet" and (info.n_classes, info.k, info.D) == (3, 2, 8)
    assert info.entry_id == PrototypeRegistry.entry_id("protopnet-synthparts_cnn", "synthparts", 2, "ab" * 32)
    got, info2 = reg.load_protopnet_tensors(info.entry_id)
    want = _tensors()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert info2 == info and [e.entry_id for e in reg.entries()] == [info.entry_id]
    path = reg.record_metrics(info.entry_id, {"accuracy": 0.9, "consistency": float("nan")}, version=info.version)
    assert path.endswith("metrics.json")
    assert reg.read_metrics(info.entry_id) == {"accuracy": 0.9, "consistency": None}


def test_kinds_are_not_confused(tmp_path):
    reg = PrototypeRegistry(str(tmp_path / "reg"))
    info = _publish(reg)
    for call in (reg.load, reg.load_arrays):
        with pytest.raises(RegistryError, match="kind 'protopnet'.*load_protopnet_tensors"):
            call(info.entry_id)


def test_a_corrupt_object_is_refused(tmp_path):
    reg = PrototypeRegistry(str(tmp_path / "reg"))
    info = _publish(reg)
    obj = tmp_path / "reg" / "objects" / info.entry_id / info.version / "protopnet.safetensors"
    data = bytearray(obj.read_bytes())
    data[-1] ^= 0xFF
    obj.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="sha256"):
        reg.load_protopnet_tensors(info.entry_id)


def test_bad_tensors_are_refused_before_anything_is_written(tmp_path):
    reg = PrototypeRegistry(str(tmp_path / "reg"))
    bad = _tensors()
    bad["state.prototypes"][0, 0, 0, 0] = float("nan")
    with pytest.raises(Exception, match="NaN"):
        _publish(reg, tensors=bad)
    with pytest.raises(Exception, match="non-empty mapping"):
        _publish(reg, tensors={})
    assert reg.entries() == []


def test_a_pointer_without_kind_reads_as_a_phpn_entry(tmp_path):
    reg = PrototypeRegistry(str(tmp_path / "reg"))
    info = _publish(reg)
    ptr = tmp_path / "reg" / "entries" / f"{info.entry_id}.json"
    doc = json.loads(ptr.read_text())
    del doc["kind"]
    ptr.write_text(json.dumps(doc))
    assert reg.info(info.entry_id).kind == "phpn"  # the default: pointers from before kinds existed
