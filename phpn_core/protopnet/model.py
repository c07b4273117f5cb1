"""The ProtoPNet network (Chen et al., "This Looks Like That: Deep Learning for Interpretable Image Recognition",
NeurIPS 2019), as in the official code (``cfchen-duke/ProtoPNet``, ``model.py``).

``x [B, 3, S, S]`` (normalised) -> trunk -> ``[B, D, h, w]`` -> add-on (1x1 conv, ReLU, 1x1 conv, Sigmoid)
-> ``z [B, d, h, w]`` in ``[0, 1]`` -> squared L2 distance of every cell to each of the ``P = m * C`` prototypes
``[P, d, 1, 1]`` -> ``[B, P, h, w]``, min-pooled over the cells -> similarity ``log((dist + 1) / (dist + 1e-4))``
``[B, P]`` -> last layer (``P -> C``, no bias; +1 to the own class, -0.5 to the others at initialisation) -> logits.

Official details kept: the distance is computed by convolution as ``||z||^2 - 2 z.p + ||p||^2`` and clamped at 0
(ReLU); prototypes start uniform in ``[0, 1)`` (``torch.rand``); the add-on's convs get Kaiming-normal weights
(``fan_out``, ReLU) and zero biases; prototype j belongs to class ``j // m``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from phpn_core.errors import InputValueError, ShapeError

__all__ = ["ProtoPNet"]


def _pos_int(name: str, value, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputValueError(f"ProtoPNet: {name} must be an int >= 1; got {value!r}. {hint}")
    return value


class ProtoPNet(nn.Module):
    """ProtoPNet on a given trunk.

    Args:
        trunk: any module mapping normalised images ``[B, 3, S, S]`` to a feature map ``[B, D, h, w]`` (signed or
            not: the add-on takes any real input). Deep-copied unless ``copy_trunk=False``, so training never
            changes the caller's module.
        num_classes: C.
        in_channels: D; default ``trunk.out_channels`` (what :func:`phpn_core.models.split.split_classifier`'s
            features carry). Required for trunks without that attribute.
        prototypes_per_class: m (official: 10).
        prototype_dim: d, the add-on's output channels and the prototypes' length (official: 128).
        incorrect_class_strength: the last layer's initial weight to the other classes (official: -0.5).
        epsilon: of the similarity ``log((dist + 1) / (dist + epsilon))`` (official: 1e-4).
        copy_trunk: deep-copy ``trunk`` (default) or use it as it is.

    Attributes:
        features: the trunk (a copy); ``add_on_layers``; ``prototypes``: ``nn.Parameter [P, d, 1, 1]``;
        ``last_layer``: ``nn.Linear(P, C, bias=False)``; ``prototype_classes``: long ``[P]`` (buffer);
        ``prototype_class_identity``: float ``[P, C]`` one-hot (buffer).

    Weights come from the global RNG: seed it (or use :func:`phpn_core.protopnet.train_protopnet`, which does).
    """

    def __init__(
        self,
        trunk: nn.Module,
        *,
        num_classes: int,
        in_channels: int | None = None,
        prototypes_per_class: int = 10,
        prototype_dim: int = 128,
        incorrect_class_strength: float = -0.5,
        epsilon: float = 1e-4,
        copy_trunk: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(trunk, nn.Module):
            raise TypeError(f"ProtoPNet: trunk must be a torch.nn.Module mapping [B, 3, S, S] -> [B, D, h, w]; got "
                            f"{type(trunk).__name__}. Fix: pass e.g. the features of split_classifier(model).")
        _pos_int("num_classes", num_classes, "Pass the dataset's number of classes, e.g. len(ds.classes).")
        if in_channels is None:
            in_channels = getattr(trunk, "out_channels", None)
            if in_channels is None:
                raise InputValueError(
                    f"ProtoPNet: in_channels not given and the trunk ({type(trunk).__name__}) has no out_channels "
                    f"attribute; expected D, the channels of the trunk's map [B, D, h, w]. Fix: pass in_channels=D "
                    f"(train_protopnet finds it by a probe forward)."
                )
        _pos_int("in_channels", in_channels, "Pass D, the channels of the trunk's feature map [B, D, h, w].")
        _pos_int("prototypes_per_class", prototypes_per_class, "The official code uses 10.")
        _pos_int("prototype_dim", prototype_dim, "The official code uses 128.")
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0:
            raise InputValueError(f"ProtoPNet: epsilon must be a number > 0; got {epsilon!r}. The official code uses "
                                  f"1e-4.")
        if isinstance(incorrect_class_strength, bool) or not isinstance(incorrect_class_strength, (int, float)):
            raise InputValueError(f"ProtoPNet: incorrect_class_strength must be a number; got "
                                  f"{incorrect_class_strength!r}. The official code uses -0.5.")
        self.num_classes, self.in_channels = int(num_classes), int(in_channels)
        self.prototypes_per_class, self.prototype_dim = int(prototypes_per_class), int(prototype_dim)
        self.epsilon = float(epsilon)
        P, d = self.num_classes * self.prototypes_per_class, self.prototype_dim
        self.features = copy.deepcopy(trunk) if copy_trunk else trunk
        self.add_on_layers = nn.Sequential(
            nn.Conv2d(self.in_channels, d, kernel_size=1), nn.ReLU(),
            nn.Conv2d(d, d, kernel_size=1), nn.Sigmoid(),
        )
        for m in self.add_on_layers.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0)
        self.prototypes = nn.Parameter(torch.rand(P, d, 1, 1))
        classes = torch.arange(P) // self.prototypes_per_class
        self.register_buffer("prototype_classes", classes)
        self.register_buffer("prototype_class_identity", F.one_hot(classes, self.num_classes).float())
        self.last_layer = nn.Linear(P, self.num_classes, bias=False)
        self.set_last_layer_incorrect_connection(float(incorrect_class_strength))

    # ------------------------------------------------------------------------------------------------ structure

    @property
    def num_prototypes(self) -> int:
        """P = m * C."""
        return int(self.prototypes.shape[0])

    @property
    def prototype_shape(self) -> tuple[int, int, int, int]:
        """``(P, d, 1, 1)``, as the official code's ``prototype_shape``."""
        return tuple(self.prototypes.shape)  # type: ignore[return-value]

    def prototypes_of_class(self, c: int) -> torch.Tensor:
        """Indices (long ``[m]``) of class ``c``'s prototypes."""
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < self.num_classes:
            raise InputValueError(f"ProtoPNet: class index must be an int in [0, {self.num_classes}); got {c!r}.")
        return torch.nonzero(self.prototype_classes == c).squeeze(1)

    def set_last_layer_incorrect_connection(self, incorrect_strength: float = -0.5) -> None:
        """Last-layer weights ``[C, P]``: 1 from each prototype to its class, ``incorrect_strength`` to the others."""
        pos = self.prototype_class_identity.t()
        with torch.no_grad():
            self.last_layer.weight.copy_(pos + incorrect_strength * (1 - pos))

    # ------------------------------------------------------------------------------------------------ computation

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ShapeError(f"ProtoPNet: expected normalised images [B, 3, S, S]; got {got}. Fix: batch single "
                             f"images with x.unsqueeze(0).")

    def conv_features(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, 3, S, S]`` -> the add-on's latent map ``z [B, d, h, w]`` (values in ``[0, 1]``)."""
        self._check_input(x)
        fmap = self.features(x)
        if fmap.ndim != 4 or fmap.shape[1] != self.in_channels:
            raise ShapeError(
                f"ProtoPNet: the trunk returned shape {tuple(fmap.shape)}; expected a feature map "
                f"[B, D={self.in_channels}, h, w]. Fix: pass a trunk that ends before pooling (e.g. the features of "
                f"split_classifier(model)) and in_channels=D."
            )
        return self.add_on_layers(fmap)

    def latent_distances(self, z: torch.Tensor, prototype_indices: torch.Tensor | None = None) -> torch.Tensor:
        """Squared L2 distances ``[B, P', h, w]`` of the latent map ``z [B, d, h, w]`` to the prototypes
        (all P, or those of ``prototype_indices`` long ``[P']``).

        ``relu(||z||^2 - 2 z.p + ||p||^2)`` with ``z.p`` a convolution, as the official ``_l2_convolution``.
        """
        if z.ndim != 4 or z.shape[1] != self.prototype_dim:
            raise ShapeError(f"ProtoPNet: latent map must be [B, d={self.prototype_dim}, h, w]; got shape "
                             f"{tuple(z.shape)}.")
        protos = self.prototypes if prototype_indices is None else self.prototypes[prototype_indices]
        z2 = (z ** 2).sum(1, keepdim=True)  # [B, 1, h, w] (= conv2d(z ** 2, ones) for 1x1 prototypes)
        zp = F.conv2d(z, protos)  # [B, P', h, w]
        p2 = (protos ** 2).sum((1, 2, 3)).view(1, -1, 1, 1)
        return F.relu(z2 - 2 * zp + p2)

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, 3, S, S]`` -> squared L2 distances ``[B, P, h, w]`` of every cell to every prototype."""
        return self.latent_distances(self.conv_features(x))

    def distance_to_similarity(self, distances: torch.Tensor) -> torch.Tensor:
        """``log((dist + 1) / (dist + epsilon))``, any shape (the official ``"log"`` activation)."""
        return torch.log((distances + 1) / (distances + self.epsilon))

    def similarity_maps(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, 3, S, S]`` -> similarity of every cell to every prototype ``[B, P, h, w]`` (high = close)."""
        return self.distance_to_similarity(self.distances(x))

    def forward_with_distances(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, 3, S, S]`` -> ``(logits [B, C], min_distances [B, P])`` (the official ``forward``)."""
        min_distances = self.distances(x).flatten(2).amin(2)  # min-pool over the h * w cells
        return self.last_layer(self.distance_to_similarity(min_distances)), min_distances

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, 3, S, S]`` (normalised) -> logits ``[B, C]``."""
        return self.forward_with_distances(x)[0]

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, prototypes_per_class={self.prototypes_per_class}, "
                f"prototype_dim={self.prototype_dim}, in_channels={self.in_channels}")
