"""Explain one image file with a published registry entry: top classes, prototype contributions, heatmaps.

Three layers, as in the rest of phpn (algorithm separate from visualization):

- :func:`load_entry_model` reads the entry (head + :class:`~phpn_core.storage.registry.EntryInfo`), finds the classifier
  checkpoint the entry was decomposed from (:func:`resolve_checkpoint`), builds the model, splits it and checks
  that the entry's prototypes sum to that model's linear head;
- :func:`explain_image` (tensors in, :class:`ImageExplanation` out) runs the features and the head on one image;
- :func:`render_image_explanation` draws it (PNG bytes); :func:`explain_image_file` chains the three for the
  ``phpn explain`` command.

Finding the checkpoint, in order:

1. ``checkpoint=`` given by the caller;
2. ``metadata["config"]["model"]["checkpoint"]`` (the run's config), when set;
3. for ``synthparts_cnn`` runs (which train their own model and record no checkpoint path): the run writes
   ``<run out>/model/synthparts_cnn.safetensors`` and the registry defaults to ``<run out>/registry``, so
   ``<registry>/../model/synthparts_cnn.safetensors`` is tried, then ``<train features>/../../model/...`` (the
   store defaults to ``<run out>/features/train.zarr``); local registries only.

Whatever the source, when the entry records ``metadata["model_checkpoint_digest"]`` the file's sha256
(:func:`phpn_core.models.spec.checkpoint_digest`) must equal it (a guessed file must; a file without a recorded
digest to compare is only accepted when named explicitly). Then the built model's head must equal the sum of the
entry's prototypes, so a heatmap is never drawn with prototypes of another model.

Normalisation: the dataset kind in the run's config decides: ``synthparts`` mean = std = 0.5; ``fashion_mnist`` its
own statistics; ``cub200``, ``imagefolder`` or unknown: ImageNet's. The choice is printed on the PNG and stored in
its ``phpn:normalization`` text chunk.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from phpn_core.data.base import IMAGENET_MEAN, IMAGENET_STD, normalize
from phpn_core.errors import ConfigError, InputValueError, ShapeError
from phpn_core.method.head import PartPrototypeHead

__all__ = [
    "ImageExplanation",
    "LoadedEntry",
    "explain_image",
    "explain_image_file",
    "load_entry_model",
    "normalization_for",
    "render_image_explanation",
    "resolve_checkpoint",
]

SYNTHPARTS_CHECKPOINT = Path("model") / "synthparts_cnn.safetensors"


# -------------------------------------------------------------------------------------------------- the algorithm


@dataclass(frozen=True)
class ImageExplanation:
    """The explanation of one image for its top classes (T = number of classes explained, k prototypes each).

    Attributes:
        image: ``[3, S, S]`` in [0, 1] (what was explained, before normalisation).
        classes: the T class indices, highest logit first; class_names: their names.
        logits: ``[T]``; probabilities: ``[T]`` (softmax over all C classes).
        contributions: ``[T, k]`` (``contributions.sum(1) + bias == logits``).
        heatmaps: ``[T, k, h, w]`` raw maps; oriented_heatmaps: ``[T, k, h, w]`` (times the prototypes' signs).
        bias: ``[T]``; signs: ``[T, k]``.
        normalization: the name of the normalisation used (e.g. ``"synthparts"``, ``"imagenet"``).
    """

    image: torch.Tensor
    classes: list[int]
    class_names: list[str]
    logits: torch.Tensor
    probabilities: torch.Tensor
    contributions: torch.Tensor
    heatmaps: torch.Tensor
    oriented_heatmaps: torch.Tensor
    bias: torch.Tensor
    signs: torch.Tensor
    normalization: str = "custom"


def normalization_for(dataset_kind: str | None) -> tuple[str, tuple[float, ...], tuple[float, ...]]:
    """``(name, mean, std)`` of the normalisation a run on ``dataset_kind`` trained with (see the module docstring)."""
    if dataset_kind == "synthparts":
        from phpn_core.data.synthparts import SynthParts

        return "synthparts", tuple(SynthParts.mean), tuple(SynthParts.std)
    if dataset_kind == "fashion_mnist":
        from phpn_core.data import fashion_mnist

        m, s = getattr(fashion_mnist, "_MEAN", None), getattr(fashion_mnist, "_STD", None)
        if m is not None and s is not None:
            return "fashion_mnist", (float(m),) * 3, (float(s),) * 3
    if dataset_kind in ("cub200", "imagefolder"):
        return "imagenet", IMAGENET_MEAN, IMAGENET_STD
    return "imagenet (default: the entry records no known dataset kind)", IMAGENET_MEAN, IMAGENET_STD


def explain_image(
    image: torch.Tensor,
    *,
    features: torch.nn.Module,
    head: PartPrototypeHead,
    mean: Sequence[float],
    std: Sequence[float],
    top: int = 3,
    class_names: Sequence[str] | None = None,
    normalization: str = "custom",
    device: str | torch.device = "cpu",
    classes: Sequence[int] | None = None,
) -> ImageExplanation:
    """Explain ``image [3, S, S]`` (in [0, 1]) for its ``top`` classes.

    ``classes``: the head rows that may be explained (an entry that decomposed only some rows: the others are the
    model's linear rows, with nothing to show); the top classes are the highest logits among them, and the
    probabilities stay the softmax over all C logits. None: every row.

    ``features`` (x ``[B, 3, S, S]`` normalised with ``mean``/``std`` -> ``[B, D, h, w]``, eval mode) and ``head``
    (prototypes ``[C, k, D]``) run on ``device`` (copies are made when they live elsewhere; nothing is modified).
    """
    import copy

    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        got = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ShapeError(f"image must be a tensor [3, S, S] in [0, 1]; got {got}. Fix: load it with "
                         "phpn_core.data.images.load_image(path, image_size=S)[0].")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise InputValueError(f"top must be an int >= 1; got {top!r}. Fix: e.g. top=3.")
    if not isinstance(head, PartPrototypeHead):
        raise InputValueError(f"head must be a PartPrototypeHead; got {type(head).__name__}.")
    if features.training:
        raise InputValueError("features is in training mode; expected eval mode. Fix: call model.eval() first.")
    dev = torch.device(device)
    p = next(features.parameters(), None)
    feats = features if p is None or p.device == dev else copy.deepcopy(features).to(dev)
    head_d = head if head.prototypes.device == dev else copy.deepcopy(head).to(dev)
    C = head.n_classes
    names = list(class_names) if class_names is not None else [f"class {c}" for c in range(C)]
    if len(names) != C:
        raise ShapeError(f"class_names must hold C={C} names; got {len(names)}.")
    with torch.inference_mode():
        x = normalize(image.detach().float()[None], mean, std).to(dev)
        fmap = feats(x).to(head_d.prototypes.dtype)
        logits = head_d(fmap)[0]
        allowed = torch.arange(C, device=logits.device) if classes is None else torch.as_tensor(
            sorted({int(c) for c in classes}), dtype=torch.long, device=logits.device)
        if allowed.numel() == 0 or bool(((allowed < 0) | (allowed >= C)).any()):
            raise InputValueError(f"classes must be head rows in [0, {C}); got {list(classes or [])[:10]}.")
        T = min(top, allowed.numel())
        top_classes = allowed[logits[allowed].topk(T).indices].tolist()
        ex = head_d.explain(fmap, classes=top_classes)
        probs = logits.float().softmax(0)[top_classes]
    return ImageExplanation(
        image=image.detach().cpu().clone(), classes=top_classes, class_names=[names[c] for c in top_classes],
        logits=ex.logits[0].cpu(), probabilities=probs.cpu(), contributions=ex.contributions[0].cpu(),
        heatmaps=ex.heatmaps[0].cpu(), oriented_heatmaps=ex.oriented_heatmaps[0].cpu(), bias=ex.bias.cpu(),
        signs=ex.signs.cpu(), normalization=normalization,
    )


# ---------------------------------------------------------------------------------------------- visualization


def render_image_explanation(
    expl: ImageExplanation,
    *,
    title: str | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    cell_px: int | None = None,
) -> bytes:
    """Draw an :class:`ImageExplanation` as PNG bytes: one row per explained class (highest logit first) with its
    logit and probability, the contribution bars (``p0 .. p{k-1}`` and the bias), the image and the k oriented
    heatmaps over it (one colour scale per row, from 0 to the row's maximum, so the strongest prototype of a class
    stands out). The PNG carries the text chunks ``phpn:normalization`` and ``phpn:classes``."""
    from PIL import PngImagePlugin

    from phpn_core.report import figures as viz
    from phpn_core.report.mosaics import render_mosaic
    from phpn_core.report.plots import image_hwc

    T, k = expl.contributions.shape
    S = expl.image.shape[-1]
    cell = int(cell_px) if cell_px is not None else min(max(S, 112), 192)
    labels = [f"p{i}" for i in range(k)]
    bar_w = max(2 * cell, 44 * (k + 1))
    rows, row_labels = [], []
    img = image_hwc(expl.image)
    for t in range(T):
        vmax = float(expl.oriented_heatmaps[t].max())
        marked = [f"{p}-" if float(expl.signs[t, i]) < 0 else p for i, p in enumerate(labels)]
        panel = viz.bar_panel(expl.contributions[t], bias=float(expl.bias[t]), logit=float(expl.logits[t]),
                              labels=marked, title=expl.class_names[t], size=(bar_w, cell))
        overlays = [viz.heatmap_overlay(expl.image, expl.oriented_heatmaps[t, i], alpha=alpha, cmap=cmap, vmin=0.0,
                                        vmax=vmax) for i in range(k)]
        rows.append([panel, img, *overlays])
        row_labels.append(f"#{t + 1} {expl.class_names[t]}\nlogit {float(expl.logits[t]):.2f}\n"
                          f"p = {float(expl.probabilities[t]):.3f}")
    head = title or "phpn explanation"
    subtitle = (f"normalisation: {expl.normalization}; maps oriented (p- = negative evidence), colour scale per row "
                "from 0 to its max")
    canvas = render_mosaic(rows, cell, row_labels=row_labels, col_labels=["contributions", "image", *labels],
                                title=f"{head}\n{subtitle}", col_widths=[bar_w] + [cell] * (k + 1))
    info = PngImagePlugin.PngInfo()
    info.add_text("phpn:normalization", expl.normalization)
    info.add_text("phpn:classes", ",".join(str(c) for c in expl.classes))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- the registry side


@dataclass(frozen=True)
class LoadedEntry:
    """A registry entry with the classifier it was decomposed from.

    ``head`` (prototypes ``[C, k, D]``), ``info`` (the entry's pointer), ``model`` (eval mode, CPU), ``features``
    (x ``[B, 3, S, S]`` -> ``[B, D, h, w]``), ``weight [C, D]``/``bias [C]`` (the model's head), ``checkpoint``
    (the file used) and how it was found (``checkpoint_source``), ``image_size`` S, the normalisation (``mean``,
    ``std``, its ``normalization`` name) and ``class_names`` (C).
    """

    head: PartPrototypeHead
    info: Any
    model: torch.nn.Module
    features: torch.nn.Module
    weight: torch.Tensor
    bias: torch.Tensor
    checkpoint: str
    checkpoint_source: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    normalization: str
    class_names: list[str]


def _section(meta: Mapping[str, Any], *keys: str) -> Mapping[str, Any]:
    cur: Any = meta
    for key in keys:
        cur = cur.get(key) if isinstance(cur, Mapping) else None
    return cur if isinstance(cur, Mapping) else {}


def _checkpoint_error(what: str, entry_id: str) -> ConfigError:
    from phpn_core.models.spec import CheckpointError

    return CheckpointError(
        f"Cannot find the classifier checkpoint of registry entry {entry_id!r}: {what}. Expected the model file the "
        "entry was decomposed from (its sha256 is the entry's metadata['model_checkpoint_digest']). Fix: pass it "
        "explicitly, explain_image_file(..., checkpoint='path/to/model.safetensors') (CLI: --checkpoint if "
        "available), or keep the run directory layout <out>/registry next to <out>/model/."
    )


def resolve_checkpoint(
    info: Any, *, registry_uri: str | os.PathLike[str], checkpoint: str | os.PathLike[str] | None = None
) -> tuple[str, str]:
    """The checkpoint file of entry ``info`` and how it was found: ``(path, source)``; see the module docstring.

    Raises :class:`~phpn_core.models.spec.CheckpointError` (a :class:`~phpn_core.errors.ConfigError`) saying what was
    tried and how to pass a checkpoint.
    """
    from phpn_core.models.spec import checkpoint_digest
    from phpn_core.storage.uri import parse_uri

    meta = info.metadata or {}
    want = meta.get("model_checkpoint_digest")
    want = str(want) if want else None
    entry_id = info.entry_id

    def verified(path: Path, source: str, *, require_digest: bool) -> tuple[str, str]:
        if not path.is_file():
            raise _checkpoint_error(f"{source} {str(path)!r} does not exist on this machine", entry_id)
        if want is None:
            if require_digest:
                raise _checkpoint_error(
                    f"found {str(path)!r} ({source}) but the entry records no model_checkpoint_digest to verify it "
                    "against", entry_id)
            return str(path), source
        got = checkpoint_digest(path)
        if got != want:
            raise _checkpoint_error(
                f"{source} {str(path)!r} has sha256 {got[:16]}..., the entry was decomposed from {want[:16]}... "
                "(another model: its heatmaps would be meaningless)", entry_id)
        return str(path), source

    if checkpoint is not None:
        return verified(Path(os.fspath(checkpoint)).expanduser(), "the given checkpoint", require_digest=False)
    model_cfg = _section(meta, "config", "model")
    recorded = model_cfg.get("checkpoint")
    if recorded:
        return verified(Path(str(recorded)).expanduser(), "the run config's model.checkpoint", require_digest=False)
    arch = model_cfg.get("arch")
    if arch != "synthparts_cnn":
        raise _checkpoint_error(
            f"the entry's metadata records no checkpoint path (model.arch = {arch!r}; only synthparts_cnn runs "
            "write their model next to the registry)", entry_id)
    tried = []
    candidates = []
    loc = parse_uri(registry_uri)
    if not loc.is_remote:
        candidates.append(Path(loc.path).parent / SYNTHPARTS_CHECKPOINT)
    train_uri = _section(meta, "features").get("train")
    if isinstance(train_uri, str):
        try:
            floc = parse_uri(train_uri)
        except Exception:  # noqa: BLE001 - a redacted or odd URI: nothing to try there
            floc = None
        if floc is not None and not floc.is_remote:
            candidates.append(Path(floc.path).parent.parent / SYNTHPARTS_CHECKPOINT)
    for cand in dict.fromkeys(candidates):  # ordered, without duplicates
        if cand.is_file():
            return verified(cand, "the run's trained model", require_digest=True)
        tried.append(str(cand))
    where = f"tried {tried}" if tried else "the registry is remote, so there is no run directory to look in"
    raise _checkpoint_error(f"model.checkpoint is None (the run trained synthparts_cnn itself) and {where}", entry_id)


def load_entry_model(
    registry_uri: str | os.PathLike[str],
    entry_id: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    image_size: int | None = None,
) -> LoadedEntry:
    """Load entry ``entry_id`` and the classifier it was decomposed from (see the module docstring)."""
    from phpn_core.models.spec import CheckpointError, ModelSpec, build_model
    from phpn_core.models.split import split_classifier
    from phpn_core.storage.registry import PrototypeRegistry

    head, info = PrototypeRegistry(registry_uri, storage_options=storage_options).load(entry_id)
    meta = info.metadata or {}
    model_cfg, data_cfg = _section(meta, "config", "model"), _section(meta, "config", "dataset")
    arch = model_cfg.get("arch")
    if not arch:
        raise ConfigError(
            f"Registry entry {entry_id!r} records no model architecture: expected metadata['config']['model']['arch'] "
            "(written by the phpn flows). Fix: publish the entry with metadata={'config': run_config_dict, ...}."
        )
    path, source = resolve_checkpoint(info, registry_uri=registry_uri, checkpoint=checkpoint)
    S = image_size if image_size is not None else data_cfg.get("image_size")
    if isinstance(S, bool) or not isinstance(S, int) or S < 1:
        raise ConfigError(
            f"Registry entry {entry_id!r} records no usable image size (metadata['config']['dataset']['image_size'] "
            f"= {data_cfg.get('image_size')!r}): expected a positive int. Fix: pass image_size=..."
        )
    spec = ModelSpec(arch=arch, checkpoint=path, num_classes=info.n_classes, input_size=S)
    model = build_model(spec).eval()
    features, weight, bias = split_classifier(model)
    if tuple(weight.shape) != (info.n_classes, info.D):
        raise CheckpointError(
            f"The classifier from {path!r} has a head of shape {list(weight.shape)}, the entry's prototypes need "
            f"[C, D] = [{info.n_classes}, {info.D}]. Fix: pass the checkpoint entry {entry_id!r} was built from."
        )
    diff = float((head.weight.float() - weight.float()).abs().max())
    tol = 1e-3 * max(1.0, float(weight.abs().max())) + 10.0 * float(info.max_head_error or 0.0)
    if not math.isfinite(diff) or diff > tol:
        raise CheckpointError(
            f"The classifier from {path!r} ({source}) is not the one entry {entry_id!r} was decomposed from: its "
            f"head differs from the sum of the entry's prototypes by up to {diff:.3g} (expected <= {tol:.3g}). Fix: "
            "pass the checkpoint the entry was built from."
        )
    norm, mean, std = normalization_for(data_cfg.get("kind"))
    names = meta.get("class_names")
    if not (isinstance(names, list) and len(names) == info.n_classes):
        fmt = "class_{:02d}" if data_cfg.get("kind") == "synthparts" else "class {}"
        names = [fmt.format(c) for c in range(info.n_classes)]
    return LoadedEntry(head=head, info=info, model=model, features=features, weight=weight, bias=bias,
                       checkpoint=path, checkpoint_source=source, image_size=int(S), mean=tuple(mean),
                       std=tuple(std), normalization=norm, class_names=[str(n) for n in names])


def explain_image_file(
    image_path: str | os.PathLike[str],
    *,
    registry_uri: str | os.PathLike[str],
    entry_id: str,
    out: str | os.PathLike[str],
    top: int = 3,
    storage_options: Mapping[str, Any] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
) -> Path:
    """Explain the image file ``image_path`` with registry entry ``entry_id`` and write one PNG to ``out``.

    The image is decoded (any PIL format; a missing, truncated or corrupt file raises
    :class:`~phpn_core.data.images.ImageLoadError` naming it), resized to the run's image size (bilinear, no
    aspect preservation, as the datasets do), normalised as the run's dataset was, and explained for its ``top``
    classes (:func:`explain_image`, :func:`render_image_explanation`). ``checkpoint`` overrides where the
    classifier is found (see :func:`resolve_checkpoint`); ``image_size`` overrides the run's. Returns ``out``.
    """
    from phpn_core.data.images import load_image, open_rgb

    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise InputValueError(f"top must be an int >= 1; got {top!r}. Fix: e.g. top=3.")
    image_path = Path(os.fspath(image_path))
    open_rgb(image_path)  # fail fast (ImageLoadError naming the file) before loading the model
    entry = load_entry_model(registry_uri, entry_id, storage_options=storage_options, checkpoint=checkpoint,
                             image_size=image_size)
    image, (w0, h0) = load_image(image_path, image_size=entry.image_size)
    decomposed = (entry.info.metadata or {}).get("decomposed_classes")  # None: every row was decomposed
    expl = explain_image(image, features=entry.features, head=entry.head, mean=entry.mean, std=entry.std, top=top,
                         class_names=entry.class_names, normalization=entry.normalization, device=device,
                         classes=decomposed)
    title = (f"{image_path.name} ({w0}x{h0} -> {entry.image_size}x{entry.image_size}), entry {entry_id}, "
             f"model {entry.info.model}")
    png = render_image_explanation(expl, title=title)
    out = Path(os.fspath(out))
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(png)
    tmp.replace(out)
    return out
