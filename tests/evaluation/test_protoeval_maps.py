"""protoeval_maps is the one ProtoEval loop: protoeval (a head) and any model's maps (ProtoPNet) go through it.

protoeval must give exactly what protoeval_maps gives with the head's own map function, and protoeval_maps must
refuse map functions that do not return ``[B, k, h, w]``.
"""

from __future__ import annotations

import pytest
import torch

from phpn_core.errors import InputValueError, ShapeError
from phpn_core.evaluation import protoeval, protoeval_maps
from phpn_core.method.head import PartPrototypeHead


@pytest.fixture(scope="module")
def setup():
    """An untrained SynthPartsCNN (width 32, 64 px, 3 classes) and a random signed head on its features."""
    from phpn_core.data.synthparts import SynthParts
    from phpn_core.models.synthparts_cnn import SynthPartsCNN

    test = SynthParts(split="test", n_classes=3, n_per_class=6, image_size=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SynthPartsCNN(3, width=32).eval()
        protos = torch.rand(3, 4, 32)
        signs = torch.tensor([[1.0, -1.0, 1.0, 1.0], [1.0, 1.0, -1.0, 1.0], [-1.0, 1.0, 1.0, 1.0]])
        head = PartPrototypeHead(protos, torch.zeros(3), signs=signs)
    return {"features": model.features, "head": head, "test": test}


def _same(a, b):
    assert a.consistency == b.consistency and a.stability == b.stability and a.classes == b.classes
    assert torch.equal(a.consistent, b.consistent) and torch.equal(a.stable_fraction, b.stable_fraction)
    assert torch.equal(a.part_rate, b.part_rate)
    for ra, rb in zip(a.per_class, b.per_class, strict=True):
        assert ra.image_indices == rb.image_indices
        for name in ("covered", "covered_noisy", "visible", "peaks"):
            assert torch.equal(getattr(ra, name), getattr(rb, name)), name


@pytest.mark.parametrize("oriented", [True, False])
def test_protoeval_equals_protoeval_maps_with_the_heads_maps(setup, oriented):
    f, head, test = setup["features"], setup["head"], setup["test"]

    def maps_fn(x, c):
        ex = head.explain(f(x), classes=[c])
        return (ex.oriented_heatmaps if oriented else ex.heatmaps)[:, 0]

    kw = dict(batch_size=4, seed=3, classes=[2, 0, 1])
    a = protoeval(f, head, test, use_oriented=oriented, **kw)
    b = protoeval_maps(maps_fn, test, n_classes=3, **kw)
    _same(a, b)
    # the settings protoeval adds on top of the shared loop's
    assert {k: v for k, v in a.settings.items() if k not in ("use_oriented", "prototypes")} == b.settings
    assert a.settings["use_oriented"] is oriented and a.settings["prototypes"] == "head"


def test_protoeval_maps_matches_an_override_too(setup):
    f, head, test = setup["features"], setup["head"], setup["test"]
    other = torch.rand(3, 2, 32, generator=torch.Generator().manual_seed(1))
    ov = PartPrototypeHead(other, torch.zeros(3))
    a = protoeval(f, head, test, prototypes_override=other, batch_size=5)
    b = protoeval_maps(lambda x, c: ov.explain(f(x), classes=[c]).heatmaps[:, 0], test, n_classes=3, batch_size=5)
    _same(a, b)


def test_protoeval_maps_errors(setup):
    test = setup["test"]
    with pytest.raises(ShapeError, match=r"\[B=.*k, h, w\]"):
        protoeval_maps(lambda x, c: torch.zeros(len(x), 8, 8), test, n_classes=3)
    with pytest.raises(ShapeError, match="k, h, w"):
        protoeval_maps(lambda x, c: torch.zeros(1, 2, 8, 8), test, n_classes=3, batch_size=4)
    with pytest.raises(ShapeError, match="same number"):
        protoeval_maps(lambda x, c: torch.rand(len(x), 1 + c, 8, 8), test, n_classes=3)
    with pytest.raises(TypeError, match="callable"):
        protoeval_maps("maps", test, n_classes=3)
    with pytest.raises(InputValueError, match=r"classes must be ints in \[0, 2\)"):
        protoeval_maps(lambda x, c: torch.rand(len(x), 1, 8, 8), test, n_classes=2, classes=[2])
    with pytest.raises(InputValueError, match="noise_std"):
        protoeval_maps(lambda x, c: torch.rand(len(x), 1, 8, 8), test, n_classes=3, noise_std=-1)
