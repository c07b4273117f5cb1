"""The ProtoPNet baseline end to end (a real Prefect server, real Ray for the decomposition, a real registry): the
CLI's flow trains ProtoPNet on the run's trunk and data, publishes it beside phpn's entry, and the explorer lists
both, shows the ProtoPNet class page and compares the two for a class."""

from __future__ import annotations

import json

import pytest
import torch

from phpn_core.config import load_config

pytestmark = pytest.mark.slow


def _cfg():
    return load_config(None, name="pp", dataset={"n_classes": 3, "train_per_class": 10, "test_per_class": 4,
                                                  "image_size": 64},
                       model={"train_epochs": 2}, decompose={"k": 2}, compute={"classes_per_task": 3},
                       evaluate={"enabled": True, "baselines": False, "report": False},
                       protopnet={"prototypes_per_class": 2, "prototype_dim": 16, "warm_epochs": 1,
                                  "joint_epochs": 1, "last_layer_epochs": 1, "batch_size": 16})


def test_protopnet_baseline_beside_phpn_in_the_registry_and_the_explorer(phpn_runtime, tmp_path):
    from fastapi.testclient import TestClient

    from explorer.app import create_app
    from flows.baseline import protopnet_flow
    from flows.decompose import decompose_flow
    from phpn_core.data.base import normalize
    from phpn_core.data.factory import build_dataset
    from phpn_core.protopnet.entry import rebuild_protopnet
    from phpn_core.storage.registry import PrototypeRegistry
    from tasks.inputs import load_classifier

    cfg, out = _cfg(), tmp_path / "run"
    phpn = decompose_flow(cfg, str(out))
    m = protopnet_flow(cfg, str(out))
    assert m["accuracy_cnn"] == pytest.approx(phpn["accuracy_original"], abs=1e-6)  # the same trained CNN, the same test split
    assert 0 <= m["accuracy"] <= 1 and m["consistency"] is not None and m["stability"] is not None
    assert json.loads((out / "protopnet_metrics.json").read_text())["entry_id"] == m["entry_id"]

    reg = PrototypeRegistry(str(out / "registry"))
    kinds = {e.entry_id: e.kind for e in reg.entries()}
    assert kinds == {phpn["entry_id"]: "phpn", m["entry_id"]: "protopnet"}
    assert reg.read_metrics(m["entry_id"])["accuracy"] == m["accuracy"]
    # The published network is the trained one: rebuilt on a fresh trunk, it reproduces the recorded accuracy.
    tensors, info = reg.load_protopnet_tensors(m["entry_id"])
    _, trunk, _, _ = load_classifier(info.metadata["model_record"])
    model, push = rebuild_protopnet(trunk, tensors, info.metadata["protopnet"])
    test = build_dataset(cfg.dataset, "test")
    x = normalize(torch.stack([test[i]["image"] for i in range(len(test))]), test.mean, test.std)
    with torch.no_grad():
        acc = float((model(x).argmax(1) == torch.tensor(test.labels)).float().mean())
    assert acc == pytest.approx(m["accuracy"], abs=1e-6)
    train = build_dataset(cfg.dataset, "train")
    assert all(int(train.labels[int(i)]) == int(c) for i, c in zip(push.image_index, push.prototype_classes))

    client = TestClient(create_app(registry_uri=str(out / "registry")))
    rows = {r["entry_id"]: r for r in client.get("/api/entries").json()}
    assert rows[m["entry_id"]]["kind"] == "protopnet" and rows[phpn["entry_id"]]["kind"] == "phpn"
    assert rows[m["entry_id"]]["metrics"]["accuracy"] == pytest.approx(m["accuracy"])
    view = client.get(f"/api/entries/{m['entry_id']}/classes/1").json()
    assert view["k"] == 2 and all(len(p["gallery"]) == 1 for p in view["prototypes"])  # one pushed patch each
    assert len(view["test_images"]) == 4
    for kind in ("heatmaps", "gallery", "contributions"):
        r = client.get(f"/api/entries/{m['entry_id']}/classes/1/{kind}.png")
        assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n", kind
    page = client.get("/compare", params={"ids": [phpn["entry_id"], m["entry_id"]], "cls": "1"})
    assert page.status_code == 200
    for eid in (phpn["entry_id"], m["entry_id"]):
        for kind in ("gallery", "heatmaps"):
            assert f"/api/entries/{eid}/classes/1/{kind}.png" in page.text, (eid, kind)
    assert "pushed training patches" in page.text and "protopnet" in client.get("/").text
    api = client.get("/api/compare", params={"ids": [phpn["entry_id"], m["entry_id"]], "cls": "1"}).json()
    assert {c["kind"]: c["k"] for c in api["class"]} == {"phpn": 2, "protopnet": 2}
    assert all(c["gallery_png"] and c["heatmaps_png"] for c in api["class"])


def test_the_config_section_and_the_cli_refuse_bad_settings(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app
    from phpn_core.errors import ConfigError
    from phpn_core.protopnet import ProtoPNetConfig

    base = load_config(None)
    assert ProtoPNetConfig(**base.protopnet.options()) == ProtoPNetConfig()  # unset keys: the recipe's defaults
    other = load_config(None, protopnet={"joint_epochs": 3})
    assert other.protopnet_digest() != base.protopnet_digest() and other.digest() == base.digest()
    with pytest.raises(ConfigError, match="protopnet.joint_epochs"):
        load_config(None, protopnet={"joint_epochs": -1})
    with pytest.raises(ConfigError, match="protopnet"):
        load_config(None, protopnet={"epochs": 3})
    res = CliRunner().invoke(app, ["baseline", "protopnet", "configs/demo.yaml", "--out", str(tmp_path),
                                   "--epochs", "1,2"])
    assert res.exit_code == 2 and "WARM,JOINT,LAST" in res.output
    assert not any(tmp_path.iterdir())  # refused before anything ran
