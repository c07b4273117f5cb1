"""explain_image on an entry that decomposed only some head rows: only those are explained; probabilities stay
the softmax over all C logits."""

import pytest
import torch

from phpn_core import PartPrototypeHead
from phpn_core.errors import InputValueError
from phpn_core.report.explain import explain_image


class _Pool(torch.nn.Module):
    """x [B, 3, S, S] -> a [B, 3, S/4, S/4] map (a tiny fixed 'backbone')."""

    def forward(self, x):
        return torch.nn.functional.avg_pool2d(x, 4)


def _setup():
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(5, 2, 3, generator=g)
    head = PartPrototypeHead(protos, torch.randn(5, generator=g))
    image = torch.rand(3, 16, 16, generator=g)
    return head, image


def test_only_decomposed_rows_are_explained_and_probabilities_are_over_all_rows():
    head, image = _setup()
    feats = _Pool().eval()
    full = explain_image(image, features=feats, head=head, mean=(0, 0, 0), std=(1, 1, 1), top=5)
    logits = head(feats(image[None]))[0]
    allowed = [1, 3]
    sub = explain_image(image, features=feats, head=head, mean=(0, 0, 0), std=(1, 1, 1), top=3, classes=allowed)
    assert sub.classes == sorted(allowed, key=lambda c: -float(logits[c]))  # both, best first
    assert torch.allclose(sub.probabilities, logits.softmax(0)[sub.classes])
    assert set(full.classes) == set(range(5))
    for i, c in enumerate(sub.classes):  # the same explanation as in the unrestricted call
        j = full.classes.index(c)
        assert torch.allclose(sub.contributions[i], full.contributions[j])


def test_classes_outside_the_head_are_refused():
    head, image = _setup()
    with pytest.raises(InputValueError, match=r"head rows in \[0, 5\)"):
        explain_image(image, features=_Pool().eval(), head=head, mean=(0, 0, 0), std=(1, 1, 1), classes=[7])
