"""Training ProtoPNet with the official recipe (``cfchen-duke/ProtoPNet``: ``settings.py``, ``main.py``,
``train_and_test.py``), scaled to a CPU.

Phases, in order (each an Adam optimiser made once, as in ``main.py``):

1. **warm-up** (``warm_epochs``): the add-on and the prototypes only, lr ``warm_lr`` = 3e-3 (add-on weight decay
   1e-3); the trunk is frozen (``requires_grad=False``) but, as in the official code, in train mode.
2. **joint** (``joint_epochs``): trunk lr 1e-4, add-on and prototypes 3e-3 (trunk and add-on weight decay 1e-3),
   ``StepLR(step_size=joint_lr_step_size, gamma=0.1)`` stepped after each joint epoch. The last layer stays at its
   initialisation through phases 1-2 (the official optimisers do not hold it).
3. **push** (:func:`~phpn_core.protopnet.push.push_prototypes`): each prototype becomes its nearest own-class
   training patch in add-on space.
4. **last layer** (``last_layer_epochs``): the last layer only.

Loss: ``1 * CE + 0.8 * cluster - 0.08 * separation + 1e-4 * L1``, the official class-specific terms
(:func:`protopnet_loss`): cluster = batch mean of the smallest distance to an own-class prototype, separation =
batch mean of the smallest distance to an other-class prototype (both through the official ``max_dist = d`` form),
L1 = the L1 norm of the last-layer weights to the wrong classes.

Deviations from the recipe (each an option of :class:`ProtoPNetConfig`; the official value in brackets):

- **epochs** [CUB: 5 warm-up epochs, then joint training with a push every 10 epochs, 20 last-layer epochs after
  each push, up to 1000 epochs]: 5 warm-up, 20 joint (``joint_lr_step_size`` 10 [5]), **one** push at the end of
  the joint phase, then 50 last-layer epochs. SynthParts has 400 training images (13 steps per epoch at batch 32
  against CUB's 75 at batch 80), so the official epoch counts would be far fewer steps; a CPU run takes ~1 min.
- **batch size** 32 [80 for training, 75 for the push].
- **cross-entropy-only warm-up** (``warm_cross_entropy_only=True`` [False]): with cluster and separation from the
  first step, every prototype collapsed onto the background. On SynthParts ~90% of each image is background, whose
  trunk features are near 0 (post-ReLU) and so map to one point of the add-on space (Sigmoid(0) = 0.5 per channel),
  the point nearest to every uniformly initialised prototype; the cluster term pulls all prototypes there, and the
  training accuracy stayed at ~40% through the joint phase (seed 0, this schedule otherwise: 71% on a held-out draw
  of the training distribution after the last layer, against 89% with the cross-entropy-only warm-up). The joint
  phase uses the official loss.
- **last layer** (``last_layer_lr`` 1e-2 [1e-4]): the phase is convex (trunk, add-on and prototypes frozen); it runs
  on the frozen part's min distances of the un-augmented training images, computed once (so its epochs cost next to
  nothing), in eval mode (the official code keeps train mode, whose BatchNorm statistics drift after the push and
  so move the patches the prototypes were pushed onto; here the returned model's prototypes are exactly training
  patches of the returned model). At 1e-4 it barely left its +1/-0.5 initialisation in 150 epochs (seed 0: 60%
  held-out accuracy against 87% at 1e-2 in 20 epochs).
- **augmentation**: random horizontal flips and a circular shift of up to ``max_shift`` = 8 px per batch (the recipe
  that trained the synthparts trunk) [offline rotations, skews and shears of CUB crops]; ``augment=False`` trains on
  the images as they are. The push and the last-layer phase never augment.
- **m and d** stay official (10 prototypes per class, d = 128) by default: ``prototypes_per_class``,
  ``prototype_dim``.
- **StepLR** is stepped after each epoch (today's PyTorch order), not before it as in the 2019 code.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from phpn_core.data.base import normalize
from phpn_core.errors import ConfigError, InputValueError, ShapeError
from phpn_core.progress import StepProgress
from phpn_core.protopnet.model import ProtoPNet
from phpn_core.protopnet.push import (
    PushRecord,
    dataset_labels,
    dataset_norm,
    push_prototypes,
)

__all__ = ["ProtoPNetConfig", "LossTerms", "TrainResult", "protopnet_loss", "train_protopnet"]


@dataclass(frozen=True, kw_only=True)
class ProtoPNetConfig:
    """ProtoPNet's training options (keyword-only, frozen; checked when made). Defaults: the official values, with
    epochs and batch size scaled for a CPU run on SynthParts (see the module docstring for every deviation)."""

    prototypes_per_class: int = 10
    prototype_dim: int = 128
    warm_epochs: int = 5
    joint_epochs: int = 20
    last_layer_epochs: int = 50
    batch_size: int = 32
    push_batch_size: int = 64
    warm_lr: float = 3e-3
    joint_trunk_lr: float = 1e-4
    joint_lr: float = 3e-3
    joint_lr_step_size: int = 10
    joint_lr_gamma: float = 0.1
    last_layer_lr: float = 1e-2
    weight_decay: float = 1e-3
    cross_entropy_coef: float = 1.0
    cluster_coef: float = 0.8
    separation_coef: float = -0.08
    l1_coef: float = 1e-4
    incorrect_class_strength: float = -0.5
    augment: bool = True
    max_shift: int = 8
    warm_cross_entropy_only: bool = True

    def __post_init__(self) -> None:
        ints_pos = ("prototypes_per_class", "prototype_dim", "batch_size", "push_batch_size", "joint_lr_step_size")
        ints_nonneg = ("warm_epochs", "joint_epochs", "last_layer_epochs", "max_shift")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ints_pos + ints_nonneg:
                lo = 1 if f.name in ints_pos else 0
                if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                    raise ConfigError(f"ProtoPNetConfig.{f.name} must be an int >= {lo}; got {v!r}. Default: "
                                      f"{f.default!r}.")
            elif f.name in ("augment", "warm_cross_entropy_only"):
                if not isinstance(v, bool):
                    raise ConfigError(f"ProtoPNetConfig.{f.name} must be a bool; got {v!r}.")
            else:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ConfigError(f"ProtoPNetConfig.{f.name} must be a finite number; got {v!r}. Default: "
                                      f"{f.default!r}.")
                if f.name.endswith("_lr") and not v > 0:
                    raise ConfigError(f"ProtoPNetConfig.{f.name} must be > 0; got {v!r}. Default: {f.default!r}.")
                if f.name in ("weight_decay", "joint_lr_gamma", "l1_coef", "cluster_coef", "cross_entropy_coef") \
                        and v < 0:
                    raise ConfigError(f"ProtoPNetConfig.{f.name} must be >= 0; got {v!r}. Default: {f.default!r}.")
        if self.warm_epochs + self.joint_epochs + self.last_layer_epochs == 0:
            raise ConfigError("ProtoPNetConfig: warm_epochs, joint_epochs and last_layer_epochs are all 0; expected at "
                              "least one training epoch. Fix: e.g. joint_epochs=10.")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LossTerms:
    """One batch's loss: ``total`` (a tensor with its graph) and its terms (tensors, detached by the caller)."""

    total: torch.Tensor
    cross_entropy: torch.Tensor
    cluster: torch.Tensor
    separation: torch.Tensor
    l1: torch.Tensor


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train_protopnet` returns.

    Attributes:
        model: the trained :class:`ProtoPNet` (eval mode, on the training device; its trunk is a copy).
        history: ``{"warm": [...], "joint": [...], "last_layer": [...]}``, one dict per epoch with ``loss``,
            ``cross_entropy``, ``cluster``, ``separation``, ``l1`` (batch means) and ``accuracy`` (on the
            augmented training batches).
        push: the :class:`~phpn_core.protopnet.push.PushRecord` of the push after the joint phase.
        seconds: wall time of the whole training; ``phase_seconds``: per phase (``push`` included).
        config: the :class:`ProtoPNetConfig` used; ``seed``.
    """

    model: ProtoPNet
    history: dict
    push: PushRecord
    seconds: float
    phase_seconds: dict = field(default_factory=dict)
    config: ProtoPNetConfig | None = None
    seed: int = 0


def protopnet_loss(logits: torch.Tensor, min_distances: torch.Tensor, labels: torch.Tensor, model: ProtoPNet,
                   config: ProtoPNetConfig) -> LossTerms:
    """The official class-specific loss.

    Args:
        logits: ``[B, C]``; min_distances: ``[B, P]`` (from :meth:`ProtoPNet.forward_with_distances`); labels:
            long ``[B]``; model: for the class identity ``[P, C]`` and the last layer; config: the coefficients.

    ``max_dist = d``; ``cluster = mean_b(max_dist - max_j((max_dist - dist_bj) * own_bj))`` (= the smallest
    distance to an own-class prototype, as distances are below ``d`` in the Sigmoid add-on space);
    ``separation`` the same with the other classes' prototypes; ``l1 = ||W * (1 - identity^T)||_1``;
    ``total = ce_coef * CE + cluster_coef * cluster + separation_coef * separation + l1_coef * l1``
    (officially 1, 0.8, -0.08, 1e-4: separation is *rewarded*).
    """
    max_dist = float(model.prototype_dim * model.prototypes.shape[2] * model.prototypes.shape[3])
    own = model.prototype_class_identity[:, labels].t()  # [B, P]
    ce = F.cross_entropy(logits, labels)
    inv, _ = torch.max((max_dist - min_distances) * own, dim=1)
    cluster = torch.mean(max_dist - inv)
    inv_other, _ = torch.max((max_dist - min_distances) * (1 - own), dim=1)
    separation = torch.mean(max_dist - inv_other)
    l1 = (model.last_layer.weight * (1 - model.prototype_class_identity.t())).norm(p=1)
    total = (config.cross_entropy_coef * ce + config.cluster_coef * cluster + config.separation_coef * separation
             + config.l1_coef * l1)
    return LossTerms(total=total, cross_entropy=ce, cluster=cluster, separation=separation, l1=l1)


def _set_trainable(model: ProtoPNet, *, trunk: bool, add_on: bool, prototypes: bool, last: bool) -> None:
    for p in model.features.parameters():
        p.requires_grad_(trunk)
    for p in model.add_on_layers.parameters():
        p.requires_grad_(add_on)
    model.prototypes.requires_grad_(prototypes)
    for p in model.last_layer.parameters():
        p.requires_grad_(last)


def _render(dataset, mean, std, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images normalised ``[N, 3, S, S]`` and labels ``[N]`` (a small training set, rendered once)."""
    items = [dataset[i] for i in range(len(dataset))]
    images = [it["image"] for it in items]
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ShapeError(f"{who}: training images must all have one shape [3, S, S]; got {sorted(shapes)[:3]}.")
    return normalize(torch.stack(images), mean, std), torch.tensor([int(it["label"]) for it in items])


def train_protopnet(
    trunk: nn.Module,
    train_dataset,
    *,
    num_classes: int,
    config: ProtoPNetConfig | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    mean=None,
    std=None,
) -> TrainResult:
    """Train a :class:`ProtoPNet` on ``trunk`` (deep-copied: the caller's module is never changed).

    Args:
        trunk: normalised images ``[B, 3, S, S]`` -> ``[B, D, h, w]`` (e.g. the features of
            :func:`phpn_core.models.split.split_classifier` of a trained CNN; ConvNeXt/ViT maps work too).
        train_dataset: items ``{"image": [3, S, S] in [0, 1], "label": int}``, every class present; rendered once
            into memory (a small set).
        num_classes: C.
        config: :class:`ProtoPNetConfig` (default: its defaults).
        seed: the add-on and prototype initialisation (``torch.manual_seed`` inside a forked RNG, so the caller's
            global RNG is untouched), the shuffling (a seeded DataLoader generator) and the augmentation.
            Deterministic on the CPU for a seed and thread count.
        device: where to train (default ``"cuda"`` when available, else the CPU).
        progress: a rich progress bar over the training steps.
        mean, std: normalisation (default ``train_dataset.mean``/``.std``).

    Returns:
        :class:`TrainResult`.

    Raises:
        ConfigError / TypeError: a bad config; InputValueError: bad labels, an empty or class-incomplete dataset;
        ShapeError: a trunk that does not return ``[B, D, h, w]``.
    """
    who = "train_protopnet"
    config = ProtoPNetConfig() if config is None else config
    if not isinstance(config, ProtoPNetConfig):
        raise TypeError(f"{who}: config must be a ProtoPNetConfig; got {type(config).__name__}. Fix: "
                        f"config=ProtoPNetConfig(joint_epochs=...).")
    if not isinstance(trunk, nn.Module):
        raise TypeError(f"{who}: trunk must be an nn.Module mapping [B, 3, S, S] -> [B, D, h, w]; got "
                        f"{type(trunk).__name__}.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise InputValueError(f"{who}: num_classes must be an int >= 1; got {num_classes!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputValueError(f"{who}: seed must be an int >= 0; got {seed!r}.")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mean, std = dataset_norm(train_dataset, mean, std, who)
    labels = dataset_labels(train_dataset)
    if not labels:
        raise InputValueError(f"{who}: the training set is empty; expected images of all {num_classes} classes.")
    bad = sorted({v for v in labels if not 0 <= v < num_classes})
    if bad:
        raise InputValueError(f"{who}: labels {bad[:5]} are outside [0, {num_classes}); expected num_classes to "
                              f"cover the dataset's labels. Fix: num_classes=len(train_dataset.classes).")
    missing = sorted(set(range(num_classes)) - set(labels))
    if missing:
        raise InputValueError(f"{who}: classes {missing[:10]} have no training image; every class needs one (its "
                              f"prototypes are pushed onto its own patches).")
    t_start = time.perf_counter()
    x_all, y_all = _render(train_dataset, mean, std, who)
    trunk_copy = copy.deepcopy(trunk).to(dev)
    with torch.no_grad():  # probe: D and the map's shape, in eval mode on a copy of the caller's trunk
        was = trunk_copy.training
        fmap = trunk_copy.eval()(x_all[:2].to(dev))
        trunk_copy.train(was)
    if not isinstance(fmap, torch.Tensor) or fmap.ndim != 4:
        got = f"shape {tuple(fmap.shape)}" if isinstance(fmap, torch.Tensor) else type(fmap).__name__
        raise ShapeError(f"{who}: the trunk must return a feature map [B, D, h, w]; got {got}. Fix: pass the trunk "
                         f"before pooling (e.g. features of split_classifier(model)).")
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = ProtoPNet(trunk_copy, num_classes=num_classes, in_channels=int(fmap.shape[1]),
                          prototypes_per_class=config.prototypes_per_class, prototype_dim=config.prototype_dim,
                          incorrect_class_strength=config.incorrect_class_strength, copy_trunk=False).to(dev)
    gen = torch.Generator().manual_seed(seed)  # the DataLoader's shuffling
    aug = torch.Generator().manual_seed(seed + 1)  # flips and shifts
    loader = DataLoader(TensorDataset(x_all, y_all), batch_size=config.batch_size, shuffle=True, generator=gen,
                        num_workers=0)
    n_steps = sum(1 for _ in range(0, len(y_all), config.batch_size))
    total = n_steps * (config.warm_epochs + config.joint_epochs + config.last_layer_epochs)
    wd = config.weight_decay
    add_on, protos = list(model.add_on_layers.parameters()), [model.prototypes]
    warm_opt = torch.optim.Adam([{"params": add_on, "lr": config.warm_lr, "weight_decay": wd},
                                 {"params": protos, "lr": config.warm_lr}])
    joint_opt = torch.optim.Adam([{"params": list(model.features.parameters()), "lr": config.joint_trunk_lr,
                                   "weight_decay": wd},
                                  {"params": add_on, "lr": config.joint_lr, "weight_decay": wd},
                                  {"params": protos, "lr": config.joint_lr}])
    joint_sched = torch.optim.lr_scheduler.StepLR(joint_opt, step_size=config.joint_lr_step_size,
                                                  gamma=config.joint_lr_gamma)
    last_opt = torch.optim.Adam([{"params": list(model.last_layer.parameters()), "lr": config.last_layer_lr}])
    history: dict[str, list[dict]] = {"warm": [], "joint": [], "last_layer": []}
    ce_config = (dataclasses.replace(config, cluster_coef=0.0, separation_coef=0.0)
                 if config.warm_cross_entropy_only else config)
    phase_seconds: dict[str, float] = {}

    def epoch(phase: str, opt: torch.optim.Optimizer, i: int, n: int, bar: StepProgress, batches) -> None:
        sums = dict.fromkeys(("loss", "cross_entropy", "cluster", "separation", "l1"), 0.0)
        seen = correct = 0
        for xb, yb in batches:
            if len(yb) < 2 and model.training:  # BatchNorm in train mode needs more than one image
                continue
            xb, yb = xb.to(dev), yb.to(dev)
            if phase == "last_layer":  # xb: the cached min distances [b, P] of the frozen model
                min_d = xb
                logits = model.last_layer(model.distance_to_similarity(min_d))
            else:
                if config.augment:
                    flip = (torch.rand(len(yb), generator=aug) < 0.5).to(dev).view(-1, 1, 1, 1)
                    xb = torch.where(flip, xb.flip(3), xb)
                    if config.max_shift:
                        dy, dx = torch.randint(-config.max_shift, config.max_shift + 1, (2,), generator=aug).tolist()
                        xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
                logits, min_d = model.forward_with_distances(xb)
            terms = protopnet_loss(logits, min_d, yb, model, ce_config if phase == "warm" else config)
            opt.zero_grad(set_to_none=True)
            terms.total.backward()
            opt.step()
            b = len(yb)
            seen += b
            correct += int((logits.detach().argmax(1) == yb).sum())
            for k, v in (("loss", terms.total), ("cross_entropy", terms.cross_entropy), ("cluster", terms.cluster),
                         ("separation", terms.separation), ("l1", terms.l1)):
                sums[k] += float(v.detach()) * b
            bar.advance(f"{phase} {i + 1}/{n} loss {sums['loss'] / seen:.3f} acc {correct / seen:.3f}")
        row = {k: v / max(1, seen) for k, v in sums.items()}
        row.update(epoch=i + 1, accuracy=correct / max(1, seen), lr=[g["lr"] for g in opt.param_groups])
        history[phase].append(row)

    with StepProgress(enabled=progress, total=total, description="train ProtoPNet") as bar:
        t = time.perf_counter()
        _set_trainable(model, trunk=False, add_on=True, prototypes=True, last=False)
        model.train()  # official warm_only: the trunk is frozen but in train mode
        for i in range(config.warm_epochs):
            epoch("warm", warm_opt, i, config.warm_epochs, bar, loader)
        phase_seconds["warm"] = time.perf_counter() - t
        t = time.perf_counter()
        _set_trainable(model, trunk=True, add_on=True, prototypes=True, last=False)
        model.train()
        for i in range(config.joint_epochs):
            epoch("joint", joint_opt, i, config.joint_epochs, bar, loader)
            joint_sched.step()
        phase_seconds["joint"] = time.perf_counter() - t
        t = time.perf_counter()
        push = push_prototypes(model, train_dataset, batch_size=config.push_batch_size, device=dev, mean=mean,
                               std=std)
        phase_seconds["push"] = time.perf_counter() - t
        t = time.perf_counter()
        _set_trainable(model, trunk=False, add_on=False, prototypes=False, last=True)
        model.eval()  # deviation: frozen features stay exactly what the push saw (see the module docstring)
        with torch.no_grad():  # the frozen part's output on the un-augmented images, once
            min_d_all = torch.cat([model.forward_with_distances(x_all[s:s + config.push_batch_size].to(dev))[1].cpu()
                                   for s in range(0, len(y_all), config.push_batch_size)])
        cached = DataLoader(TensorDataset(min_d_all, y_all), batch_size=config.batch_size, shuffle=True,
                            generator=gen, num_workers=0)
        for i in range(config.last_layer_epochs):
            epoch("last_layer", last_opt, i, config.last_layer_epochs, bar, cached)
        phase_seconds["last_layer"] = time.perf_counter() - t
    _set_trainable(model, trunk=True, add_on=True, prototypes=True, last=True)
    model.eval()
    return TrainResult(model=model, history=history, push=push, seconds=time.perf_counter() - t_start,
                       phase_seconds=phase_seconds, config=config, seed=seed)
