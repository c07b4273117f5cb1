"""ProtoPNet (phpn_core.protopnet): the network's formulas, the loss, the push, training and the shared ProtoEval path.

A tiny SynthParts problem (3 classes, 64 px) and a briefly trained small synthparts CNN as the trunk; every
training here takes seconds.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

from phpn_core.data.base import normalize
from phpn_core.data.synthparts import SynthParts
from phpn_core.errors import ConfigError, InputValueError, ShapeError
from phpn_core.evaluation import protoeval_maps
from phpn_core.models.split import split_classifier
from phpn_core.models.synthparts_cnn import train_synthparts_cnn
from phpn_core.protopnet import (
    ProtoPNet,
    ProtoPNetConfig,
    own_class_maps,
    protopnet_accuracy,
    protopnet_loss,
    protopnet_protoeval,
    push_prototypes,
    train_protopnet,
)

TINY = ProtoPNetConfig(prototypes_per_class=2, prototype_dim=32, warm_epochs=5, joint_epochs=20,
                       joint_lr_step_size=10, last_layer_epochs=30, batch_size=16)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # shared cores: OpenMP spin-waiting makes 2 threads slower (see test_synthparts_cnn)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def data():
    train = SynthParts(split="train", n_classes=3, n_per_class=30, image_size=64, seed=5)
    test = SynthParts(split="test", n_classes=3, n_per_class=10, image_size=64, seed=5)
    cnn = train_synthparts_cnn(train, epochs=15, batch_size=16, width=32, stride=8, seed=0, progress=False)
    features, _, _ = split_classifier(cnn.eval())
    return {"train": train, "test": test, "cnn": cnn, "features": features}


@pytest.fixture(scope="module")
def trained(data):
    before = {k: v.clone() for k, v in data["cnn"].state_dict().items()}
    flags = [p.requires_grad for p in data["cnn"].parameters()]
    res = train_protopnet(data["features"], data["train"], num_classes=3, config=TINY, seed=0, progress=False,
                          device="cpu")
    return {"res": res, "before": before, "flags": flags}


def _x(ds, idx):
    return normalize(torch.stack([ds[i]["image"] for i in idx]), ds.mean, ds.std)


# ============================================================================================ the network

def test_last_layer_init_and_class_identity():
    torch.manual_seed(0)
    m = ProtoPNet(nn.Conv2d(3, 8, 3), num_classes=4, in_channels=8, prototypes_per_class=3, prototype_dim=5)
    assert m.prototypes.shape == (12, 5, 1, 1) and m.prototype_shape == (12, 5, 1, 1)
    assert m.last_layer.bias is None and m.last_layer.weight.shape == (4, 12)
    assert m.prototype_classes.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert torch.equal(m.prototype_class_identity, nn.functional.one_hot(m.prototype_classes, 4).float())
    W = m.last_layer.weight.detach()
    for c in range(4):
        for j in range(12):
            assert float(W[c, j]) == (1.0 if j // 3 == c else -0.5)
    assert m.prototypes_of_class(2).tolist() == [6, 7, 8]
    assert float(m.prototypes.detach().min()) >= 0 and float(m.prototypes.detach().max()) < 1  # torch.rand
    add_on = [type(x) for x in m.add_on_layers]
    assert add_on == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.Sigmoid]


def test_distances_similarity_and_forward_formulas():
    torch.manual_seed(1)
    trunk = nn.Conv2d(3, 6, 3, padding=1)  # a signed trunk
    m = ProtoPNet(trunk, num_classes=2, in_channels=6, prototypes_per_class=2, prototype_dim=4).eval()
    x = torch.randn(3, 3, 5, 5)
    with torch.no_grad():
        z = m.conv_features(x)  # [3, 4, 5, 5]
        d = m.distances(x)
        logits, min_d = m.forward_with_distances(x)
        sims = m.similarity_maps(x)
    assert z.shape == (3, 4, 5, 5) and d.shape == (3, 4, 5, 5) and float(z.min()) >= 0 and float(z.max()) <= 1
    p = m.prototypes.detach()[:, :, 0, 0]  # [P, d]
    brute = ((z.permute(0, 2, 3, 1)[:, :, :, None, :] - p) ** 2).sum(-1).permute(0, 3, 1, 2)
    torch.testing.assert_close(d, brute, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(min_d, brute.flatten(2).amin(2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sims, torch.log((d + 1) / (d + 1e-4)))
    sim = torch.log((min_d + 1) / (min_d + 1e-4))
    torch.testing.assert_close(logits, sim @ m.last_layer.weight.t())
    assert torch.equal(m(x), logits)
    # the similarity is decreasing in the distance, log(1 / 1e-4) at 0
    s = m.distance_to_similarity(torch.tensor([0.0, 0.5, 2.0]))
    assert s[0] == pytest.approx(math.log(1e4)) and bool((s[1:] < s[:-1]).all())
    maps = own_class_maps(m, x, 1)
    torch.testing.assert_close(maps, sims[:, 2:4])


def test_loss_terms_and_signs():
    torch.manual_seed(2)
    m = ProtoPNet(nn.Identity(), num_classes=2, in_channels=3, prototypes_per_class=2, prototype_dim=8)
    min_d = torch.tensor([[1.0, 3.0, 0.5, 4.0], [2.0, 0.2, 6.0, 7.0]])  # [B=2, P=4]; protos 0, 1 -> class 0
    labels = torch.tensor([0, 1])
    logits = torch.randn(2, 2)
    cfg = ProtoPNetConfig()
    t = protopnet_loss(logits, min_d, labels, m, cfg)
    assert float(t.cluster) == pytest.approx((1.0 + 6.0) / 2)  # nearest own-class prototype
    assert float(t.separation) == pytest.approx((0.5 + 0.2) / 2)  # nearest other-class prototype
    assert float(t.l1.detach()) == pytest.approx(0.5 * 4)  # the -0.5 weights to the wrong class, 4 of them
    ce = nn.functional.cross_entropy(logits, labels)
    expected = ce + 0.8 * t.cluster - 0.08 * t.separation + 1e-4 * t.l1
    assert float(t.total.detach()) == pytest.approx(float(expected.detach()))
    # signs: a prototype nearer its own class lowers the loss; an other-class prototype farther away lowers it too
    closer = min_d.clone()
    closer[0, 0] = 0.1
    farther = min_d.clone()
    farther[0, 2] = 3.0
    assert float(protopnet_loss(logits, closer, labels, m, cfg).total.detach()) < float(t.total.detach())
    assert float(protopnet_loss(logits, farther, labels, m, cfg).total.detach()) < float(t.total.detach())


# ============================================================================================ training

def test_training_beats_chance_and_leaves_the_trunk_alone(data, trained):
    res = trained["res"]
    acc = protopnet_accuracy(res.model, data["test"])
    assert acc >= 0.8, f"ProtoPNet test accuracy {acc:.3f} (chance 0.33); history {res.history['joint'][-1]}"
    # the caller's trunk (shared by split_classifier's features) is unchanged, parameters, buffers and flags
    after = data["cnn"].state_dict()
    assert all(torch.equal(after[k], v) for k, v in trained["before"].items())
    assert [p.requires_grad for p in data["cnn"].parameters()] == trained["flags"]
    assert not data["features"].training
    assert set(res.history) == {"warm", "joint", "last_layer"}
    assert [len(res.history[k]) for k in ("warm", "joint", "last_layer")] == [5, 20, 30]
    assert not res.model.training and res.model.features is not data["features"]
    assert res.seconds > 0 and set(res.phase_seconds) == {"warm", "joint", "push", "last_layer"}
    # joint lr decays by StepLR(10, 0.1); the trunk's group starts at 1e-4
    assert res.history["joint"][0]["lr"] == pytest.approx([1e-4, 3e-3, 3e-3])
    assert res.history["joint"][10]["lr"] == pytest.approx([1e-5, 3e-4, 3e-4])
    assert res.history["warm"][0]["lr"] == pytest.approx([3e-3, 3e-3])


def test_pushed_prototypes_are_own_class_training_patches(data, trained):
    model, rec, train = trained["res"].model, trained["res"].push, data["train"]
    P = model.num_prototypes
    assert rec.image_index.shape == (P,) and rec.cell.shape == (P, 2) and rec.distance.shape == (P,)
    with torch.no_grad():
        for j in range(P):
            i = int(rec.image_index[j])
            assert train.labels[i] == int(model.prototype_classes[j]) == int(rec.prototype_classes[j])
            z = model.conv_features(_x(train, [i]))[0]  # [d, h, w] of the returned model
            y, x = rec.cell[j].tolist()
            torch.testing.assert_close(model.prototypes[j, :, 0, 0], z[:, y, x], atol=1e-6, rtol=0)


def test_push_finds_the_nearest_own_class_patch(data, trained):
    train = data["train"]
    model = copy.deepcopy(trained["res"].model)
    with torch.no_grad():
        model.prototypes.copy_(torch.rand(model.prototypes.shape, generator=torch.Generator().manual_seed(3)))
    old = model.prototypes.detach()[:, :, 0, 0].clone()
    rec = push_prototypes(model, train, batch_size=7)  # batches that do not align with the classes
    labels = torch.tensor(train.labels)
    with torch.no_grad():
        z = model.conv_features(_x(train, range(len(train)))).permute(0, 2, 3, 1)  # [N, h, w, d]
    for j in range(model.num_prototypes):
        own = z[labels == model.prototype_classes[j]]  # [n_c, h, w, d]
        dist = ((own - old[j]) ** 2).sum(-1)  # brute force, [n_c, h, w]
        assert float(rec.distance[j]) == pytest.approx(float(dist.min()), abs=1e-4)
        i, (y, x) = int(rec.image_index[j]), rec.cell[j].tolist()
        recorded = float(((z[i, y, x] - old[j]) ** 2).sum())
        assert recorded <= float(dist.min()) + 1e-4  # no other own-class patch is closer
        torch.testing.assert_close(model.prototypes[j, :, 0, 0], z[i, y, x], atol=1e-6, rtol=0)


def test_same_seed_same_prototypes(data):
    cfg = dataclasses.replace(TINY, warm_epochs=1, joint_epochs=1, last_layer_epochs=1)
    kw = dict(num_classes=3, config=cfg, progress=False)
    sub = torch.utils.data.Subset(data["train"], list(range(0, 90, 3)))
    sub.labels = [data["train"].labels[i] for i in range(0, 90, 3)]
    sub.mean, sub.std = data["train"].mean, data["train"].std
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    a = train_protopnet(data["features"], sub, seed=4, **kw)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is untouched
    b = train_protopnet(data["features"], sub, seed=4, **kw)
    c = train_protopnet(data["features"], sub, seed=5, **kw)
    assert torch.equal(a.model.prototypes, b.model.prototypes)
    assert torch.equal(a.model.last_layer.weight, b.model.last_layer.weight)
    assert torch.equal(a.push.image_index, b.push.image_index) and a.history == b.history
    assert not torch.equal(a.model.prototypes, c.model.prototypes)


def test_signed_trunk_trains(data):
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 8, 8, stride=8), nn.Tanh()).eval()  # signed maps, no out_channels attribute
    cfg = dataclasses.replace(TINY, warm_epochs=1, joint_epochs=1, last_layer_epochs=2)
    res = train_protopnet(trunk, data["train"], num_classes=3, config=cfg, progress=False)
    assert res.model.in_channels == 8 and res.push.feature_size == (8, 8)
    assert bool(torch.isfinite(res.model(_x(data["test"], [0, 1]))).all())


# ============================================================================================ evaluation

def test_protoeval_through_the_shared_loop(data, trained):
    model, test = trained["res"].model, data["test"]
    res = protopnet_protoeval(model, test, batch_size=8)
    assert res.consistent.shape == (3, 2) and res.stable_fraction.shape == (3, 2)
    assert 0.0 <= res.consistency <= 100.0 and 0.0 <= res.stability <= 100.0
    direct = protoeval_maps(lambda x, c: own_class_maps(model, x, c), test, n_classes=3, batch_size=5)
    assert direct.consistency == res.consistency and direct.stability == res.stability
    assert torch.equal(direct.per_class[1].covered_noisy, res.per_class[1].covered_noisy)
    assert protopnet_protoeval(model, test, noise_std=0.0).stability == 100.0
    assert res.settings["prototypes"] == "protopnet" and res.settings["box_half_size_px"] == [[10, 10]]


# ============================================================================================ errors

def test_bad_inputs_give_clear_errors(data):
    with pytest.raises(ConfigError, match="warm_epochs must be an int >= 0"):
        ProtoPNetConfig(warm_epochs=-1)
    with pytest.raises(ConfigError, match="joint_lr must be > 0"):
        ProtoPNetConfig(joint_lr=0.0)
    with pytest.raises(ConfigError, match="all 0"):
        ProtoPNetConfig(warm_epochs=0, joint_epochs=0, last_layer_epochs=0)
    with pytest.raises(TypeError):
        ProtoPNetConfig(10)  # keyword-only
    with pytest.raises(dataclasses.FrozenInstanceError):
        TINY.warm_epochs = 3
    f, train = data["features"], data["train"]
    with pytest.raises(TypeError, match="ProtoPNetConfig"):
        train_protopnet(f, train, num_classes=3, config={"warm_epochs": 1})
    with pytest.raises(InputValueError, match=r"outside \[0, 2\).*num_classes"):
        train_protopnet(f, train, num_classes=2, config=TINY, progress=False)
    with pytest.raises(InputValueError, match=r"classes \[3\] have no training image"):
        train_protopnet(f, train, num_classes=4, config=TINY, progress=False)
    with pytest.raises(ShapeError, match=r"feature map \[B, D, h, w\]"):
        train_protopnet(nn.Sequential(copy.deepcopy(f), nn.Flatten()), train, num_classes=3, config=TINY,
                        progress=False)
    with pytest.raises(InputValueError, match="in_channels"):
        ProtoPNet(nn.Identity(), num_classes=3)
    m = ProtoPNet(f, num_classes=3, prototypes_per_class=1, prototype_dim=4)
    with pytest.raises(ShapeError, match=r"\[B, 3, S, S\]"):
        m(torch.zeros(3, 64, 64))
    with pytest.raises(InputValueError, match=r"class index must be an int in \[0, 3\)"):
        own_class_maps(m, torch.zeros(1, 3, 64, 64), 3)
    two = torch.utils.data.Subset(train, list(range(60)))  # classes 0 and 1 only
    two.labels = train.labels[:60]
    two.mean, two.std = train.mean, train.std
    with pytest.raises(InputValueError, match=r"classes \[2\] have no image"):
        push_prototypes(m, two)


# ============================================================================================ device and layering

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trains_and_evaluates_on_cuda(data):
    cfg = dataclasses.replace(TINY, warm_epochs=1, joint_epochs=2, last_layer_epochs=2)
    res = train_protopnet(data["features"], data["train"], num_classes=3, config=cfg, progress=False, device="cuda")
    assert res.model.prototypes.device.type == "cuda"
    assert next(data["features"].parameters()).device.type == "cpu"  # the caller's trunk stays where it was
    pe = protopnet_protoeval(res.model, data["test"])
    assert 0.0 <= pe.consistency <= 100.0
    assert 0.0 <= protopnet_accuracy(res.model, data["test"]) <= 1.0


def test_protopnet_imports_only_what_its_layer_allows():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "phpn_core" / "protopnet"
    forbidden = ("phpn_core.storage", "phpn_core.report", "tasks", "flows", "explorer", "prefect", "prefect_ray", "ray")
    bad = []
    for path in sorted(root.glob("*.py")):
        assert len(path.read_text().splitlines()) < 600, f"{path.name} has 600 lines or more"
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [(path.name, n) for n in names if any(n == f or n.startswith(f + ".") for f in forbidden)]
    assert not bad, f"phpn_core.protopnet must not import {forbidden}: {bad}"
