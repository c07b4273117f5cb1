"""The same code paths on CUDA as on the CPU: NMF, the head decomposition and the decomposed head.

Skipped without a CUDA device. CPU and GPU reduce in different orders, so the factorisations are compared through
what must hold on both (reconstruction quality, exact head sums, equal logits), not bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from phpn_core import PartPrototypeHead, decompose_head, nmf
from phpn_core.data.planted import planted_features

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def features():
    feats, _, _ = planted_features(n_classes=6, n_images=12, hw=7, dim=64, noise=0.5, seed=3)
    return feats


def test_nmf_on_cuda_matches_cpu_quality_and_is_deterministic(features):
    X = torch.stack([f.reshape(-1, f.shape[-1]) for f in features.values()]).double()
    cpu = nmf(X, 4, seed=1)
    gpu = nmf(X.cuda(), 4, seed=1)
    again = nmf(X.cuda(), 4, seed=1)
    assert gpu.P.device.type == "cuda"
    assert torch.equal(gpu.P, again.P) and torch.equal(gpu.E, again.E)
    assert (gpu.P >= 0).all() and (gpu.E >= 0).all()
    err_cpu = cpu.rel_error.cpu()
    err_gpu = gpu.rel_error.cpu()
    assert torch.allclose(err_gpu, err_cpu, rtol=1e-3, atol=1e-6), (err_gpu, err_cpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decompose_head_on_cuda_is_exact_and_gives_the_original_logits(features, dtype):
    g = torch.Generator().manual_seed(0)
    D = next(iter(features.values())).shape[-1]
    W = torch.randn(len(features), D, generator=g, dtype=dtype)
    b = torch.randn(len(features), generator=g, dtype=dtype)
    feats = {c: f.to(dtype) for c, f in features.items()}
    dec = decompose_head({c: f.cuda() for c, f in feats.items()}, W.cuda(), 3, seed=0)
    assert dec.prototypes.device.type == "cuda"
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    recon = dec.prototypes.sum(1).cpu()
    assert (recon - W).abs().max().item() <= tol * max(1.0, W.abs().max().item())

    head = PartPrototypeHead(dec.prototypes, b.cuda(), signs=torch.sign(dec.alpha))
    fmap = torch.stack([feats[c][0] for c in sorted(feats)]).permute(0, 3, 1, 2).contiguous().cuda()  # [C, D, H, W]
    logits = head(fmap)
    want = fmap.mean((2, 3)) @ W.cuda().T + b.cuda()
    assert (logits - want).abs().max().item() <= (1e-4 if dtype == torch.float32 else 1e-9)
    ex = head.explain(fmap)
    completeness = ex.contributions.sum(-1) + b.cuda() - ex.logits
    assert completeness.abs().max().item() <= (1e-4 if dtype == torch.float32 else 1e-9)

    cpu = decompose_head(feats, W, 3, seed=0)
    # Same problem on both devices: the refined prototypes reach the same head and comparable fits.
    torch.testing.assert_close(cpu.prototypes.sum(1), recon, rtol=0, atol=tol * 10)
    assert torch.allclose(dec.rel_error.cpu(), cpu.rel_error, rtol=5e-3, atol=1e-6)
