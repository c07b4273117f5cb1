"""torchvision weights by name: loaded from $TORCH_HOME/hub/checkpoints/<file name of weights.url>, class count and
names from weights.meta, a digest of the cached file, and offline errors that say which file to put where.

Nothing is downloaded: each test plants a file it made (a tiny-random model's state dict under the exact file
name) in a temporary TORCH_HOME, and downloads are switched off (PHPN_OFFLINE=1 / download=False).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
from pydantic import ValidationError

from phpn_core.config import ModelConfig
from phpn_core.models.spec import (
    CheckpointError,
    ModelSpec,
    build_model,
    class_names_for,
    model_fingerprint,
    spec_digest,
    weights_file,
)

torch.set_num_threads(2)


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("PHPN_OFFLINE", "1")
    return tmp_path / "torch"


@pytest.fixture(scope="module")
def mobilenet_1000() -> torch.nn.Module:
    torch.manual_seed(0)
    return tvm.mobilenet_v2(weights=None, num_classes=1000).eval()


def _plant(torch_home: Path, file_name: str, state: dict) -> Path:
    path = torch_home / "hub" / "checkpoints" / file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def test_weights_by_name_load_from_the_torch_hub_cache(torch_home, mobilenet_1000) -> None:
    path = _plant(torch_home, "mobilenet_v2-b0353104.pth", mobilenet_1000.state_dict())
    spec = ModelSpec(arch="mobilenet_v2", weights="IMAGENET1K_V1")
    assert spec.num_classes == 1000  # from weights.meta["categories"]
    assert weights_file(spec) == path
    built = build_model(spec)
    assert not built.training
    own, ref = built.state_dict(), mobilenet_1000.state_dict()
    assert all(torch.equal(own[k], ref[k]) for k in ref)
    names = class_names_for(spec)
    assert len(names) == 1000 and names == list(tvm.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])
    assert "tabby" in names and class_names_for(ModelSpec(arch="mobilenet_v2", num_classes=3)) is None
    # DEFAULT resolves to the enum's default member (IMAGENET1K_V2 here: another file); the digest is the file's
    default = weights_file(ModelSpec(arch="mobilenet_v2", weights="DEFAULT"))
    assert default.parent == path.parent and default.name == Path(tvm.MobileNet_V2_Weights.DEFAULT.url).name
    assert spec_digest(spec) == hashlib.sha256(path.read_bytes()).hexdigest()
    fp = model_fingerprint(spec)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in ref.items()}, path)  # other weights, same name
    assert model_fingerprint(spec) != fp


def test_missing_cached_file_says_which_file_to_put_where(torch_home) -> None:
    spec = ModelSpec(arch="convnext_tiny", weights="IMAGENET1K_V1")
    expected = torch_home / "hub" / "checkpoints" / "convnext_tiny-983f1562.pth"
    for call in (lambda: build_model(spec), lambda: build_model(spec, download=False), lambda: spec_digest(spec)):
        with pytest.raises(CheckpointError) as info:
            call()
        msg = str(info.value)
        assert str(expected) in msg and "convnext_tiny-983f1562.pth" in msg
        assert "https://download.pytorch.org/models/convnext_tiny-983f1562.pth" in msg and "Fix:" in msg
    assert not expected.exists()


def test_densenet_legacy_key_names_are_renamed(torch_home) -> None:
    torch.manual_seed(0)
    model = tvm.densenet121(weights=None, num_classes=1000).eval()
    # torchvision's DenseNet files use the old names 'norm.1.weight' (its loader renames them; so does phpn's)
    legacy = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in model.state_dict().items()
              if not k.endswith("num_batches_tracked")}  # as in the real (old) files
    assert legacy.keys() != model.state_dict().keys()
    _plant(torch_home, Path(tvm.DenseNet121_Weights.IMAGENET1K_V1.url).name, legacy)
    built = build_model(ModelSpec(arch="densenet121", weights="IMAGENET1K_V1"))
    assert all(torch.equal(built.state_dict()[k], v) for k, v in model.state_dict().items())


def test_weights_spec_errors(torch_home) -> None:
    with pytest.raises(ValidationError, match="num_classes=5 does not match.*1000 categories"):
        ModelSpec(arch="resnet18", weights="IMAGENET1K_V1", num_classes=5)
    assert ModelSpec(arch="resnet18", weights="IMAGENET1K_V1", num_classes=1000).num_classes == 1000
    with pytest.raises(ValidationError, match="unknown weights 'IMAGENET1K_V9'.*IMAGENET1K_V1"):
        ModelSpec(arch="resnet18", weights="IMAGENET1K_V9")
    with pytest.raises(ValidationError, match="GAP VGG's head is new"):
        ModelSpec(arch="vgg16_gap", weights="IMAGENET1K_V1")
    with pytest.raises(ValidationError, match="torchvision architectures"):
        ModelSpec(arch="synthparts_cnn", weights="IMAGENET1K_V1")
    with pytest.raises(ValidationError, match="expected one source of weights"):
        ModelSpec(arch="resnet18", weights="IMAGENET1K_V1", checkpoint="r.pt")
    with pytest.raises(ValidationError, match="num_classes"):
        ModelSpec(arch="resnet18")  # neither num_classes nor weights


def test_model_config_accepts_checkpoint_or_weights(tmp_path) -> None:
    cfg = ModelConfig(arch="swin_t", weights="IMAGENET1K_V1")
    assert cfg.weights == "IMAGENET1K_V1" and cfg.checkpoint is None
    (tmp_path / "m.safetensors").write_bytes(b"x")
    assert ModelConfig(arch="timm:resnet50", checkpoint=str(tmp_path / "m.safetensors")).arch == "timm:resnet50"
    with pytest.raises(ValidationError, match="model.checkpoint or model.weights is required"):
        ModelConfig(arch="convnext_tiny")
    with pytest.raises(ValidationError, match="torchvision architectures only"):
        ModelConfig(arch="timm:resnet50", weights="IMAGENET1K_V1")
    with pytest.raises(ValidationError, match="both set"):
        ModelConfig(arch="resnet18", weights="IMAGENET1K_V1", checkpoint=str(tmp_path / "m.safetensors"))


def test_the_run_tasks_use_weights_by_name(torch_home, mobilenet_1000, tmp_path) -> None:
    """prepare_model / load_classifier / run_class_names / check_inputs take model.weights: the cached file's
    weights (not random ones), C = 1000 from the weights, its digest, and the ImageNet names."""
    from PIL import Image

    from phpn_core.config import load_config
    from tasks.inputs import load_classifier
    from tasks.prepare import check_inputs, prepare_model, run_class_names

    path = _plant(torch_home, "mobilenet_v2-b0353104.pth", mobilenet_1000.state_dict())
    root = tmp_path / "photos"
    for split in ("train", "test"):
        for folder in ("cats", "cups"):
            (root / split / folder).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 40), (40 * i, 90, 200)).save(root / split / folder / f"{i}.png")
    cmap = tmp_path / "map.json"
    cmap.write_text('{"cats": 281, "cups": 967}')
    cfg = load_config(None, model={"arch": "mobilenet_v2", "weights": "IMAGENET1K_V1"},
                      dataset={"kind": "imagefolder", "root": str(root), "image_size": 32, "class_map": str(cmap)},
                      decompose={"k": 2}, compute={"device": "cpu"})
    rec = prepare_model.fn(cfg, str(tmp_path / "out"))
    assert rec["num_classes"] == 1000 and rec["weights"] == "IMAGENET1K_V1" and rec["checkpoint"] is None
    assert rec["digest"] == spec_digest(ModelSpec(arch="mobilenet_v2", weights="IMAGENET1K_V1"))
    assert rec["digest"] != "none" and hashlib.sha256(path.read_bytes()).hexdigest().startswith(
        rec["digest"].split(":")[-1][:12])
    model, _, W, _ = load_classifier(rec)
    assert torch.equal(W, mobilenet_1000.classifier[-1].weight)  # the planted weights, not a random init
    names = run_class_names(cfg, rec)
    assert len(names) == 1000 and names[281] == "tabby" and names[967] == "espresso"
    checked = check_inputs(cfg, str(tmp_path / "out"))
    assert checked["n_classes"] == 1000 and checked["decomposed_classes"] == [281, 967]
