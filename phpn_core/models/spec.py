"""Which classifier to decompose: a small frozen spec, a safe checkpoint loader and stable digests.

- :class:`ModelSpec` names an architecture (a torchvision name, ``synthparts_cnn`` or ``timm:<name>``), a checkpoint
  (a *state dict*, never a pickled model) or torchvision weights by name (``weights="IMAGENET1K_V1"``), the number
  of classes and the input size. Frozen, unknown fields refused; built at the entry point and passed down.
- :func:`class_names_for` gives the class names that come with weights by name (``weights.meta["categories"]``).
- :func:`build_model` builds the architecture with random weights, then loads the checkpoint strictly; it returns
  the model in eval mode on the CPU.
- :func:`checkpoint_digest` is the sha256 of the checkpoint file (streamed), :func:`model_fingerprint` a short digest
  of the spec's identity (architecture, classes, input size, checkpoint *content*: moving the file changes nothing).

Checkpoints are read without unpickling arbitrary objects: ``.pt``/``.pth`` with ``torch.load(weights_only=True)``
(tensors, containers of them and plain numbers only; a file holding a whole pickled ``nn.Module`` or any other
object is refused before any of its code can run), ``.safetensors`` with safetensors. Common wrappers are
accepted: ``{"state_dict": sd, ...}`` / ``{"model": sd}`` / ``{"model_state_dict": sd}`` and a ``"module."`` prefix
on every key (``nn.DataParallel``).

Weights by name load through torchvision's own file cache, ``$TORCH_HOME/hub/checkpoints/<file name of
weights.url>`` (:func:`weights_file`), read with the same safe loader. The file is downloaded only when it is not
cached and downloads are allowed (not when ``PHPN_OFFLINE=1`` or ``build_model(..., download=False)``); offline,
the error says which file to put where. The digest of a weights-by-name model is the digest of that cached file.

``timm:<name>`` builds ``timm.create_model(name, pretrained=False, num_classes=...)`` (timm imported only then);
ViT-family models are built for ``input_size`` and a checkpoint with an ``fc_norm`` is loaded into the
``global_pool="avg"`` variant. Checkpoints: timm/Hugging Face ``.safetensors``, ``pytorch_model.bin``, a state
dict, or timm's training checkpoint (``{"state_dict": ..., "args": Namespace}``; ``argparse.Namespace`` is the one
extra type allowed when unpickling).

``checkpoint=None`` (and no weights) builds a randomly initialised model (tests, benchmarks); its digest is ``"none"``, so features
extracted from it are never mistaken for a trained model's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from phpn_core.errors import ConfigError, UnsupportedModelError
from phpn_core.storage.uri import redact

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "CheckpointError",
    "ModelSpec",
    "build_model",
    "checkpoint_digest",
    "class_names_for",
    "model_fingerprint",
    "spec_digest",
    "supported_model_archs",
    "weights_file",
]

#: File name endings accepted for checkpoints (``.bin``: Hugging Face's ``pytorch_model.bin``, a torch state dict).
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin")
SYNTHPARTS_ARCH = "synthparts_cnn"
TIMM_PREFIX = "timm:"
#: Set to 1 to forbid downloading torchvision weights that are not in the cache.
OFFLINE_ENV = "PHPN_OFFLINE"
_NO_CHECKPOINT = "none"
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_SHOW = 10  # keys listed in an error message
_DIGEST_BLOCK = 1 << 20


class CheckpointError(ConfigError):
    """A checkpoint file is missing, unreadable, not a state dict, or does not fit the architecture."""


def supported_model_archs() -> list[str]:
    """Names accepted in :attr:`ModelSpec.arch`: torchvision GAP + linear classifiers (``resnet34``,
    ``densenet121``, ``efficientnet_b0``, ``convnext_tiny``, ``swin_t``, ...), GAP VGGs (``vgg16_gap``, ...) and
    ``synthparts_cnn``. Besides these, ``"timm:<name>"`` is accepted for any model name timm knows."""
    from phpn_core.models.arch_names import supported_architectures

    return [*supported_architectures(), SYNTHPARTS_ARCH]


class ModelSpec(BaseModel):
    """The classifier to decompose. Frozen; unknown fields are refused.

    Attributes:
        arch: architecture name, one of :func:`supported_model_archs` (e.g. ``"resnet34"``, ``"vgg16_gap"``,
            ``"synthparts_cnn"``).
        checkpoint: local path to a state dict (``.pt``/``.pth`` written by ``torch.save(model.state_dict())``, or
            ``.safetensors``; for ``synthparts_cnn`` also a file from :func:`phpn_core.models.synthparts_cnn.save_model`), or None
            for random weights. Existence is checked by :func:`build_model`, not here (a config may be validated
            on another machine than the one that loads the model).
        weights: torchvision weights by enum member name (``"IMAGENET1K_V1"``, ``"DEFAULT"``) for a torchvision
            ``arch``; exclusive with ``checkpoint``. ``num_classes`` defaults to the weights' number of categories.
        num_classes: C, the classifier's outputs (>= 1); required unless ``weights`` gives it.
        input_size: side of the square input images in pixels (default 224).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    arch: str = Field(min_length=1)
    checkpoint: str | None = None
    weights: str | None = None
    num_classes: int = Field(ge=1)
    input_size: int = Field(default=224, ge=16)

    @model_validator(mode="before")
    @classmethod
    def _classes_from_weights(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or data.get("weights") is None:
            return data
        arch, name = data.get("arch"), data.get("weights")
        if not isinstance(arch, str) or not isinstance(name, str):
            return data  # the field validators report the types
        enum = _resolve_weights(arch, name)
        n = len(enum.meta.get("categories") or [])
        given = data.get("num_classes")
        if given is None:
            return {**data, "num_classes": n}
        if isinstance(given, int) and given != n:
            raise ValueError(
                f"num_classes={given} does not match weights {arch}:{name}, which classify {n} categories. Expected "
                f"num_classes={n} (or left out: it comes from the weights). Fix: drop num_classes, or use a "
                "checkpoint fine-tuned for your classes instead of weights by name"
            )
        return data

    @model_validator(mode="after")
    def _checkpoint_or_weights(self) -> ModelSpec:
        if self.weights is not None and self.checkpoint is not None:
            raise ValueError(
                f"both checkpoint={self.checkpoint!r} and weights={self.weights!r} are set: expected one source of "
                "weights. Fix: keep only one"
            )
        return self

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        if v.startswith(TIMM_PREFIX):
            _check_timm_name(v[len(TIMM_PREFIX) :])
            return v
        names = supported_model_archs()
        if v not in names:
            raise ValueError(
                f"unknown architecture {v!r}: expected one of {', '.join(names)}. Fix: use a supported name "
                "(GAP + linear classifiers only; for torchvision VGG use e.g. 'vgg16_gap'; a timm model as "
                "'timm:<name>')"
            )
        return v

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _path_to_str(cls, v: Any) -> Any:
        return os.fspath(v) if isinstance(v, os.PathLike) else v

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_path(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if not v.strip():
            raise ValueError("checkpoint is empty: expected a file path or None. Fix: pass the path or leave it out")
        if "://" in v:
            raise ValueError(
                f"checkpoint must be a local file path, got the URI {redact(v)!r}. Fix: copy the file to local disk"
            )
        if not v.lower().endswith(CHECKPOINT_SUFFIXES):
            raise ValueError(
                f"checkpoint {v!r} has an unsupported file type: expected a name ending in "
                f"{' / '.join(CHECKPOINT_SUFFIXES)}. Fix: save a state dict with torch.save(model.state_dict(), "
                "'model.pt') or safetensors"
            )
        return v


def _check_timm_name(name: str) -> None:
    if not name:
        raise ValueError("arch 'timm:' names no model: expected 'timm:<name>', e.g. 'timm:resnet50'")
    import timm  # only for timm architectures

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ValueError(
            f"timm has no model named {name!r} (timm {timm.__version__}). Expected a name from timm.list_models(); "
            f"similar: {', '.join(close) or 'none'}. Fix: correct the name after 'timm:'"
        )


def _resolve_weights(arch: str, name: str) -> Any:
    """The torchvision weights enum member ``name`` of ``arch`` (``"DEFAULT"`` resolved); ValueError otherwise."""
    if arch == SYNTHPARTS_ARCH or arch.startswith(TIMM_PREFIX) or arch.endswith("_gap"):
        why = "torchvision weights by name exist only for torchvision architectures"
        extra = (
            " (a GAP VGG's head is new: no trained weights exist for it; train it and pass model.checkpoint)"
            if arch.endswith("_gap")
            else " (timm weights come from the Hugging Face hub: download the model.safetensors and pass it as "
            "checkpoint)" if arch.startswith(TIMM_PREFIX) else ""
        )
        raise ValueError(f"weights={name!r} given for arch={arch!r}: {why}{extra}. Fix: use checkpoint instead")
    from torchvision import models as tvm

    try:
        enum = tvm.get_model_weights(arch)
    except (ValueError, KeyError):
        raise ValueError(
            f"torchvision has no weights for arch={arch!r}. Fix: use a torchvision architecture name such as "
            "'resnet50' or 'convnext_tiny', or a checkpoint"
        ) from None
    members = list(enum.__members__)
    if name not in members:
        raise ValueError(
            f"unknown weights {name!r} for {arch}: expected one of {', '.join(members)} (members of "
            f"torchvision's {enum.__name__}). Fix: use one of those names"
        )
    return enum[name]


def weights_file(spec: ModelSpec) -> Path | None:
    """Where torchvision caches ``spec.weights``: ``$TORCH_HOME/hub/checkpoints/<file name of weights.url>``
    (``torch.hub.get_dir()`` honours ``$TORCH_HOME``); None when the spec has no weights by name."""
    if spec.weights is None:
        return None
    from urllib.parse import urlparse

    enum = _resolve_weights(spec.arch, spec.weights)
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(enum.url).path)


def class_names_for(spec: ModelSpec) -> list[str] | None:
    """The class names that come with the model: ``weights.meta["categories"]`` for weights by name (e.g. the 1000
    ImageNet names, index = logit), None otherwise (the dataset names the classes)."""
    if not isinstance(spec, ModelSpec):
        raise ConfigError(f"class_names_for expects a ModelSpec, got {type(spec).__name__}. Fix: pass the spec.")
    if spec.weights is None:
        return None
    return [str(c) for c in _resolve_weights(spec.arch, spec.weights).meta.get("categories") or []]


# ----------------------------------------------------------------------------------------------------------------
# building


def build_model(spec: ModelSpec, *, download: bool | None = None) -> nn.Module:
    """Build ``spec.arch`` with random weights, load ``spec.checkpoint`` (or ``spec.weights``) strictly, return it
    in eval mode (CPU).

    Args:
        spec: the model spec.
        download: for weights by name that are not cached: download them (True), or refuse with the path to put
            the file at (False). None: download unless the environment variable ``PHPN_OFFLINE`` is ``1``.

    Raises:
        CheckpointError: the checkpoint file is missing or unreadable, is not a state dict (e.g. a pickled whole
            model: refused without running any of its code), or its keys/shapes do not fit the architecture (the
            error lists the missing and unexpected keys).
        UnsupportedModelError: the architecture cannot be built.
    """
    if not isinstance(spec, ModelSpec):
        raise ConfigError(
            f"build_model expects a ModelSpec, got {type(spec).__name__}. "
            "Fix: build one with ModelSpec(arch=..., checkpoint=..., num_classes=...)."
        )
    path = _existing_checkpoint(spec)
    if spec.weights is not None:
        path = _cached_weights(spec, download=download)
    if spec.arch == SYNTHPARTS_ARCH:
        model = _build_synthparts(spec, path)
    elif spec.arch.startswith(TIMM_PREFIX):
        model = _build_timm(spec, path)
    else:
        model = _build_torchvision(spec.arch, spec.num_classes)
        if path is not None:
            state = _read_state_dict(path)
            if spec.weights is not None and spec.arch.startswith("densenet"):
                state = _densenet_legacy_keys(state)
            _load_strict(model, state, spec, path)
    return model.eval()


def _cached_weights(spec: ModelSpec, *, download: bool | None) -> Path:
    path = weights_file(spec)
    if path is None:  # pragma: no cover - only called with spec.weights set
        raise CheckpointError(f"{spec.arch}: no weights by name in this spec. Fix: set ModelSpec.weights.")
    if path.is_file():
        return path
    if download is None:
        download = os.environ.get(OFFLINE_ENV, "").strip() not in ("1", "true", "yes")
    enum = _resolve_weights(spec.arch, spec.weights or "")
    hint = (
        f"Fix: put the file {path.name!r} (from {enum.url}) at {str(path)!r} -- torchvision's cache, "
        f"$TORCH_HOME/hub/checkpoints (TORCH_HOME={os.environ.get('TORCH_HOME', '<unset: ~/.cache/torch>')}) -- or "
        f"give model.checkpoint instead."
    )
    if not download:
        raise CheckpointError(
            f"Weights {spec.arch}:{spec.weights} are not cached and downloads are off ({OFFLINE_ENV}=1 or "
            f"download=False): expected the file {str(path)!r}, found nothing there. {hint}"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(enum.url, str(path), hash_prefix=None, progress=False)
    except Exception as e:
        raise CheckpointError(
            f"Weights {spec.arch}:{spec.weights} are not cached at {str(path)!r} and downloading {enum.url} failed "
            f"({type(e).__name__}: {redact(str(e))[:200]}); offline machines cannot download. {hint}"
        ) from None
    return path


_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _densenet_legacy_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's DenseNet files name keys 'norm.1.weight'; its loader renames them 'norm1.weight' (same here)."""
    out = {}
    for key, value in state.items():
        m = _DENSENET_KEY.match(key)
        out[m.group(1) + m.group(2) if m else key] = value
    return out


def _build_timm(spec: ModelSpec, path: Path | None) -> nn.Module:
    import timm  # only for timm architectures

    name = spec.arch[len(TIMM_PREFIX) :]
    kwargs: dict[str, Any] = {}
    state = _read_state_dict(path) if path is not None else None
    model = timm.create_model(name, pretrained=False, num_classes=spec.num_classes)
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None and tuple(size) != (spec.input_size, spec.input_size):
        kwargs["img_size"] = spec.input_size  # a patch model's grid (and pos_embed) follows the input size
    own = model.state_dict()
    if state is not None and "fc_norm.weight" in state and "fc_norm.weight" not in own and hasattr(model, "fc_norm"):
        kwargs["global_pool"] = "avg"  # the checkpoint was trained with the average-pool (fc_norm) head
    if kwargs:
        try:
            model = timm.create_model(name, pretrained=False, num_classes=spec.num_classes, **kwargs)
        except Exception as e:  # noqa: BLE001 - timm raises TypeError/AssertionError/ValueError for bad sizes
            raise UnsupportedModelError(
                f"timm {name} cannot be built with {kwargs} (for input_size={spec.input_size}): "
                f"{type(e).__name__}: {e}. Expected an input size the model's patch grid and windows accept. Fix: "
                f"set dataset.image_size to the size it was trained at ({tuple(size or ())}) or another model."
            ) from None
    if state is not None and path is not None:
        _load_strict(model, state, spec, path)
    return model


def _existing_checkpoint(spec: ModelSpec) -> Path | None:
    if spec.checkpoint is None:
        return None
    path = Path(spec.checkpoint).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise CheckpointError(
            f"Checkpoint for {spec.arch} not found: expected a state-dict file at {str(path)!r}, but it {what} "
            f"(working directory {os.getcwd()!r}). Fix: correct ModelSpec.checkpoint, or use checkpoint=None for "
            "random weights."
        )
    return path


def _build_torchvision(arch: str, num_classes: int) -> nn.Module:
    from torchvision import models as tvm

    from phpn_core.models.split import vgg_gap

    if arch.endswith("_gap"):
        return vgg_gap(arch[: -len("_gap")], num_classes=num_classes)
    builder = getattr(tvm, arch, None)
    if builder is None:  # pragma: no cover - supported_architectures() lists torchvision builders
        raise UnsupportedModelError(
            f"torchvision has no builder named {arch!r}: expected one of {', '.join(supported_model_archs())}. "
            "Fix: pin torchvision==0.29.1 or choose another architecture."
        )
    return builder(weights=None, num_classes=num_classes)


def _build_synthparts(spec: ModelSpec, path: Path | None) -> nn.Module:
    from phpn_core.models import synthparts_cnn as models

    if path is None:
        return models.SynthPartsCNN(spec.num_classes)
    if path.suffix.lower() == ".safetensors" and _is_phpn_safetensors(path):
        try:
            model = models.load_model(path)
        except Exception as e:  # a phpn file that cannot be rebuilt: corrupt or edited
            raise CheckpointError(
                f"Could not load the SynthPartsCNN checkpoint {str(path)!r}: expected a file written by "
                f"phpn_core.models.synthparts_cnn.save_model, got {type(e).__name__}: {redact(str(e))}. Fix: re-save the model."
            ) from None
        if model.n_classes != spec.num_classes:
            raise CheckpointError(
                f"Checkpoint {str(path)!r} is a SynthPartsCNN with {model.n_classes} classes, but the spec says "
                f"num_classes={spec.num_classes}. Fix: set num_classes={model.n_classes} or use the checkpoint "
                "trained for this dataset."
            )
        return model
    # A plain state dict: the width is read off the linear head ([C, width]).
    state = _read_state_dict(path)
    head = state.get("classifier.weight")
    width = int(head.shape[1]) if isinstance(head, torch.Tensor) and head.dim() == 2 else 128
    try:
        model = models.SynthPartsCNN(spec.num_classes, width=width)
    except Exception as e:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} does not describe a SynthPartsCNN: its head implies width {width} "
            f"({redact(str(e))}). Fix: use a checkpoint written by phpn_core.models.synthparts_cnn.save_model."
        ) from None
    _load_strict(model, state, spec, path)
    return model


def _is_phpn_safetensors(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(
            f"Could not read checkpoint {str(path)!r} as safetensors: got {type(e).__name__}: {redact(str(e))}. "
            "Fix: the file is probably truncated or not a safetensors file; re-save it."
        ) from None
    return str(meta.get("format", "")).startswith("phpn.SynthPartsCNN/")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` state dict in ``path`` (CPU tensors); never unpickles arbitrary objects."""
    shown = str(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(shown, device="cpu")
        except Exception as e:
            raise CheckpointError(
                f"Could not read checkpoint {shown!r} as safetensors: got {type(e).__name__}: {redact(str(e))}. "
                "Fix: the file is probably truncated or not a safetensors file; re-save it."
            ) from None
    else:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):  # timm's train.py saves its args
                obj = torch.load(shown, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # weights_only refuses any global outside torch's allow-list *before* calling it: nothing has run.
            first = redact(str(e).strip().splitlines()[0]) if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"Refused checkpoint {shown!r}: only state dicts are accepted (tensors in a dict, loaded with "
                f"torch.load(weights_only=True)), but the file holds pickled Python objects (torch says: {first}). "
                "This is typically a whole model saved with torch.save(model); loading it would run arbitrary code. "
                "Fix: in a trusted environment, re-save it with torch.save(model.state_dict(), path) or as "
                ".safetensors."
            ) from None
        except Exception as e:
            raise CheckpointError(
                f"Could not read checkpoint {shown!r}: expected a file written by torch.save(state_dict), got "
                f"{type(e).__name__}: {redact(str(e))}. Fix: the file is probably truncated or of another format; "
                "re-save it."
            ) from None
    return _unwrap_state_dict(obj, shown)


def _unwrap_state_dict(obj: Any, shown: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:  # {"state_dict": sd, "epoch": 3, ...} as training loops save it
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"Checkpoint {shown!r} is not a state dict: expected a non-empty dict of name -> tensor, got "
            f"{type(obj).__name__}{' (empty)' if isinstance(obj, Mapping) else ''}. Fix: save model.state_dict()."
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"Checkpoint {shown!r} is not a plain state dict: expected name -> tensor entries, got non-tensor "
            f"entries {[str(k) for k in bad[:_SHOW]]}. Fix: save model.state_dict() (or wrap it as "
            "{'state_dict': model.state_dict()})."
        )
    state = dict(obj)
    if all(k.startswith("module.") for k in state):  # saved from nn.DataParallel / DistributedDataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], spec: ModelSpec, path: Path) -> None:
    """Load ``state`` into ``model``; missing/unexpected keys or shape mismatches -> CheckpointError listing them."""
    own = model.state_dict()
    # Old checkpoints lack BatchNorm's counter; torch fills it in itself, so it is not "missing".
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} does not fit {spec.arch} (num_classes={spec.num_classes}): "
            f"{len(missing)} missing keys{_list(missing)} and {len(unexpected)} unexpected keys{_list(unexpected)}. "
            f"It is probably a checkpoint for another architecture. Fix: set ModelSpec.arch to the architecture "
            "the checkpoint was trained with, or point checkpoint to this architecture's weights."
        )
    shapes = [
        (k, tuple(state[k].shape), tuple(own[k].shape)) for k in own if k in state and state[k].shape != own[k].shape
    ]
    if shapes:
        shown = "; ".join(f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in shapes[:_SHOW])
        more = f" (and {len(shapes) - _SHOW} more)" if len(shapes) > _SHOW else ""
        # Only the head (weight [C, D], bias [C]) differs in its first dim: the class count is wrong.
        head_only = len(shapes) <= 2 and all(
            len(a) == len(b) and a[1:] == b[1:] and b[0] == spec.num_classes for _, a, b in shapes
        )
        hint = (
            f"The checkpoint has {shapes[0][1][0]} classes. Fix: set num_classes={shapes[0][1][0]}."
            if head_only
            else "Fix: use a checkpoint of this exact architecture variant."
        )
        raise CheckpointError(
            f"Checkpoint {str(path)!r} has tensors of the wrong shape for {spec.arch} "
            f"(num_classes={spec.num_classes}): {shown}{more}. {hint}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # dtype or other problems torch finds that the checks above do not
        raise CheckpointError(
            f"Could not load checkpoint {str(path)!r} into {spec.arch}: {redact(str(e))}. "
            "Fix: use a state dict saved from this architecture."
        ) from None


def _list(keys: list[str]) -> str:
    if not keys:
        return ""
    more = f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return " (" + ", ".join(keys[:_SHOW]) + more + ")"


# ----------------------------------------------------------------------------------------------------------------
# digests


def checkpoint_digest(path: str | os.PathLike[str] | None) -> str:
    """sha256 hex digest (64 chars) of the checkpoint file's bytes, read in 1 MiB blocks; ``"none"`` for None."""
    if path is None:
        return _NO_CHECKPOINT
    p = Path(os.fspath(path)).expanduser()
    h = hashlib.sha256()
    try:
        with open(p, "rb") as f:
            while block := f.read(_DIGEST_BLOCK):
                h.update(block)
    except OSError as e:
        raise CheckpointError(
            f"Could not read checkpoint {str(p)!r} to digest it: {type(e).__name__}: {e.strerror or e}. "
            "Fix: check that the file exists and is readable."
        ) from None
    return h.hexdigest()


def spec_digest(spec: ModelSpec) -> str:
    """The digest of the spec's weights: of ``spec.checkpoint``, or of the cached weights-by-name file
    (:func:`weights_file`); ``"none"`` for random weights. A weights file that is not cached raises CheckpointError
    saying where to put it."""
    if spec.weights is None:
        return checkpoint_digest(spec.checkpoint)
    path = weights_file(spec)
    if path is None or not path.is_file():
        return checkpoint_digest(_cached_weights(spec, download=False))
    return checkpoint_digest(path)


def model_fingerprint(spec: ModelSpec) -> str:
    """A short stable digest (16 hex chars) of the model's identity: arch, num_classes, input_size and the
    checkpoint's content digest (not its path; for weights by name, the cached file's digest)."""
    if not isinstance(spec, ModelSpec):
        raise ConfigError(f"model_fingerprint expects a ModelSpec, got {type(spec).__name__}. Fix: pass the spec.")
    ident = {
        "arch": spec.arch,
        "num_classes": spec.num_classes,
        "input_size": spec.input_size,
        "checkpoint_digest": spec_digest(spec),
    }
    blob = json.dumps(ident, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
