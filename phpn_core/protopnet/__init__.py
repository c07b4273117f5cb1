"""An ante-hoc baseline: ProtoPNet (Chen et al., NeurIPS 2019) on the same trunk and data phpn decomposes, scored by
the same ProtoEval code (:func:`phpn_core.evaluation.protoeval.protoeval_maps`).

- :mod:`~phpn_core.protopnet.model`: :class:`ProtoPNet` (trunk -> add-on -> L2 distances to ``m * C`` prototypes ->
  log similarity -> last layer);
- :mod:`~phpn_core.protopnet.train`: :func:`train_protopnet` (warm-up, joint, push, last layer) with
  :class:`ProtoPNetConfig`, the official loss :func:`protopnet_loss`;
- :mod:`~phpn_core.protopnet.push`: :func:`push_prototypes` and its :class:`PushRecord`;
- :mod:`~phpn_core.protopnet.maps`: :func:`own_class_maps` (the "where" ProtoEval scores),
  :func:`protopnet_protoeval`, :func:`protopnet_accuracy`.

May import torch, numpy, the standard library, rich, ``phpn_core.errors``, ``phpn_core.data``, ``phpn_core.models``
and ``phpn_core.evaluation``; never storage, report, tasks, flows, the explorer, Prefect or Ray.

    from phpn_core.models.split import split_classifier
    from phpn_core.protopnet import ProtoPNetConfig, train_protopnet, protopnet_protoeval, protopnet_accuracy

    features, _, _ = split_classifier(cnn.eval())
    res = train_protopnet(features, train_ds, num_classes=8, config=ProtoPNetConfig(), seed=0, progress=False)
    acc = protopnet_accuracy(res.model, test_ds)
    pe = protopnet_protoeval(res.model, test_ds)        # pe.consistency, pe.stability (%)
"""

from phpn_core.protopnet.maps import (
    own_class_maps,
    protopnet_accuracy,
    protopnet_protoeval,
)
from phpn_core.protopnet.model import ProtoPNet
from phpn_core.protopnet.push import PushRecord, push_prototypes
from phpn_core.protopnet.train import (
    LossTerms,
    ProtoPNetConfig,
    TrainResult,
    protopnet_loss,
    train_protopnet,
)

__all__ = [
    "ProtoPNet", "ProtoPNetConfig", "TrainResult", "LossTerms", "PushRecord",
    "train_protopnet", "protopnet_loss", "push_prototypes", "own_class_maps", "protopnet_protoeval",
    "protopnet_accuracy",
]
