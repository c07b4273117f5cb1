"""Security (issue 7): nothing is unpickled, credentials never reach an output, paths never escape their root.

- A malicious pickle (its ``__reduce__`` would create a marker file) planted as the model checkpoint of
  ``phpn run`` and as the linear-head tensor file the shard tasks read: refused, the marker never appears.
  (Registry objects and staged classes: tests/storage/test_registry.py::test_planted_pickle_is_never_unpickled.)
- A real ``phpn run`` against moto with a recognisable secret in AWS_SECRET_ACCESS_KEY / AWS_ACCESS_KEY_ID
  (conftest.CANARY_*), logging to the Prefect API: the secret is in none of stdout/stderr, the files of the run
  directory (metrics.json, report.html, ...), the objects in the bucket (store attributes in zarr.json, registry
  pointers and objects, staged classes), the Prefect logs, artifacts, flow and task runs read back through the API,
  Ray's own logs, nor an error message.
- Registry and store paths cannot leave their root: ``../`` / absolute entry ids, and symbolic links planted inside
  a registry or a feature store.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
import torch

from conftest import CANARY_KEY_ID, CANARY_SECRET
from phpn_core.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DATASET = {"n_classes": 3, "train_per_class": 6, "test_per_class": 3, "image_size": 64}
NEEDLES = [CANARY_SECRET, CANARY_KEY_ID, quote(CANARY_SECRET, safe=""), CANARY_SECRET.replace("/", "\\/")]


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _cfg(**over):
    base = {"name": "sec", "dataset": DATASET, "model": {"train_epochs": 1}, "decompose": {"k": 2},
            "compute": {"classes_per_task": 2}, "evaluate": {"enabled": False, "report": False}}
    for key, val in over.items():
        base[key] = {**base[key], **val} if isinstance(base.get(key), dict) and isinstance(val, dict) else val
    return load_config(None, **base)


def _leaks(text: str) -> list[str]:
    return [n for n in NEEDLES if n in text]


def test_malicious_checkpoint_is_refused_by_phpn_run_without_running_it(phpn_runtime, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    torch.save({"features.0.weight": torch.zeros(1), "x": _Evil(str(marker))}, evil)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"name: evil\nmodel: {{arch: resnet18, checkpoint: '{evil}', num_classes: 3}}\n"
                   f"dataset: {json.dumps(DATASET)}\nevaluate: {{enabled: false, report: false}}\n")
    r = CliRunner().invoke(app, ["run", str(cfg), "--out", str(tmp_path / "out")])
    out = " ".join(r.output.split())
    assert r.exit_code == 2, out
    assert "only state dicts are accepted" in out and "model.pt" in out
    assert not marker.exists(), "the pickle's code ran"
    assert not (tmp_path / "out" / "features").exists(), "refused before any compute"
    # The payload is live: an unpickling loader would have run it.
    pickle.loads(pickle.dumps(_Evil(str(marker))))
    assert marker.read_text() == "pwned"


def test_pickled_tensor_file_is_refused_without_running_it(tmp_path):
    """The linear head the shard tasks read by URI (registry/inputs/<entry>/linear.safetensors)."""
    from phpn_core.errors import StoreError
    from phpn_core.storage.tensorio import read_tensors, write_tensors

    marker = tmp_path / "pwned"
    uri = str(tmp_path / "linear.safetensors")
    write_tensors(uri, {"weight": torch.ones(2, 3), "bias": torch.zeros(2)})
    for blob in (pickle.dumps({"weight": _Evil(str(marker))}), _torch_pickle(tmp_path, marker)):
        Path(uri).write_bytes(blob)
        with pytest.raises(StoreError, match=r"not a phpn tensor file.*Nothing in it was run"):
            read_tensors(uri)
    assert not marker.exists()


def _torch_pickle(tmp_path: Path, marker: Path) -> bytes:
    p = tmp_path / "evil.pt"
    torch.save({"weight": _Evil(str(marker))}, p)
    return p.read_bytes()


# ------------------------------------------------------------------------------------------------------------------


def _prefect_records() -> tuple[str, int]:
    """Every log, artifact, flow run and task run the Prefect API holds, as one JSON text."""
    from prefect.client.orchestration import get_client

    async def every(read_page):
        out, offset = [], 0
        while True:
            page = await read_page(limit=200, offset=offset)  # the API's page size limit
            out.extend(page)
            if len(page) < 200:
                return out
            offset += len(page)

    async def read():
        async with get_client() as client:
            return (await every(client.read_logs), await every(client.read_artifacts),
                    await every(client.read_flow_runs), await every(client.read_task_runs))

    logs, arts, flows, tasks = asyncio.run(read())
    assert logs and arts and flows and tasks, "the run must have reported to the Prefect API"
    return "\n".join(x.model_dump_json() for group in (logs, arts, flows, tasks) for x in group), len(logs)


def test_credentials_never_reach_any_output(phpn_runtime, s3_server, s3_bucket, tmp_path):
    import boto3
    import ray
    import yaml

    assert os.environ["AWS_SECRET_ACCESS_KEY"] == CANARY_SECRET  # the session's runs all use the canary
    cfg = _cfg(name="secret-run", storage={"features_uri": f"{s3_bucket}/features",
                                           "registry_uri": f"{s3_bucket}/registry"},
               evaluate={"enabled": False, "report": True})
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = tmp_path / "out"
    env = {**os.environ, "PREFECT_API_URL": phpn_runtime.api_url, "PREFECT_LOGGING_TO_API_ENABLED": "true",
           "PREFECT_LOGGING_LEVEL": "DEBUG", "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    env.pop("PHPN_FAULT_DIR", None)
    cmd = [str(ROOT / ".venv" / "bin" / "phpn"), "run", str(cfg_file), "--out", str(out)]
    if not Path(cmd[0]).exists():
        cmd = [sys.executable, "-m", "flows.cli", "run", str(cfg_file), "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    checked = {}
    checked["phpn run stdout/stderr"] = done.stdout + done.stderr

    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"metrics.json", "report.html"} <= {p.name for p in files}
    for p in files:
        checked[f"file {p.relative_to(out)}"] = p.read_bytes().decode("latin-1")

    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket[5:])
            for o in page.get("Contents", [])]
    assert any(k.endswith("zarr.json") for k in keys) and any("/entries/" in k for k in keys)
    assert any("/staging/" in k for k in keys) and any("/objects/" in k for k in keys)
    for k in keys:
        checked[f"s3 object {k}"] = s3.get_object(Bucket=s3_bucket[5:], Key=k)["Body"].read().decode("latin-1")

    prefect_text, n_logs = _prefect_records()
    checked["Prefect logs, artifacts, flow and task runs"] = prefect_text
    assert "secret-run" in prefect_text and n_logs > 5

    ray_logs = Path(os.environ["RAY_TMPDIR"])  # the session cluster's temp dir: its logs, runtime_env agent's too
    for p in ray_logs.rglob("*"):
        if p.is_file() and not p.is_symlink() and p.suffix in (".log", ".out", ".err", ".txt", ".json", ""):
            try:
                checked[f"ray {p.relative_to(ray_logs)}"] = p.read_bytes().decode("latin-1")
            except OSError:
                pass

    # An error message on the same path: a bucket that does not exist.
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**cfg.model_dump(mode="json"),
                                   "storage": {"registry_uri": "s3://no-such-bucket-phpn/reg"}}))
    err = subprocess.run(cmd[:2] + [str(bad), "--out", str(tmp_path / "bad")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert err.returncode == 2 and "no-such-bucket-phpn" in err.stderr, err.stderr[-2000:]
    checked["error message"] = err.stdout + err.stderr

    leaks = {where: found for where, text in checked.items() if (found := _leaks(text))}
    assert not leaks, f"credentials found in: {sorted(leaks)}"
    assert len(checked) > 20


# ------------------------------------------------------------------------------------------------------------------


def test_registry_paths_cannot_escape_the_root(tmp_path):
    from phpn_core.errors import InputValueError
    from phpn_core.storage.registry import PrototypeRegistry, RegistryError

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("untouched")
    root = tmp_path / "registry"
    reg = PrototypeRegistry(root)
    eid = PrototypeRegistry.entry_id("m", "d", 2, "0123456789abcdef")
    t = {"prototypes": torch.rand(1, 2, 4), "initial": torch.rand(1, 2, 4), "alpha": torch.ones(1, 2),
         "residual": torch.zeros(1, 2, 4), "rel_error": torch.zeros(1), "head_error": torch.zeros(1)}
    for bad in ("../" + eid, "/etc/passwd", "a/../../b"):
        with pytest.raises(InputValueError):
            reg.write_classes(bad, [0], t)
    # A link planted where the staged classes go.
    (root / "staging").mkdir(parents=True)
    os.symlink(outside, root / "staging" / eid)
    with pytest.raises(RegistryError, match=r"outside the registry root"):
        reg.write_classes(eid, [0], t)
    os.unlink(root / "staging" / eid)
    reg.write_classes(eid, [0], t)
    # A link planted where pointers go: publishing, listing and reading all refuse it.
    os.symlink(outside, root / "entries")
    with pytest.raises(RegistryError, match=r"resolves to .*outside"):
        reg.publish(eid, n_classes=1, bias=None)
    with pytest.raises(RegistryError, match=r"outside the registry root"):
        reg.entries()
    # A link to a single file outside (a pointer someone replaced).
    os.unlink(root / "entries")
    info = reg.publish(eid, n_classes=1, bias=None)
    pointer = root / "entries" / f"{eid}.json"
    (outside / "p.json").write_text(pointer.read_text())
    pointer.unlink()
    os.symlink(outside / "p.json", pointer)
    with pytest.raises(RegistryError, match=r"outside the registry root"):
        reg.load(eid)
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt", "p.json"]
    assert (outside / "keep.txt").read_text() == "untouched"
    # A registry whose root is itself a link (to a larger disk) is fine.
    os.unlink(pointer)
    os.symlink(root, tmp_path / "alias")
    assert PrototypeRegistry(tmp_path / "alias").staged_classes(eid) == {0}
    assert info.entry_id == eid


def test_feature_store_with_an_escaping_link_is_refused_before_compute(tmp_path):
    from phpn_core.errors import StoreError
    from tasks.prepare import check_inputs

    outside = tmp_path / "outside"
    outside.mkdir()
    store = tmp_path / "run" / "features" / "train.zarr"
    store.mkdir(parents=True)
    os.symlink(outside, store / "features")
    with pytest.raises(StoreError, match=r"'train.zarr/features' under .* is a symbolic link to .*outside"):
        check_inputs(_cfg(), str(tmp_path / "run"))
    with pytest.raises(StoreError, match=r"symbolic link"):
        check_inputs(_cfg(storage={"features_uri": str(tmp_path / "run" / "features")}))
    os.unlink(store / "features")
    os.symlink(tmp_path / "run" / "features", tmp_path / "features-alias")  # a root that is a link is fine
    check_inputs(_cfg(storage={"features_uri": str(tmp_path / "features-alias")}))
