"""The registry's object formats and the checks on what goes in: entry ids, pointers (:class:`EntryInfo`),
safetensors objects and their metadata. No I/O: :mod:`phpn_core.storage.registry` reads and writes them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from phpn_core.errors import InputValueError, ShapeError, StoreError
from phpn_core.storage.uri import redact, safe_join

__all__ = [
    "ARRAY_NAMES",
    "ENTRY_FORMAT",
    "EntryInfo",
    "ObjectRef",
    "REQUIRED_TENSORS",
    "RegistryError",
    "decomposition_tensors",
]

ENTRY_FORMAT = "phpn.registry.entry/1"
CLASS_FORMAT = "phpn.registry.class/1"
ARRAYS_FORMAT = "phpn.registry.arrays/1"
HEAD_OBJECT = "head.safetensors"
ARRAYS_OBJECT = "arrays.safetensors"
METRICS_OBJECT = "metrics.json"  # optional: the run's evaluation of this version (record_metrics)
# A ProtoPNet baseline entry (kind "protopnet"): the whole trained network and its push record, one object.
PROTOPNET_OBJECT = "protopnet.safetensors"
PROTOPNET_FORMAT = "phpn.registry.protopnet/1"
ENTRY_KINDS = ("phpn", "protopnet")

# Per-class tensors that write_classes requires: name -> number of dimensions after the class dimension
# (prototypes [n, k, D] -> 2, alpha [n, k] -> 1, rel_error [n] -> 0). Any other name is a diagnostic [n].
REQUIRED_TENSORS: dict[str, int] = {
    "prototypes": 2,
    "initial": 2,
    "alpha": 1,
    "residual": 2,
    "rel_error": 0,
    "head_error": 0,
}
# What arrays.safetensors holds besides the diagnostics.
ARRAY_NAMES = ("initial", "alpha", "residual", "rel_error", "head_error")

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,199}$")
SLUG_ID_RE = re.compile(r"^(?P<model>.+?)--(?P<dataset>.+?)--k(?P<k>[0-9]+)--(?P<digest>[a-z0-9]{12})$")
_DIGEST_RE = re.compile(r"^(?:[A-Za-z0-9_\-]+:)?(?P<hex>[A-Za-z0-9]{12,})$")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,99}$")
CLASS_FILE_RE = re.compile(r"^class-(?P<c>[0-9]+)\.safetensors$")
VERSION_RE = re.compile(r"^[0-9a-f]{32}$")
_SLUG_MAX = 48
MAX_REQUESTS = 16  # concurrent object requests of one call on S3 (staging and gathering many classes)


class RegistryError(StoreError):
    """The prototype registry could not be read or written, or holds something other than what was asked for."""


def phpn_version() -> str:
    try:
        from importlib.metadata import version

        return version("phpn")
    except Exception:  # not installed (a source checkout on sys.path)
        from phpn_core import __version__

        return __version__


class ObjectRef(BaseModel):
    """A data object the pointer names: its sha256 (hex) and size in bytes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class EntryInfo(BaseModel):
    """One published entry: the content of its pointer ``entries/<entry_id>.json``.

    Identity: ``model``, ``dataset``, ``k``, ``config_digest`` (the entry id is derived from them). Shapes:
    ``n_classes`` = C, ``k``, ``D`` (prototypes ``[C, k, D]``), ``dtype`` of the prototypes. ``version`` names the
    data under ``objects/<entry_id>/<version>/``; ``objects`` maps each data object's file name to its sha256 and
    size. ``diagnostics`` lists the diagnostic arrays (``[C]`` each) in ``arrays.safetensors``.
    ``max_head_error`` / ``mean_rel_error`` summarise the per-class errors. ``kind`` is ``"phpn"`` (a decomposed
    head: ``head.safetensors`` + ``arrays.safetensors``) or ``"protopnet"`` (an ante-hoc ProtoPNet baseline trained
    on the same trunk and data: ``protopnet.safetensors``; ``k`` is its prototypes per class, ``D`` their length).
    ``metadata`` is the publisher's
    (redacted) JSON: by convention ``{"config": {...}, "provenance": {"feature_store": uri, "fingerprint": ...}}``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    format: Literal["phpn.registry.entry/1"] = ENTRY_FORMAT
    kind: Literal["phpn", "protopnet"] = "phpn"
    entry_id: str = Field(pattern=ID_RE.pattern)
    version: str = Field(pattern=VERSION_RE.pattern)
    created: str
    model: str = Field(min_length=1)
    dataset: str = Field(min_length=1)
    k: int = Field(ge=1)
    config_digest: str = Field(min_length=1)
    n_classes: int = Field(ge=1)
    D: int = Field(ge=1)
    dtype: str
    diagnostics: list[str] = Field(default_factory=list)
    max_head_error: float | None = None
    mean_rel_error: float | None = None
    phpn_version: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    objects: dict[Literal["head.safetensors", "arrays.safetensors", "protopnet.safetensors"], ObjectRef]


# helpers


def decomposition_tensors(decomposition: Any) -> dict[str, torch.Tensor]:
    """The ``tensors`` argument of :meth:`PrototypeRegistry.write_classes` for a
    :class:`~phpn_core.method.decompose.HeadDecomposition` (stage with ``classes=decomposition.classes``)."""
    out = {n: getattr(decomposition, n) for n in REQUIRED_TENSORS}
    for name, v in (decomposition.diagnostics or {}).items():
        out[name] = v if isinstance(v, torch.Tensor) else torch.as_tensor(v)
    return out


def serialize(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    from safetensors.torch import save as st_save

    return st_save({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, metadata=dict(metadata))


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (its JSON header), without reading the tensors."""
    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes is too short for a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8 or n > 100_000_000:
        raise ValueError("the header length is out of range (not a safetensors file)")
    header = json.loads(data[8 : 8 + n])
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}


def stack(
    per_class: list[dict[str, torch.Tensor]], idx: list[int], entry_id: str, uri: str
) -> dict[str, torch.Tensor]:
    if not per_class:
        return {}
    ref = per_class[0]
    sig = {n: (tuple(t.shape), t.dtype) for n, t in ref.items()}
    odd = [c for c, d in zip(idx, per_class) if {n: (tuple(t.shape), t.dtype) for n, t in d.items()} != sig]
    if odd:
        other = per_class[idx.index(odd[0])]
        raise RegistryError(
            f"Staged classes of entry {entry_id!r} in the registry at {uri} disagree: expected every class like "
            f"class {idx[0]} ({fmt_sig(sig)}), got classes {fmt_classes(odd)} different (e.g. class {odd[0]}: "
            f"{fmt_sig({n: (tuple(t.shape), t.dtype) for n, t in other.items()})}). They come from different runs. "
            "Fix: drop_staged the odd classes (or clear_staged) and recompute them with one configuration."
        )
    return {n: torch.stack([d[n] for d in per_class]) for n in ref}


def fmt_sig(sig: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> str:
    return ", ".join(f"{n} {list(s)} {str(dt).removeprefix('torch.')}" for n, (s, dt) in sorted(sig.items()))


def class_file(c: int) -> str:
    return f"class-{c:05d}.safetensors"


def check_id(entry_id: Any) -> str:
    """Refuse (InputValueError, before any I/O) anything but one plain name: no '/', '..', absolute paths."""
    if not isinstance(entry_id, str):
        raise InputValueError(
            f"Entry id has the wrong type: expected a str, got {type(entry_id).__name__}. "
            "Fix: use PrototypeRegistry.entry_id(model, dataset, k, config_digest)."
        )
    safe_join("/registry", entry_id)  # the shared refusal of '..', '/x', '~', URIs, control characters, ''
    if not ID_RE.match(entry_id):
        raise InputValueError(
            f"Entry id {redact(entry_id)!r} is not a plain name: expected 1-200 characters of letters, digits, '.', "
            "'_' and '-' starting with a letter or digit (no '/' or path components). "
            "Fix: use PrototypeRegistry.entry_id(model, dataset, k, config_digest)."
        )
    return entry_id


def slug(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise InputValueError(f"{name} must be a str, got {type(value).__name__}. Fix: pass its name, e.g. 'resnet34'.")
    s = re.sub(r"[^a-z0-9._]+", "-", value.lower())
    s = re.sub(r"-{2,}", "-", s).strip("-._")[:_SLUG_MAX].strip("-._")
    if not s:
        raise InputValueError(
            f"{name} {redact(value)!r} has no letters or digits: expected a name such as 'resnet34' or 'cub200'. "
            f"Fix: pass a descriptive {name} name."
        )
    return s


def digest12(config_digest: Any) -> str:
    m = _DIGEST_RE.match(config_digest) if isinstance(config_digest, str) else None
    if m is None:
        got = redact(config_digest) if isinstance(config_digest, str) else type(config_digest).__name__
        raise InputValueError(
            f"config_digest is invalid: expected a digest of at least 12 letters/digits, optionally prefixed with "
            f"'<algorithm>:' (e.g. a sha256 hex digest), got {got!r}. Fix: pass the configuration's digest."
        )
    return m.group("hex")[:12].lower()


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputValueError(f"k must be an int >= 1 (prototypes per class), got {k!r}. Fix: pass e.g. k=10.")
    return int(k)


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__") or int(value) < 1:
        raise InputValueError(f"{name} must be an int >= 1, got {value!r}. Fix: pass the head's number of classes.")
    return int(value)


def check_classes(classes: Any, name: str) -> list[int]:
    if isinstance(classes, torch.Tensor):
        classes = classes.tolist()
    if isinstance(classes, (str, bytes, Mapping)) or not hasattr(classes, "__iter__"):
        raise InputValueError(
            f"{name} must be a list of class indices, got {type(classes).__name__}. Fix: pass e.g. [0, 1]."
        )
    out = []
    for c in classes:
        if isinstance(c, bool) or not hasattr(c, "__index__") or int(c) < 0:
            raise InputValueError(
                f"{name} must hold class indices (ints >= 0), got {c!r}. Fix: pass the head rows, e.g. [0, 1, 2]."
            )
        out.append(int(c))
    if not out:
        raise InputValueError(f"{name} is empty: expected at least one class index. Fix: pass the classes to use.")
    if len(set(out)) != len(out):
        dup = sorted({c for c in out if out.count(c) > 1})
        raise InputValueError(
            f"{name} must be distinct: got {fmt_classes(dup)} more than once. Fix: list each class once."
        )
    return out


def check_tensors(tensors: Any, n: int) -> tuple[int, int, dict[str, torch.Tensor]]:
    """Validate write_classes' tensors for ``n`` classes; returns ``(k, D, {name: cpu tensor})``."""
    if not isinstance(tensors, Mapping):
        raise InputValueError(
            f"tensors must be a dict of name -> tensor, got {type(tensors).__name__}. "
            "Fix: pass {'prototypes': ..., 'initial': ..., ...} (decomposition_tensors(hd) builds it)."
        )
    absent = [name for name in REQUIRED_TENSORS if name not in tensors]
    if absent:
        raise InputValueError(
            f"tensors lack {absent}: expected {list(REQUIRED_TENSORS)} (plus optional diagnostics [n]), got "
            f"{sorted(map(str, tensors))}. Fix: pass every required array (decomposition_tensors(hd) builds them)."
        )
    for name, t in tensors.items():
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise InputValueError(
                f"tensor name {name!r} is invalid: expected a word of letters, digits, '_' or '.' starting with a "
                "letter or '_'. Fix: rename the diagnostic."
            )
        if not isinstance(t, torch.Tensor):
            raise InputValueError(
                f"tensors[{name!r}] must be a torch.Tensor, got {type(t).__name__}. Fix: torch.as_tensor it."
            )
    p = tensors["prototypes"]
    if p.ndim != 3 or p.shape[0] != n or p.shape[1] < 1 or p.shape[2] < 1:
        raise ShapeError(
            f"tensors['prototypes'] has the wrong shape: expected [n, k, D] with n = len(classes) = {n}, got "
            f"{list(p.shape)}. Fix: stack the classes' prototypes in the order of classes."
        )
    _, k, D = p.shape
    out = {}
    for name, t in tensors.items():
        if name in REQUIRED_TENSORS:
            want = [n, k, D][: 1 + REQUIRED_TENSORS[name]]
            if list(t.shape) != want:
                raise ShapeError(
                    f"tensors[{name!r}] has the wrong shape: expected {want} (n = len(classes), k, D from "
                    f"prototypes {list(p.shape)}), got {list(t.shape)}. Fix: pass it for the same classes, in order."
                )
            if not t.is_floating_point():
                raise InputValueError(f"tensors[{name!r}] must be float, got {t.dtype}. Fix: convert it to float32.")
            if not bool(torch.isfinite(t).all()):
                raise InputValueError(
                    f"tensors[{name!r}] holds NaN/inf: expected finite values, got "
                    f"{int((~torch.isfinite(t)).sum())} non-finite. Fix: check the decomposition of those classes."
                )
        else:
            if list(t.shape) != [n]:
                raise ShapeError(
                    f"diagnostic tensors[{name!r}] has the wrong shape: expected [n] = [{n}] (one value per class), "
                    f"got {list(t.shape)}. Fix: reduce it to one number per class."
                )
            if t.is_complex():
                raise InputValueError(
                    f"diagnostic tensors[{name!r}] is complex ({t.dtype}): expected real numbers or bools. "
                    "Fix: store its magnitude or real part."
                )
        out[name] = t.detach().to("cpu")
    return int(k), int(D), out


def check_bias(bias: Any, C: int) -> torch.Tensor:
    if bias is None:
        return torch.zeros(C)
    if not isinstance(bias, torch.Tensor):
        raise InputValueError(
            f"bias must be a torch.Tensor [C] or None, got {type(bias).__name__}. Fix: torch.as_tensor it."
        )
    if bias.shape != (C,):
        raise ShapeError(
            f"bias has the wrong shape: expected [C] = [{C}] (n_classes), got {list(bias.shape)}. "
            "Fix: pass the classifier's bias vector, or None for no bias."
        )
    if not bias.is_floating_point() or not bool(torch.isfinite(bias).all()):
        raise InputValueError(
            f"bias must hold finite floats: expected a float tensor [C] without NaN/inf, got dtype {bias.dtype}"
            + ("" if not bias.is_floating_point() else f" with {int((~torch.isfinite(bias)).sum())} non-finite values")
            + ". Fix: pass the classifier's bias as float32 (or None for no bias)."
        )
    return bias.detach().to("cpu")


def check_json(value: Any, where: str) -> None:
    """Refuse anything that does not survive a JSON round trip (naming where it is, never its value)."""
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InputValueError(
                f"{where} is {value!r}: JSON has no NaN or infinity. Fix: store None or a string instead."
            )
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise InputValueError(
                    f"{where} has a key of type {type(k).__name__}: JSON objects need str keys. "
                    "Fix: convert the keys to strings."
                )
            check_json(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_json(v, f"{where}[{i}]")
        return
    raise InputValueError(
        f"{where} is not JSON-serialisable: expected str, int, float, bool, None, list or dict with str keys, got "
        f"{type(value).__name__}. Fix: convert it (e.g. config.model_dump(mode='json'), tensor.tolist(), str(path))."
    )


def fmt_classes(classes: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``'0-2, 5, 7-8'`` (at most 20 runs, then '...')."""
    xs = sorted(set(int(c) for c in classes))
    runs: list[str] = []
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        runs.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ", ".join(runs[:20]) + (f", ... ({len(runs) - 20} more runs)" if len(runs) > 20 else "")


def brief(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= 300 else text[:300] + "..."


def mtime(info: Mapping[str, Any]) -> float:
    for key in ("mtime", "LastModified", "last_modified", "created"):
        v = info.get(key)
        if isinstance(v, datetime):
            return v.timestamp()
        if isinstance(v, (int, float)):
            return float(v)
    return 0.0  # unknown: treated as old
