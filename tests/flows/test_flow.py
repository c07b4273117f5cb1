"""decompose_flow end to end under a real temporary Prefect server and a real local Ray (2 CPUs)."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
import torch

from phpn_core.config import load_config
from phpn_core.errors import ConfigError, StoreError

pytestmark = pytest.mark.slow


# phpn_runtime (session: Prefect test server + local Ray + moto behind a pausable proxy) is in conftest.py.


def _cfg(**over):
    base = {"name": "t", "dataset": {"n_classes": 4, "train_per_class": 12, "test_per_class": 6, "image_size": 64},
            "model": {"train_epochs": 2}, "decompose": {"k": 3},
            "compute": {"classes_per_task": 2}, "evaluate": {"enabled": False, "report": False}}
    return load_config(None, **{**base, **over})


def test_end_to_end_in_ray_workers_with_exact_logits(phpn_runtime, tmp_path):
    from flows.decompose import decompose_flow
    from phpn_core.data.factory import build_dataset
    from phpn_core.data.base import normalize
    from phpn_core.storage.registry import PrototypeRegistry
    from tasks.inputs import load_classifier

    cfg = _cfg()
    out = tmp_path / "run"
    m = decompose_flow(cfg, str(out))
    for key in ("accuracy_original", "accuracy_decomposed", "max_abs_logit_diff", "max_head_reconstruction_error",
                "consistency", "stability", "n_classes", "k", "seconds"):
        assert key in json.loads((out / "metrics.json").read_text())
    assert (out / "features" / "train.zarr").is_dir() and (out / "registry").is_dir()
    assert m["accuracy_original"] == m["accuracy_decomposed"] and m["max_abs_logit_diff"] <= 1e-4
    assert m["classes_computed"] == 4
    assert all(int(w.split(":")[1]) != os.getpid() for w in m["shard_workers"]), "shards must run in Ray workers"
    # The flow run carries the labels; its task runs carry none (a tagged task run makes Prefect acquire tag
    # concurrency slots, which delayed shard starts in Ray workers by ~2 s).
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(limit=1, sort=FlowRunSort.START_TIME_DESC)[0]
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    assert {"phpn", "model:synthparts_cnn", "k:3"} <= set(run.tags), run.tags
    assert task_runs and all(not t.tags for t in task_runs), [t.tags for t in task_runs]
    # The published head reproduces the model's logits on test images.
    head, info = PrototypeRegistry(str(out / "registry")).load(m["entry_id"])
    # The run's metrics travel with the registry (beside the version), equal to metrics.json.
    assert PrototypeRegistry(str(out / "registry")).read_metrics(m["entry_id"]) == json.loads(
        (out / "metrics.json").read_text())
    model, features, _, _ = load_classifier({"arch": "synthparts_cnn", "checkpoint": str(out / "model" / "synthparts_cnn.safetensors"),
                                             "num_classes": 4, "input_size": 64})
    ds = build_dataset(cfg.dataset, "test")
    x = normalize(torch.stack([ds[i]["image"] for i in range(8)]), ds.mean, ds.std)
    with torch.inference_mode():
        assert float((head(features(x)) - model(x)).abs().max()) <= 1e-4

    # Re-running the same config recomputes nothing; dropping one class recomputes that class only.
    again = decompose_flow(cfg, str(out))
    assert again["classes_computed"] == 0 and again["classes_reused"] == 4
    PrototypeRegistry(str(out / "registry")).drop_staged(m["entry_id"], 2)
    third = decompose_flow(cfg, str(out))
    assert third["classes_computed"] == 1
    h3, _ = PrototypeRegistry(str(out / "registry")).load(m["entry_id"])
    assert torch.allclose(h3.prototypes.sum(1), head.prototypes.sum(1), atol=1e-5)

    # The runs, their task runs and artifacts are readable through the Prefect API.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    async def read():
        async with get_client() as client:
            runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                name=FlowRunFilterName(like_="decompose-t-")))
            tasks = await client.read_task_runs()
            arts = await client.read_artifacts()
            return runs, tasks, arts

    runs, tasks, arts = asyncio.run(read())
    assert len(runs) >= 3 and all(r.state.is_completed() for r in runs)
    names = {t.name for t in tasks}
    assert any(n.startswith("decompose-synthparts_cnn-synthparts-c0-1") for n in names)
    assert {"prepare-model-synthparts_cnn", "extract-train", "extract-test"} <= names
    keys = {a.key for a in arts if a.key}
    assert "phpn-t-classes" in keys and "phpn-t-metrics" in keys
    assert any(a.type == "progress" for a in arts)


def test_store_and_registry_on_s3(phpn_runtime, tmp_path, s3_bucket):
    from flows.decompose import decompose_flow
    from phpn_core.storage.registry import PrototypeRegistry

    cfg = _cfg(name="s3run", storage={"features_uri": f"{s3_bucket}/features", "registry_uri": f"{s3_bucket}/registry"})
    m = decompose_flow(cfg, str(tmp_path / "run"))
    assert m["max_abs_logit_diff"] <= 1e-4
    entries = PrototypeRegistry(f"{s3_bucket}/registry").entries()
    assert [e.entry_id for e in entries] == [m["entry_id"]]


def test_sweep_runs_every_config_and_summarises(phpn_runtime, tmp_path):
    from flows.sweep import sweep_flow
    from phpn_core.config import SweepConfig

    base = _cfg().model_dump()
    sweep = SweepConfig.model_validate({"name": "sw", "max_concurrency": 2, "base": base,
                                        "runs": [{"name": "a", "decompose": {"k": 2}}, {"name": "b", "decompose": {"k": 3}}]})
    rows = sweep_flow(sweep, str(tmp_path))
    assert [r["name"] for r in rows] == ["a", "b"] and all(r["status"] == "ok" for r in rows)
    assert [r["k"] for r in rows] == [2, 3] and all(r["max_abs_logit_diff"] <= 1e-4 for r in rows)
    assert json.loads((tmp_path / "sweep.json").read_text()) == rows


def test_cli_help_and_registry_commands(phpn_runtime, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.decompose import decompose_flow

    r = CliRunner().invoke(app, ["--help"])
    assert r.exit_code == 0 and all(c in r.output for c in ("demo", "run", "sweep", "registry", "explain"))
    m = decompose_flow(_cfg(name="cli"), str(tmp_path / "run"))
    reg = str(tmp_path / "run" / "registry")
    r = CliRunner().invoke(app, ["registry", "list", reg])
    assert r.exit_code == 0 and "synthparts" in r.output
    r = CliRunner().invoke(app, ["registry", "show", reg, m["entry_id"]])
    shown = json.loads(r.output)
    assert r.exit_code == 0 and shown["entry_id"] == m["entry_id"]
    assert shown["recorded_metrics"]["consistency"] == m["consistency"]
    r = CliRunner().invoke(app, ["registry", "show", reg, "../evil"])
    assert r.exit_code == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("decompose: {k: 0}\nunknown_section: 1\n")
    r = CliRunner().invoke(app, ["run", str(bad), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and not (tmp_path / "x").exists()


@pytest.mark.parametrize("over, match", [
    ({"decompose": {"k": 0}}, r"decompose\.k"),
    ({"decompose": {"kk": 3}}, r"decompose\.kk: unknown key; allowed keys here: .*\bk\b"),
    ({"compute": {"classes_per_task": "many"}}, r"compute\.classes_per_task"),
    ({"model": {"arch": "resnet34", "checkpoint": "/nonexistent/ckpt.pt"}}, r"no file at '/nonexistent/ckpt.pt'"),
    ({"storage": {"features_uri": "s3://"}}, r"bucket"),
])
def test_bad_configs_refused_before_compute(over, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**over)


def test_unreachable_store_refused_before_compute(tmp_path, monkeypatch):
    from flows.preflight import preflight

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSECRETLOOKING")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    cfg = _cfg(storage={"registry_uri": "s3://nowhere-bucket/reg"})
    with pytest.raises(StoreError, match="unreachable") as ei:
        preflight(cfg, tmp_path)
    assert "s3cr3t-value" not in str(ei.value)


def test_the_driver_builds_each_dataset_once_per_run(phpn_runtime, tmp_path, monkeypatch):
    """The pre-flight, the model's training, the class names, the extraction, ProtoEval and the report of one run
    read the same dataset objects: each split is built once in the driver (Ray workers build their own)."""
    import phpn_core.data.factory as factory
    from flows.decompose import decompose_flow

    built: list[str] = []
    real = factory._build

    def counting(cfg, split):
        built.append(split)
        return real(cfg, split)

    monkeypatch.setattr(factory, "_build", counting)
    m = decompose_flow(_cfg(evaluate={"enabled": True, "baselines": False, "report": True}), str(tmp_path / "run"))
    assert m["consistency"] is not None and (tmp_path / "run" / "report.html").is_file()
    for key in ("insertion_auc", "deletion_auc", "box_stability", "redundancy", "duplicate_rate"):  # keypoint-free
        assert 0.0 <= m[key] <= 1.0 or key == "redundancy", (key, m[key])
    assert sorted(built) == ["test", "train"], built
