"""ModelSpec / build_model: strict state-dict loading, refusal of pickled objects, clear errors, stable digests."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch
import torchvision.models as tvm
from pydantic import ValidationError

from phpn_core.errors import ConfigError
from phpn_core.models.synthparts_cnn import SynthPartsCNN, save_model
from phpn_core.models.spec import CheckpointError, ModelSpec, build_model, checkpoint_digest, model_fingerprint

torch.set_num_threads(2)


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def resnet18_5(tmp_path_factory):
    """A resnet18 with 5 classes and its state dict saved as .pt."""
    torch.manual_seed(0)
    model = tvm.resnet18(weights=None, num_classes=5)
    path = tmp_path_factory.mktemp("ckpt") / "resnet18.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_builds_resnet18_from_a_state_dict(resnet18_5, tmp_path):
    model, path = resnet18_5
    built = build_model(ModelSpec(arch="resnet18", checkpoint=str(path), num_classes=5))
    assert isinstance(built, tvm.ResNet) and not built.training and built.fc.out_features == 5
    assert same_state(built, model)
    # The same weights as safetensors, and wrapped the way training loops save them.
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "r.safetensors")
    assert same_state(build_model(ModelSpec(arch="resnet18", checkpoint=tmp_path / "r.safetensors", num_classes=5)),
                      model)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    assert same_state(build_model(ModelSpec(arch="resnet18", checkpoint=str(tmp_path / "wrapped.pth"),
                                            num_classes=5)), model)


def test_checkpoint_of_another_architecture_lists_keys(tmp_path):
    torch.save(tvm.densenet121(weights=None, num_classes=5).state_dict(), tmp_path / "densenet.pt")
    with pytest.raises(CheckpointError) as e:
        build_model(ModelSpec(arch="resnet18", checkpoint=str(tmp_path / "densenet.pt"), num_classes=5))
    msg = str(e.value)
    assert "missing keys" in msg and "unexpected keys" in msg and "another architecture" in msg
    assert "conv1.weight" in msg and "features.conv0.weight" in msg and "more)" in msg  # first 10 only
    assert str(tmp_path / "densenet.pt") in msg and isinstance(e.value, ConfigError)


def test_wrong_number_of_classes_is_named(resnet18_5):
    _, path = resnet18_5
    with pytest.raises(CheckpointError, match=r"fc.weight: checkpoint \[5, 512\] vs model \[7, 512\].*num_classes=5"):
        build_model(ModelSpec(arch="resnet18", checkpoint=str(path), num_classes=7))


class Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def test_pickled_objects_are_refused_without_running_them(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"fc.weight": torch.zeros(2, 2), "evil": Payload(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="only state dicts are accepted") as e:
        build_model(ModelSpec(arch="resnet18", checkpoint=str(tmp_path / "evil.pt"), num_classes=5))
    assert "state_dict()" in str(e.value)
    assert not marker.exists()
    # The payload is real: an unsafe load would have run it.
    probe = tmp_path / "probe"
    torch.save(Payload(str(probe)), tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe.read_text() == "pwned"
    # A whole model saved with torch.save(model) is refused the same way.
    torch.save(SynthPartsCNN(3, width=8), tmp_path / "whole.pt")
    with pytest.raises(CheckpointError, match="only state dicts are accepted"):
        build_model(ModelSpec(arch="synthparts_cnn", checkpoint=str(tmp_path / "whole.pt"), num_classes=3))


def test_missing_or_unreadable_checkpoint(tmp_path):
    missing = tmp_path / "nope" / "model.pt"
    with pytest.raises(CheckpointError, match="not found") as e:
        build_model(ModelSpec(arch="resnet18", checkpoint=str(missing), num_classes=5))
    assert str(missing) in str(e.value)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pt"):
        build_model(ModelSpec(arch="resnet18", checkpoint=str(tmp_path / "junk.pt"), num_classes=5))
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        build_model(ModelSpec(arch="resnet18", checkpoint=str(tmp_path / "list.pt"), num_classes=5))


def test_spec_validation():
    with pytest.raises(ValidationError, match="unknown architecture 'resnet19'"):
        ModelSpec(arch="resnet19", num_classes=5)
    with pytest.raises(ValidationError, match="vgg16_gap"):
        ModelSpec(arch="vgg16", num_classes=5)  # torchvision VGG is not GAP + linear
    with pytest.raises(ValidationError, match="extra"):
        ModelSpec(arch="resnet18", num_classes=5, pretrained=True)
    with pytest.raises(ValidationError, match="unknown weights 'x' for resnet18.*IMAGENET1K_V1"):
        ModelSpec(arch="resnet18", num_classes=5, weights="x")
    with pytest.raises(ValidationError, match="unsupported file type"):
        ModelSpec(arch="resnet18", num_classes=5, checkpoint="model.ckpt")
    with pytest.raises(ValidationError, match="local file path"):
        ModelSpec(arch="resnet18", num_classes=5, checkpoint="s3://bucket/model.pt")
    with pytest.raises(ValidationError):
        ModelSpec(arch="resnet18", num_classes=0)
    spec = ModelSpec(arch="resnet18", num_classes=5)
    with pytest.raises(ValidationError):
        spec.num_classes = 6  # frozen
    assert spec.input_size == 224 and spec.checkpoint is None


def test_digests_are_stable_and_content_based(resnet18_5, tmp_path):
    _, path = resnet18_5
    d = checkpoint_digest(path)
    assert d == checkpoint_digest(str(path)) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert checkpoint_digest(None) == "none"
    copy = tmp_path / "elsewhere.pt"
    shutil.copy(path, copy)
    spec = ModelSpec(arch="resnet18", checkpoint=str(path), num_classes=5)
    moved = ModelSpec(arch="resnet18", checkpoint=str(copy), num_classes=5)
    assert model_fingerprint(spec) == model_fingerprint(moved) and len(model_fingerprint(spec)) == 16
    with open(copy, "ab") as f:
        f.write(b"\0")
    assert checkpoint_digest(copy) != d and model_fingerprint(moved) != model_fingerprint(spec)
    assert model_fingerprint(spec.model_copy(update={"input_size": 112})) != model_fingerprint(spec)
    with pytest.raises(CheckpointError, match="missing.pt"):
        checkpoint_digest(tmp_path / "missing.pt")


def test_synthparts_cnn_round_trip(tmp_path):
    torch.manual_seed(1)
    model = SynthPartsCNN(4, width=16).eval()
    save_model(model, tmp_path / "cnn.safetensors")
    built = build_model(ModelSpec(arch="synthparts_cnn", checkpoint=str(tmp_path / "cnn.safetensors"),
                                  num_classes=4, input_size=112))
    assert isinstance(built, SynthPartsCNN) and built.width == 16 and not built.training
    assert same_state(built, model)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(built(x), model(x))
    with pytest.raises(CheckpointError, match="num_classes=4"):
        build_model(ModelSpec(arch="synthparts_cnn", checkpoint=str(tmp_path / "cnn.safetensors"), num_classes=5))
    # A plain state dict of it works too (width read off the head).
    torch.save(model.state_dict(), tmp_path / "cnn.pt")
    assert same_state(build_model(ModelSpec(arch="synthparts_cnn", checkpoint=str(tmp_path / "cnn.pt"),
                                            num_classes=4)), model)
