"""Issue 14 end to end (`phpn run` under the real Prefect test server and local Ray):

- the contract: a 1000-class ImageNet-shaped model (random-weight MobileNetV2 saved as a checkpoint,
  num_classes: 1000) on an ImageFolder of 5 folders mapped to head rows, no decompose.classes: exactly those 5 rows
  are decomposed, accuracy and logits are the original's, and the report, registry entry, metrics and `phpn explain`
  name the classes;
- Fashion-MNIST for real (Debian's dataset-fashion-mnist): a small CNN trained here on a sample, then `phpn run`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.slow

FMNIST = Path("/usr/share/datasets/fashion-mnist")
ROOT = Path(__file__).resolve().parents[2]
# Folder name -> ImageNet row (the real indices of these classes).
CLASS_MAP = {"goldfish": 1, "tabby": 281, "espresso": 967, "pizza": 963, "volcano": 980}


def _photos(root: Path, n: int, size: int = 48) -> None:
    g = torch.Generator().manual_seed(len(str(root)))
    for j, name in enumerate(CLASS_MAP):
        (root / name).mkdir(parents=True)
        for i in range(n):
            base = torch.rand(3, 1, 1, generator=g) * 0.5 + 0.25 * (j % 3)
            arr = ((base + 0.3 * torch.rand(3, size, size, generator=g)).clamp(0, 1) * 255).byte()
            Image.fromarray(arr.permute(1, 2, 0).numpy()).save(root / name / f"{i:02d}.jpg")


def _cli_run(runtime, cfg_file: Path, out: Path) -> dict:
    """`phpn run CONFIG --out OUT` as a user types it, in its own process, on the session's Prefect server and Ray
    (an in-process typer runner would leave Prefect's log handler on a closed stream for later CLI runs)."""
    import os
    import subprocess
    import sys

    import ray

    env = {**os.environ, "PREFECT_API_URL": runtime.api_url, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [str(ROOT / ".venv" / "bin" / "phpn"), "run", str(cfg_file), "--out", str(out)]
    if not Path(cmd[0]).exists():
        cmd = [sys.executable, "-m", "flows.cli", "run", str(cfg_file), "--out", str(out)]
    r = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    table = " ".join(r.stdout.split())
    assert "decomposed_classes" in table and m["decomposed_class_names"][0] in table  # the CLI table names them
    return m


def test_imagenet_head_on_five_mapped_folders(phpn_runtime, tmp_path):
    import torchvision

    from phpn_core.report.explain import explain_image_file, load_entry_model
    from phpn_core.storage.registry import PrototypeRegistry

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=1000).eval()
    ckpt = tmp_path / "mobilenet_v2.pth"
    torch.save(model.state_dict(), ckpt)
    data = tmp_path / "photos"
    _photos(data / "train", 3)
    _photos(data / "test", 2)
    cmap = tmp_path / "class_map.json"
    cmap.write_text(json.dumps(CLASS_MAP))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"name: subset\nmodel: {{arch: mobilenet_v2, checkpoint: '{ckpt}', num_classes: 1000}}\n"
        f"dataset: {{kind: imagefolder, root: '{data}', image_size: 64, class_map: '{cmap}', max_per_class: 2}}\n"
        "decompose: {k: 2}\ncompute: {classes_per_task: 3, batch_size: 16}\n"
        "evaluate: {enabled: false, report: true}\n")
    out = tmp_path / "run"
    m = _cli_run(phpn_runtime, cfg, out)
    rows = sorted(CLASS_MAP.values())
    assert m["decomposed_classes"] == rows and m["n_classes"] == 1000 and m["classes_computed"] == 5
    assert m["decomposed_class_names"] == [n for r in rows for n, v in CLASS_MAP.items() if v == r]
    assert m["accuracy_decomposed"] == m["accuracy_original"] and m["max_abs_logit_diff"] <= 1e-4
    assert m["n_test_images"] == 10
    for key in ("accuracy_original", "max_head_reconstruction_error", "consistency", "stability", "k", "seconds"):
        assert key in m
    html = (out / "report.html").read_text()
    assert all(name in html for name in CLASS_MAP)
    info = PrototypeRegistry(str(out / "registry")).info(m["entry_id"])
    assert info.metadata["decomposed_classes"] == rows and info.n_classes == 1000
    assert [info.metadata["class_names"][r] for r in rows] == [m_ for m_ in m["decomposed_class_names"]]
    # max_per_class: 2 of the 3 training images per class reached the store.
    from phpn_core.storage.feature_store import FeatureStore

    store = FeatureStore.open(str(out / "features" / "train.zarr"))
    assert store.classes == rows and all(int(store.class_counts[r]) == 2 for r in rows)
    # phpn explain: the entry's model, with the folders' names on the mapped rows.
    entry = load_entry_model(str(out / "registry"), m["entry_id"])
    assert [entry.class_names[r] for r in rows] == m["decomposed_class_names"]
    png = explain_image_file(data / "test" / "tabby" / "00.jpg", registry_uri=str(out / "registry"),
                             entry_id=m["entry_id"], out=tmp_path / "tabby.png")
    assert png.stat().st_size > 0


@pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian package dataset-fashion-mnist not installed (make test installs it as root)")
def test_fashion_mnist_small_cnn_really_run(phpn_runtime, tmp_path):
    from phpn_core.config import load_config
    from phpn_core.data.factory import build_dataset
    from phpn_core.models.synthparts_cnn import save_model, train_synthparts_cnn

    data_cfg = {"kind": "fashion_mnist", "image_size": 28, "max_per_class": 50, "seed": 0}
    train = build_dataset(load_config(None, dataset=data_cfg).dataset, "train")
    assert len(train) == 500
    model = train_synthparts_cnn(train, epochs=6, width=32, seed=0, device="cpu")
    ckpt = tmp_path / "fmnist_cnn.safetensors"
    save_model(model, ckpt)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"name: fmnist\nmodel: {{arch: synthparts_cnn, checkpoint: '{ckpt}', num_classes: 10}}\n"
                   f"dataset: {json.dumps(data_cfg)}\ndecompose: {{k: 3}}\n"
                   "compute: {classes_per_task: 5, batch_size: 256}\nevaluate: {enabled: false, report: true}\n")
    out = tmp_path / "run"
    m = _cli_run(phpn_runtime, cfg, out)
    assert m["decomposed_classes"] == list(range(10)) and m["n_test_images"] == 10000
    assert m["accuracy_decomposed"] == m["accuracy_original"] and m["max_abs_logit_diff"] <= 1e-4
    assert m["accuracy_original"] > 0.5, "a CNN trained on 500 images should beat chance (10%) by far"
    html = (out / "report.html").read_text()
    assert "T-shirt/top" in html and "Ankle boot" in html
