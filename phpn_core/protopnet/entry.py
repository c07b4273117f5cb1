"""A trained ProtoPNet as a registry entry's tensors and metadata, and back (pure torch: the registry stores the
tensors, :mod:`phpn_core.storage` is not imported here).

Tensors (flat names, as :meth:`~phpn_core.storage.registry.PrototypeRegistry.publish_protopnet` stores them):
``state.<name>`` for every entry of the network's state dict (the fine-tuned trunk included: ProtoPNet trains it),
``push.image_index [P]``, ``push.cell [P, 2]``, ``push.distance [P]``, ``push.prototype_classes [P]``.
Metadata (JSON): :func:`protopnet_metadata`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from phpn_core.errors import InputValueError
from phpn_core.protopnet.model import ProtoPNet
from phpn_core.protopnet.push import PushRecord

__all__ = ["protopnet_metadata", "protopnet_tensors", "rebuild_protopnet"]

_PUSH = ("image_index", "cell", "distance", "prototype_classes")


def protopnet_tensors(model: ProtoPNet, push: PushRecord) -> dict[str, torch.Tensor]:
    """The tensors of a registry entry: the state dict under ``state.``, the push record under ``push.``
    (CPU copies; the model is not changed)."""
    if not isinstance(model, ProtoPNet) or not isinstance(push, PushRecord):
        raise TypeError(f"protopnet_tensors: expected a ProtoPNet and its PushRecord; got "
                        f"{type(model).__name__}, {type(push).__name__}.")
    out = {f"state.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
    out.update({f"push.{name}": getattr(push, name).detach().cpu().clone() for name in _PUSH})
    return out


def protopnet_metadata(model: ProtoPNet, push: PushRecord, *, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """What :func:`rebuild_protopnet` needs besides the trunk (the shapes and constants of the network) and the
    latent map size of the push."""
    return {"num_classes": model.num_classes, "in_channels": model.in_channels,
            "prototypes_per_class": model.prototypes_per_class, "prototype_dim": model.prototype_dim,
            "epsilon": model.epsilon, "feature_size": list(push.feature_size), "train_config": dict(config or {})}


def rebuild_protopnet(trunk: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
                      ) -> tuple[ProtoPNet, PushRecord]:
    """The network and its push record from an entry: ``trunk`` is a module of the trunk's architecture (its
    weights are replaced by the stored, fine-tuned ones; it is used as it is, not copied). Eval mode, CPU."""
    try:
        model = ProtoPNet(trunk, num_classes=int(meta["num_classes"]), in_channels=int(meta["in_channels"]),
                          prototypes_per_class=int(meta["prototypes_per_class"]),
                          prototype_dim=int(meta["prototype_dim"]), epsilon=float(meta["epsilon"]), copy_trunk=False)
    except KeyError as e:
        raise InputValueError(f"rebuild_protopnet: the entry's metadata lacks {e.args[0]!r}: expected what "
                              "protopnet_metadata writes. Fix: publish the entry again.") from None
    state = {k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputValueError(
            f"rebuild_protopnet: the stored network does not fit the trunk given: {len(missing)} tensors missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). Expected the trunk "
            "architecture the entry was trained on. Fix: build the trunk from the entry's model record.")
    absent = [n for n in _PUSH if f"push.{n}" not in tensors]
    if absent:
        raise InputValueError(f"rebuild_protopnet: the entry has no push record ({absent} absent). Fix: publish "
                              "the entry again with protopnet_tensors(model, push).")
    h, w = (int(v) for v in meta.get("feature_size", (0, 0)))
    push = PushRecord(**{n: tensors[f"push.{n}"] for n in _PUSH}, feature_size=(h, w))
    return model.eval(), push
