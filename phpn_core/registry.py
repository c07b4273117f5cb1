"""Prototype registry: decomposed heads, published as immutable versions behind one pointer per entry.

A registry lives at a local path or an ``s3://bucket/prefix`` URI (the same code through fsspec; see
:mod:`phpn_core.uri`). An *entry* is one decomposition, keyed by ``(model, dataset, k, config_digest)`` and named
by :meth:`PrototypeRegistry.entry_id` (``resnet34--cub200--k10--0123456789ab``).

Layout (``C`` classes, ``k`` prototypes per class, ``D`` channels)::

    staging/<entry_id>/class-00042.safetensors   one object per class, written by the distributed tasks:
                                                 prototypes/initial/residual [k, D], alpha [k], rel_error [],
                                                 head_error [], diagnostics [] (class c's slice of each)
    objects/<entry_id>/<version>/head.safetensors    prototypes [C, k, D], bias [C], signs [C, k] = sign(alpha)
                                                     (PartPrototypeHead.save's format)
    objects/<entry_id>/<version>/arrays.safetensors  initial/residual [C, k, D], alpha [C, k], rel_error [C],
                                                     head_error [C], diagnostics [C]
    entries/<entry_id>.json                      the pointer: EntryInfo (identity, shapes, metadata, the version
                                                 and the sha256 and size of both data objects)

Guarantees:

- Every object is written whole or not at all: locally a temporary file in the same folder then ``os.replace``;
  on S3 a single PUT (or a multipart upload, which S3 also makes visible only when complete). An interrupted task
  leaves each class either staged completely or not at all; :meth:`~PrototypeRegistry.staged_classes` says which,
  so a resumed run recomputes only the missing ones.
- :meth:`~PrototypeRegistry.publish` writes the data under a fresh version (a uuid) and the pointer *last*.
  Readers only follow pointers, so they see no entry or a complete one, never a half-written one. The pointer
  records the sha256 of each data object and readers verify it (a corrupt or swapped object is refused).
- There is no shared index: publishers of different entries touch disjoint objects;
  :meth:`~PrototypeRegistry.entries` lists ``entries/*.json``. Two publishers of the same entry each write a
  complete version; the last pointer written wins and names one version whole. Superseded versions stay until
  :meth:`~PrototypeRegistry.prune` or :meth:`~PrototypeRegistry.delete`.
- Loading never unpickles: every data object is safetensors. Entry ids are refused before any I/O unless they are
  one plain name (:func:`phpn_core.uri.safe_join`); locally, a path that resolves outside the root through a
  symbolic link is refused too. Metadata must be JSON and is stored redacted
  (:func:`phpn_core.uri.redact`): credentials never reach the registry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from functools import cached_property
from typing import Any, Literal

import fsspec
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from phpn_core.errors import InputValueError, PhpnError, ShapeError, StoreError
from phpn_core.head import PartPrototypeHead
from phpn_core.uri import StorageLocation, parse_uri, redact, resolve_storage_options, safe_join

__all__ = [
    "ARRAY_NAMES",
    "ENTRY_FORMAT",
    "EntryInfo",
    "ObjectRef",
    "PrototypeRegistry",
    "REQUIRED_TENSORS",
    "RegistryError",
    "decomposition_tensors",
]

ENTRY_FORMAT = "phpn.registry.entry/1"
_CLASS_FORMAT = "phpn.registry.class/1"
_ARRAYS_FORMAT = "phpn.registry.arrays/1"
HEAD_OBJECT = "head.safetensors"
ARRAYS_OBJECT = "arrays.safetensors"

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

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,199}$")
_SLUG_ID_RE = re.compile(r"^(?P<model>.+?)--(?P<dataset>.+?)--k(?P<k>[0-9]+)--(?P<digest>[a-z0-9]{12})$")
_DIGEST_RE = re.compile(r"^(?:[A-Za-z0-9_\-]+:)?(?P<hex>[A-Za-z0-9]{12,})$")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,99}$")
_CLASS_FILE_RE = re.compile(r"^class-(?P<c>[0-9]+)\.safetensors$")
_VERSION_RE = re.compile(r"^[0-9a-f]{32}$")
_SLUG_MAX = 48
_MAX_REQUESTS = 16  # concurrent object requests of one call on S3 (staging and gathering many classes)


class RegistryError(StoreError):
    """The prototype registry could not be read or written, or holds something other than what was asked for."""


def _phpn_version() -> str:
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
    ``max_head_error`` / ``mean_rel_error`` summarise the per-class errors. ``metadata`` is the publisher's
    (redacted) JSON: by convention ``{"config": {...}, "provenance": {"feature_store": uri, "fingerprint": ...}}``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    format: Literal["phpn.registry.entry/1"] = ENTRY_FORMAT
    entry_id: str = Field(pattern=_ID_RE.pattern)
    version: str = Field(pattern=_VERSION_RE.pattern)
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
    objects: dict[Literal["head.safetensors", "arrays.safetensors"], ObjectRef]


# ------------------------------------------------------------------------------------------------------------------


class PrototypeRegistry:
    """A registry of decomposed heads at a local path or ``s3://bucket/prefix``; see the module docstring.

    ``storage_options`` are s3fs options (None: from the environment; see
    :func:`phpn_core.uri.resolve_storage_options`, which bounds timeouts and retries). Nothing is read or written
    until a method needs it, so constructing a registry never fails on a dead endpoint. Safe to use from many
    threads and processes at once (see the module docstring for what concurrent writers may do).

    Workflow: tasks call :meth:`write_classes` for their classes (check :meth:`staged_classes` to resume); one
    gather calls :meth:`publish`; readers call :meth:`entries`, :meth:`info`, :meth:`load`, :meth:`load_arrays`.
    """

    def __init__(self, uri: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None) -> None:
        self._loc: StorageLocation = parse_uri(uri)
        opts = resolve_storage_options(uri, storage_options)
        if opts is not None:
            # Other processes write here: a cached listing would hide their classes and entries.
            opts["use_listings_cache"] = False
        self._options = opts
        self._secrets = _secrets_of(opts)

    # -- description ---------------------------------------------------------------------------------------------

    @property
    def uri(self) -> str:
        """The registry's canonical URI, with any credentials redacted."""
        return redact(self._loc.url, secrets=self._secrets)

    def __repr__(self) -> str:
        return f"PrototypeRegistry(uri={self.uri!r})"

    @staticmethod
    def entry_id(model: str, dataset: str, k: int, config_digest: str) -> str:
        """The entry id for ``(model, dataset, k, config_digest)``: ``<model>--<dataset>--k<k>--<digest12>``.

        ``model`` and ``dataset`` are slugged (lowercase; runs of characters other than ``a-z 0-9 . _`` become one
        ``-``; at most 48 characters). ``config_digest`` is a hex (or alphanumeric) digest of at least 12 characters,
        optionally prefixed with ``"<algorithm>:"``; its first 12 characters (lowercased) are used. The id is one
        plain path component. E.g. ``entry_id("ResNet-34", "CUB-200", 10, "sha256:0123456789abcdef...")`` ->
        ``"resnet-34--cub-200--k10--0123456789ab"``.
        """
        m_slug = _slug(model, "model")
        d_slug = _slug(dataset, "dataset")
        k = _check_k(k)
        digest = _digest12(config_digest)
        return _check_id(f"{m_slug}--{d_slug}--k{k}--{digest}")

    # -- staging -------------------------------------------------------------------------------------------------

    def write_classes(
        self, entry_id: str, classes: Sequence[int], tensors: Mapping[str, torch.Tensor]
    ) -> list[str]:
        """Stage some classes' results: one object ``staging/<entry_id>/class-<c:05d>.safetensors`` per class.

        ``classes`` are ``n`` distinct class indices >= 0; ``tensors`` holds, for those classes in that order,
        ``prototypes [n, k, D]``, ``initial [n, k, D]``, ``alpha [n, k]``, ``residual [n, k, D]``,
        ``rel_error [n]``, ``head_error [n]`` (float, finite) and any diagnostics ``[n]`` (numbers or bools, under
        names like ``"n_iter"``). Tensors may live on any device; they are not modified. Each class is written
        atomically (rewriting a staged class replaces it whole). Returns the written objects' URIs.
        """
        root = self._staging_dir(entry_id)
        idx = _check_classes(classes, "classes")
        k, D, arrays = _check_tensors(tensors, len(idx))

        def write_one(pos: int) -> str:
            c = idx[pos]
            per_class = {name: t[pos].clone() for name, t in arrays.items()}  # independent, contiguous slices
            meta = {"format": _CLASS_FORMAT, "entry_id": entry_id, "class": str(c), "k": str(k), "D": str(D)}
            path = safe_join(root, _class_file(c))
            self._put(path, _serialize(per_class, meta), f"stage class {c} of entry {entry_id!r} in")
            return redact(path, secrets=self._secrets)

        return self._map(write_one, range(len(idx)))

    def staged_classes(self, entry_id: str) -> set[int]:
        """The classes of ``entry_id`` that are completely staged (an interrupted write is not among them)."""
        root = self._staging_dir(entry_id)
        out = set()
        for name in self._ls_names(root, f"list the staged classes of entry {entry_id!r} in"):
            m = _CLASS_FILE_RE.match(name)
            if m:
                out.add(int(m.group("c")))
        return out

    def read_staged(self, entry_id: str, classes: Sequence[int]) -> dict[str, torch.Tensor]:
        """The staged tensors of ``classes`` (``n`` of them), stacked in that order: ``prototypes [n, k, D]``,
        ``initial [n, k, D]``, ``alpha [n, k]``, ``residual [n, k, D]``, ``rel_error [n]``, ``head_error [n]`` and
        the diagnostics ``[n]``, on the CPU. Raises RegistryError when some are not staged or the staged classes
        disagree (shapes, dtypes, names)."""
        root = self._staging_dir(entry_id)
        idx = _check_classes(classes, "classes")
        blobs = self._map(
            lambda c: self._cat(safe_join(root, _class_file(c)), f"read staged class {c} of entry {entry_id!r} from"),
            idx,
        )
        missing = [c for c, data in zip(idx, blobs) if data is None]
        if missing:
            raise RegistryError(
                f"Entry {entry_id!r} in the registry at {self.uri} lacks staged classes: expected "
                f"{_fmt_classes(idx)} staged, got {len(missing)} missing: {_fmt_classes(missing)}. "
                "Fix: compute and stage them with write_classes (staged_classes tells which are there)."
            )
        per_class = [self._parse_class(data, entry_id, c) for c, data in zip(idx, blobs)]
        return _stack(per_class, idx, entry_id, self.uri)

    def drop_staged(self, entry_id: str, c: int) -> bool:
        """Remove class ``c``'s staged object (to recompute it). Returns whether it was there."""
        root = self._staging_dir(entry_id)
        (c,) = _check_classes([c], "c")
        return self._rm(safe_join(root, _class_file(c)), f"drop staged class {c} of entry {entry_id!r} from")

    def clear_staged(self, entry_id: str) -> int:
        """Remove all of ``entry_id``'s staged classes (e.g. once it is published). Returns how many there were."""
        root = self._staging_dir(entry_id)
        n = len(self.staged_classes(entry_id))
        self._rm(root, f"clear the staging of entry {entry_id!r} in", recursive=True)
        return n

    # -- publishing ----------------------------------------------------------------------------------------------

    def publish(
        self,
        entry_id: str,
        *,
        n_classes: int,
        bias: torch.Tensor | None,
        metadata: Mapping[str, Any] | None = None,
        model: str | None = None,
        dataset: str | None = None,
        config_digest: str | None = None,
    ) -> EntryInfo:
        """Gather the staged classes ``0..C-1`` of ``entry_id`` (C = ``n_classes``) into a new version and point
        the entry at it. Returns the new :class:`EntryInfo`.

        ``bias [C]`` is the classifier's bias (None: zeros); it is cast to the prototypes' dtype. ``metadata`` is
        JSON (str keys; str, int, finite float, bool, None, lists, dicts), by convention
        ``{"config": ..., "provenance": {"feature_store": uri, "fingerprint": ...}}``; it is stored redacted.
        ``model`` / ``dataset`` / ``config_digest`` are the entry's identity; they must give ``entry_id`` (with the
        staged k). Left out, they are read back from the id (slugs and the 12-character digest prefix).

        Writes ``objects/<entry_id>/<version>/{head,arrays}.safetensors``, then the pointer
        ``entries/<entry_id>.json`` last: until then readers see the previous state. Staged classes are kept
        (call :meth:`clear_staged` when done). Raises RegistryError when classes are missing (listing them) or
        staged beyond ``C``, InputValueError for bad arguments.
        """
        _check_id(entry_id)  # before anything else, I/O included
        C = _check_positive_int("n_classes", n_classes)
        bias_t = _check_bias(bias, C)
        meta = self._clean_metadata(metadata)
        ident_given = (model, dataset, config_digest)
        if any(v is not None for v in ident_given) and any(v is None for v in ident_given):
            raise InputValueError(
                "publish: model, dataset and config_digest go together: expected all three or none, got "
                f"model={model!r}, dataset={dataset!r}, config_digest={'given' if config_digest else None!r}. "
                "Fix: pass all three (recommended), or none to take them from the entry id."
            )

        staged = self.staged_classes(entry_id)
        missing = sorted(set(range(C)) - staged)
        extra = sorted(c for c in staged if c >= C)
        if missing:
            raise RegistryError(
                f"Cannot publish entry {entry_id!r} in the registry at {self.uri}: expected all classes 0..{C - 1} "
                f"staged, got {len(missing)} missing: {_fmt_classes(missing)}. Fix: compute and stage them with "
                "write_classes (the pipeline's resume recomputes exactly these), then publish again."
            )
        if extra:
            raise RegistryError(
                f"Cannot publish entry {entry_id!r} in the registry at {self.uri}: expected classes 0..{C - 1} "
                f"(n_classes={C}), got staged classes beyond that: {_fmt_classes(extra)}. Fix: check n_classes, or "
                "remove the stray classes with drop_staged / clear_staged."
            )
        arrays = self.read_staged(entry_id, list(range(C)))
        prototypes, alpha = arrays["prototypes"], arrays["alpha"]
        _, k, D = prototypes.shape

        if model is not None:
            want = self.entry_id(model, dataset, k, config_digest)
            if want != entry_id:
                raise InputValueError(
                    f"publish: the identity does not match the entry id: model={model!r}, dataset={dataset!r}, "
                    f"k={k} (staged), config_digest={_digest12(config_digest)}... give {want!r}, got entry id "
                    f"{entry_id!r}. Fix: publish under PrototypeRegistry.entry_id(model, dataset, k, config_digest)."
                )
            ident = {"model": model, "dataset": dataset, "config_digest": config_digest}
        else:
            m = _SLUG_ID_RE.match(entry_id)
            if m is None:
                raise InputValueError(
                    f"publish: cannot read model, dataset, k and digest back from entry id {entry_id!r}: expected "
                    "'<model>--<dataset>--k<k>--<digest12>' as PrototypeRegistry.entry_id makes. Fix: pass "
                    "model=, dataset= and config_digest= to publish."
                )
            if int(m.group("k")) != k:
                raise RegistryError(
                    f"Cannot publish entry {entry_id!r}: its id says k={m.group('k')}, the staged classes have "
                    f"k={k}. Fix: stage results computed with k={m.group('k')} (clear_staged, then recompute)."
                )
            ident = {"model": m.group("model"), "dataset": m.group("dataset"), "config_digest": m.group("digest")}

        version = uuid.uuid4().hex
        bias_t = bias_t.to(prototypes.dtype)
        head = PartPrototypeHead(prototypes, bias_t, signs=torch.sign(alpha))
        with tempfile.TemporaryDirectory(prefix="phpn-registry-") as tmp:
            path = os.path.join(tmp, HEAD_OBJECT)
            head.save(path, metadata={"entry_id": entry_id, "version": version})
            with open(path, "rb") as f:
                head_bytes = f.read()
        diagnostics = sorted(n for n in arrays if n not in REQUIRED_TENSORS)
        arrays_bytes = _serialize(
            {n: arrays[n] for n in (*ARRAY_NAMES, *diagnostics)},
            {"format": _ARRAYS_FORMAT, "entry_id": entry_id, "version": version,
             "diagnostics": json.dumps(diagnostics)},
        )
        vdir = self._version_dir(entry_id, version)
        objects = {}
        for name, data in ((HEAD_OBJECT, head_bytes), (ARRAYS_OBJECT, arrays_bytes)):
            self._put(safe_join(vdir, name), data, f"write {name} of entry {entry_id!r} (version {version}) to")
            objects[name] = ObjectRef(sha256=hashlib.sha256(data).hexdigest(), size=len(data))

        head_err, rel_err = arrays["head_error"].double(), arrays["rel_error"].double()
        info = EntryInfo(
            entry_id=entry_id,
            version=version,
            created=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            k=k,
            n_classes=C,
            D=D,
            dtype=str(prototypes.dtype).removeprefix("torch."),
            diagnostics=diagnostics,
            max_head_error=float(head_err.max()),
            mean_rel_error=float(rel_err.mean()),
            phpn_version=_phpn_version(),
            metadata=meta,
            objects=objects,
            **redact(ident, secrets=self._secrets),
        )
        pointer = info.model_dump_json(indent=2).encode("utf-8")
        # Last: the entry becomes visible (or moves to this version) in one atomic write.
        self._put(self._pointer(entry_id), pointer, f"write the pointer of entry {entry_id!r} to")
        return info

    # -- reading -------------------------------------------------------------------------------------------------

    def entries(self) -> list[EntryInfo]:
        """All published entries, sorted by id (each pointer read once; an entry deleted meanwhile is skipped; an
        unreadable pointer raises RegistryError naming it)."""
        return [info for info in self._map(self._read_pointer, self._entry_ids()) if info is not None]

    def exists(self, entry_id: str) -> bool:
        """True when ``entry_id`` is published (its pointer exists)."""
        path = self._contained(self._pointer(entry_id))
        with self._io(f"look up entry {entry_id!r} in"):
            try:
                self._fs.info(path)
                return True
            except FileNotFoundError:
                return False

    def info(self, entry_id: str) -> EntryInfo:
        """The pointer of ``entry_id``; RegistryError (listing a few known ids) when it is not published."""
        info = self._read_pointer(entry_id)
        if info is None:
            raise self._unknown(entry_id)
        return info

    def load(self, entry_id: str, *, device: str | torch.device = "cpu") -> tuple[PartPrototypeHead, EntryInfo]:
        """The published head of ``entry_id`` (prototypes ``[C, k, D]``, bias ``[C]``, signs ``[C, k]``) on
        ``device``, and its :class:`EntryInfo`. The object's sha256 is verified before it is parsed; nothing is
        unpickled."""
        info, data = self._read_object(entry_id, HEAD_OBJECT)
        with tempfile.TemporaryDirectory(prefix="phpn-registry-") as tmp:
            path = os.path.join(tmp, HEAD_OBJECT)
            with open(path, "wb") as f:
                f.write(data)
            try:
                head, _ = PartPrototypeHead.load(path, device=device)
            except Exception as e:
                why = f"it is not a phpn head in safetensors format ({_brief(e)})"
                raise self._corrupt(info, HEAD_OBJECT, why) from None
        want = (info.n_classes, info.k, info.D)
        if tuple(head.prototypes.shape) != want:
            raise self._corrupt(
                info, HEAD_OBJECT, f"its prototypes have shape {list(head.prototypes.shape)}, the pointer says "
                f"[C, k, D] = {list(want)}"
            )
        return head, info

    def load_arrays(self, entry_id: str, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The published per-class arrays of ``entry_id`` on ``device``: ``initial [C, k, D]``, ``alpha [C, k]``,
        ``residual [C, k, D]``, ``rel_error [C]``, ``head_error [C]`` and the diagnostics ``[C]``
        (``info.diagnostics``). The prototypes, bias and signs are in :meth:`load`'s head. sha256-verified."""
        info, data = self._read_object(entry_id, ARRAYS_OBJECT)
        try:
            from safetensors.torch import load as st_load

            arrays = st_load(data)
        except Exception as e:
            raise self._corrupt(info, ARRAYS_OBJECT, f"it is not a safetensors file ({_brief(e)})") from None
        expected = set(ARRAY_NAMES) | set(info.diagnostics)
        if set(arrays) != expected:
            raise self._corrupt(info, ARRAYS_OBJECT, f"it holds {sorted(arrays)}, expected {sorted(expected)}")
        return {n: t.to(device) for n, t in arrays.items()}

    # -- removal -------------------------------------------------------------------------------------------------

    def delete(self, entry_id: str, *, missing_ok: bool = False) -> bool:
        """Unpublish ``entry_id``: remove its pointer first (readers stop seeing it at once), then all its
        versions' objects. Staged classes are kept (:meth:`clear_staged`). Returns whether it was published;
        an unknown id raises RegistryError unless ``missing_ok``. Do not delete an entry while it is being
        published: the publisher's pointer could then name removed objects (readers get a clear RegistryError)."""
        pointer = self._pointer(entry_id)
        existed = self._rm(pointer, f"delete the pointer of entry {entry_id!r} from")
        if not existed and not missing_ok:
            raise self._unknown(entry_id)
        self._rm(self._objects_dir(entry_id), f"delete the objects of entry {entry_id!r} from", recursive=True)
        return existed

    def versions(self, entry_id: str) -> list[str]:
        """The version folders present under ``objects/<entry_id>/`` (the current one, superseded ones and any
        left by an interrupted publish), sorted."""
        names = self._ls_names(self._objects_dir(entry_id), f"list the versions of entry {entry_id!r} in")
        return sorted(n for n in names if _VERSION_RE.match(n))

    def prune(self, entry_id: str, *, min_age_s: float = 3600.0) -> list[str]:
        """Remove the versions of ``entry_id`` that its pointer does not name and whose objects are all older than
        ``min_age_s`` seconds (younger ones may belong to a publish in progress, or be read by a reader that just
        followed the previous pointer). Returns the removed versions."""
        if isinstance(min_age_s, bool) or not isinstance(min_age_s, (int, float)) or not min_age_s >= 0:
            raise InputValueError(
                f"min_age_s must be a number of seconds >= 0, got {min_age_s!r}. Fix: pass e.g. 3600."
            )
        current = self._read_pointer(entry_id)
        keep = current.version if current is not None else None
        removed = []
        now = time.time()
        for v in self.versions(entry_id):
            if v == keep:
                continue
            vdir = self._contained(self._version_dir(entry_id, v))
            with self._io(f"inspect version {v} of entry {entry_id!r} in"):
                try:
                    infos = self._fs.ls(vdir, detail=True)
                except FileNotFoundError:
                    continue
            ages = [now - _mtime(i) for i in infos]
            if ages and min(ages) >= min_age_s:
                self._rm(vdir, f"remove version {v} of entry {entry_id!r} from", recursive=True)
                removed.append(v)
        return removed

    # -- internals -----------------------------------------------------------------------------------------------

    @cached_property
    def _fs(self) -> fsspec.AbstractFileSystem:
        with self._io("connect to"):
            if self._loc.is_remote:
                return fsspec.filesystem(self._loc.scheme, **(self._options or {}))
            return fsspec.filesystem("file")

    def _staging_dir(self, entry_id: str) -> str:
        return safe_join(self._loc.url, f"staging/{_check_id(entry_id)}")

    def _objects_dir(self, entry_id: str) -> str:
        return safe_join(self._loc.url, f"objects/{_check_id(entry_id)}")

    def _version_dir(self, entry_id: str, version: str) -> str:
        if not isinstance(version, str) or not _VERSION_RE.match(version):
            raise RegistryError(
                f"Invalid version {redact(str(version))!r} in the registry at {self.uri}: expected 32 hex digits "
                "(a uuid). Fix: publish the entry again."
            )
        return safe_join(self._loc.url, f"objects/{_check_id(entry_id)}/{version}")

    def _pointer(self, entry_id: str) -> str:
        return safe_join(self._loc.url, f"entries/{_check_id(entry_id)}.json")

    def _entry_ids(self) -> list[str]:
        names = self._ls_names(safe_join(self._loc.url, "entries"), "list the entries of")
        return sorted(n[: -len(".json")] for n in names if n.endswith(".json") and _ID_RE.match(n[: -len(".json")]))

    def _read_pointer(self, entry_id: str) -> EntryInfo | None:
        path = self._pointer(entry_id)
        data = self._cat(path, f"read the pointer of entry {entry_id!r} from")
        if data is None:
            return None
        try:
            info = EntryInfo.model_validate_json(data)
        except ValidationError as e:
            raise RegistryError(
                f"The pointer of entry {entry_id!r} in the registry at {self.uri} is unreadable: expected an "
                f"{ENTRY_FORMAT} JSON document, got errors: {redact(_brief(e), secrets=self._secrets)}. "
                "Fix: publish the entry again (or delete it)."
            ) from None
        if info.entry_id != entry_id:
            raise RegistryError(
                f"The pointer entries/{entry_id}.json in the registry at {self.uri} names entry "
                f"{info.entry_id!r}: expected {entry_id!r}. It was copied or renamed by hand. Fix: delete it, or "
                "publish the entry again."
            )
        return info

    def _read_object(self, entry_id: str, name: str) -> tuple[EntryInfo, bytes]:
        """Follow the pointer and return the named data object's verified bytes. If the version vanished under us
        (a re-publish and prune in between), follow the new pointer once more."""
        for attempt in range(2):
            info = self.info(entry_id)
            path = safe_join(self._version_dir(entry_id, info.version), name)
            data = self._cat(path, f"read {name} of entry {entry_id!r} from")
            if data is not None:
                break
            if attempt == 0:
                continue
            raise RegistryError(
                f"Entry {entry_id!r} in the registry at {self.uri} is broken: its pointer names version "
                f"{info.version}, whose {name} is missing. Fix: publish the entry again (or delete it)."
            )
        ref = info.objects.get(name)
        if ref is None:
            raise self._corrupt(info, name, "the pointer records no checksum for it")
        digest = hashlib.sha256(data).hexdigest()
        if digest != ref.sha256 or len(data) != ref.size:
            raise self._corrupt(
                info, name, f"its sha256 is {digest} ({len(data)} bytes), the pointer recorded {ref.sha256} "
                f"({ref.size} bytes)"
            )
        return info, data

    def _parse_class(self, data: bytes, entry_id: str, c: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load as st_load

        def bad(why: str) -> RegistryError:
            return RegistryError(
                f"Staged class {c} of entry {entry_id!r} in the registry at {self.uri} is unusable: {why}. "
                f"Fix: drop_staged({entry_id!r}, {c}) and compute it again."
            )

        try:
            meta = _safetensors_metadata(data)
            tensors = st_load(data)
        except Exception as e:
            raise bad(f"expected a safetensors file, got an unreadable object ({_brief(e)})") from None
        if meta.get("format") != _CLASS_FORMAT:
            raise bad(f"expected format {_CLASS_FORMAT!r}, got {meta.get('format')!r}")
        if meta.get("entry_id") != entry_id or meta.get("class") != str(c):
            raise bad(
                f"expected class {c} of entry {entry_id!r}, got class {meta.get('class')!r} of entry "
                f"{meta.get('entry_id')!r}"
            )
        absent = [n for n in REQUIRED_TENSORS if n not in tensors]
        if absent:
            raise bad(f"expected tensors {list(REQUIRED_TENSORS)}, got {sorted(tensors)} ({absent} absent)")
        return tensors

    def _clean_metadata(self, metadata: Mapping[str, Any] | None) -> dict[str, Any]:
        if metadata is None:
            return {}
        if not isinstance(metadata, Mapping):
            raise InputValueError(
                f"metadata must be a dict of JSON values, got {type(metadata).__name__}. Fix: pass a dict such as "
                "{'config': cfg.model_dump(mode='json'), 'provenance': {...}}."
            )
        _check_json(metadata, "metadata")
        clean = redact(dict(metadata), secrets=self._secrets)
        return json.loads(json.dumps(clean, allow_nan=False))  # plain JSON types (tuples -> lists)

    def _unknown(self, entry_id: str) -> RegistryError:
        known = self._entry_ids()
        shown = ", ".join(repr(k) for k in known[:5]) + (f" and {len(known) - 5} more" if len(known) > 5 else "")
        return RegistryError(
            f"Unknown entry {entry_id!r} in the registry at {self.uri}: expected a published entry, got no pointer "
            f"entries/{entry_id}.json. Known entries: {shown or 'none'}. Fix: check the id "
            "(PrototypeRegistry.entry_id(model, dataset, k, config_digest)) or publish the entry first."
        )

    def _corrupt(self, info: EntryInfo, name: str, why: str) -> RegistryError:
        return RegistryError(
            f"Corrupt object {name} of entry {info.entry_id!r} (version {info.version}) in the registry at "
            f"{self.uri}: {why}. Refusing to load it. Fix: publish the entry again from its staged classes "
            "(or delete it); if it keeps happening, check the storage."
        )

    # -- I/O primitives (every failure becomes a RegistryError without credentials) ------------------------------

    @contextlib.contextmanager
    def _io(self, action: str, *, write: bool = False) -> Iterator[None]:
        try:
            yield
        except PhpnError:
            raise
        except Exception as e:
            shown = self.uri
            detail = redact(f"{type(e).__name__}: {e}", secrets=self._secrets)
            if self._loc.is_remote:
                endpoint = redact(
                    str((self._options or {}).get("endpoint_url") or "the default AWS endpoint"), secrets=self._secrets
                )
                where = f"{shown} (endpoint {endpoint})"
                fix = (
                    "check that the endpoint is up and reachable (storage_options['endpoint_url'] / "
                    f"AWS_ENDPOINT_URL), that bucket {self._loc.bucket!r} exists and that the credentials may "
                    f"{'write' if write else 'read'} it"
                )
            else:
                where = shown
                fix = f"check that the path is {'writable and the disk not full' if write else 'readable'}"
            raise RegistryError(
                f"Could not {action} the registry at {where}: expected the storage to answer, got {detail}. "
                f"Fix: {fix}."
            ) from None

    def _map(self, fn: Any, items: Any) -> list[Any]:
        """``[fn(x) for x in items]``; on S3 with up to 16 requests in flight (each call is one object)."""
        items = list(items)
        if not self._loc.is_remote or len(items) < 2:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(min(_MAX_REQUESTS, len(items))) as pool:
            return list(pool.map(fn, items))

    def _contained(self, path: str) -> str:
        """``path``, after checking that a local path resolves inside the registry's root: a symlink planted in the
        registry (``entries -> /etc``) can never make it read, write or delete outside its root. (Names are already
        plain components: :func:`safe_join`.) S3 keys have no links."""
        if self._loc.is_remote:
            return path
        root = os.path.realpath(self._loc.path)
        real = os.path.realpath(path)
        if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
            raise RegistryError(
                f"Refusing to use {path!r} in the registry at {self.uri}: it resolves to {real!r}, outside the "
                f"registry root {root!r} (a symbolic link inside the registry points elsewhere). Expected every "
                "registry path to stay under its root. Fix: remove the link and publish again."
            )
        return path

    def _put(self, path: str, data: bytes, action: str) -> None:
        """Write ``data`` to ``path`` atomically (whole or not at all)."""
        self._contained(path)
        with self._io(action, write=True):
            if self._loc.is_remote:
                self._fs.pipe_file(path, data)  # one PUT (multipart above 100 MiB): visible only when complete
            else:
                _atomic_write_local(path, data)

    def _cat(self, path: str, action: str) -> bytes | None:
        self._contained(path)
        with self._io(action):
            try:
                return self._fs.cat_file(path)
            except FileNotFoundError:
                return None
            except IsADirectoryError:
                return None

    def _ls_names(self, path: str, action: str) -> list[str]:
        self._contained(path)
        with self._io(action):
            try:
                listed = self._fs.ls(path, detail=False)
            except FileNotFoundError:
                return []
        prefix = self._fs._strip_protocol(path).rstrip("/")
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in listed if p.rstrip("/") != prefix]

    def _rm(self, path: str, action: str, *, recursive: bool = False) -> bool:
        self._contained(path)
        with self._io(action, write=True):
            try:
                if not recursive:
                    self._fs.info(path)  # s3 deletes of missing keys succeed silently: ask first
                self._fs.rm(path, recursive=recursive)
                return True
            except FileNotFoundError:
                return False


# ------------------------------------------------------------------------------------------------------------------
# helpers


def decomposition_tensors(decomposition: Any) -> dict[str, torch.Tensor]:
    """The ``tensors`` argument of :meth:`PrototypeRegistry.write_classes` for a
    :class:`~phpn_core.decompose.HeadDecomposition` (stage with ``classes=decomposition.classes``)."""
    out = {n: getattr(decomposition, n) for n in REQUIRED_TENSORS}
    for name, v in (decomposition.diagnostics or {}).items():
        out[name] = v if isinstance(v, torch.Tensor) else torch.as_tensor(v)
    return out


def _atomic_write_local(path: str, data: bytes) -> None:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    # A hidden temporary name in the same folder (same filesystem, so os.replace is atomic); listings skip it.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _serialize(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    from safetensors.torch import save as st_save

    return st_save({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, metadata=dict(metadata))


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (its JSON header), without reading the tensors."""
    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes is too short for a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8 or n > 100_000_000:
        raise ValueError("the header length is out of range (not a safetensors file)")
    header = json.loads(data[8 : 8 + n])
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}


def _stack(
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
            f"class {idx[0]} ({_fmt_sig(sig)}), got classes {_fmt_classes(odd)} different (e.g. class {odd[0]}: "
            f"{_fmt_sig({n: (tuple(t.shape), t.dtype) for n, t in other.items()})}). They come from different runs. "
            "Fix: drop_staged the odd classes (or clear_staged) and recompute them with one configuration."
        )
    return {n: torch.stack([d[n] for d in per_class]) for n in ref}


def _fmt_sig(sig: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> str:
    return ", ".join(f"{n} {list(s)} {str(dt).removeprefix('torch.')}" for n, (s, dt) in sorted(sig.items()))


def _class_file(c: int) -> str:
    return f"class-{c:05d}.safetensors"


def _check_id(entry_id: Any) -> str:
    """Refuse (InputValueError, before any I/O) anything but one plain name: no '/', '..', absolute paths."""
    if not isinstance(entry_id, str):
        raise InputValueError(
            f"Entry id has the wrong type: expected a str, got {type(entry_id).__name__}. "
            "Fix: use PrototypeRegistry.entry_id(model, dataset, k, config_digest)."
        )
    safe_join("/registry", entry_id)  # the shared refusal of '..', '/x', '~', URIs, control characters, ''
    if not _ID_RE.match(entry_id):
        raise InputValueError(
            f"Entry id {redact(entry_id)!r} is not a plain name: expected 1-200 characters of letters, digits, '.', "
            "'_' and '-' starting with a letter or digit (no '/' or path components). "
            "Fix: use PrototypeRegistry.entry_id(model, dataset, k, config_digest)."
        )
    return entry_id


def _slug(value: Any, name: str) -> str:
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


def _digest12(config_digest: Any) -> str:
    m = _DIGEST_RE.match(config_digest) if isinstance(config_digest, str) else None
    if m is None:
        got = redact(config_digest) if isinstance(config_digest, str) else type(config_digest).__name__
        raise InputValueError(
            f"config_digest is invalid: expected a digest of at least 12 letters/digits, optionally prefixed with "
            f"'<algorithm>:' (e.g. a sha256 hex digest), got {got!r}. Fix: pass the configuration's digest."
        )
    return m.group("hex")[:12].lower()


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputValueError(f"k must be an int >= 1 (prototypes per class), got {k!r}. Fix: pass e.g. k=10.")
    return int(k)


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__") or int(value) < 1:
        raise InputValueError(f"{name} must be an int >= 1, got {value!r}. Fix: pass the head's number of classes.")
    return int(value)


def _check_classes(classes: Any, name: str) -> list[int]:
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
            f"{name} must be distinct: got {_fmt_classes(dup)} more than once. Fix: list each class once."
        )
    return out


def _check_tensors(tensors: Any, n: int) -> tuple[int, int, dict[str, torch.Tensor]]:
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


def _check_bias(bias: Any, C: int) -> torch.Tensor:
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


def _check_json(value: Any, where: str) -> None:
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
            _check_json(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_json(v, f"{where}[{i}]")
        return
    raise InputValueError(
        f"{where} is not JSON-serialisable: expected str, int, float, bool, None, list or dict with str keys, got "
        f"{type(value).__name__}. Fix: convert it (e.g. config.model_dump(mode='json'), tensor.tolist(), str(path))."
    )


def _fmt_classes(classes: Sequence[int]) -> str:
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


def _brief(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= 300 else text[:300] + "..."


def _mtime(info: Mapping[str, Any]) -> float:
    for key in ("mtime", "LastModified", "last_modified", "created"):
        v = info.get(key)
        if isinstance(v, datetime):
            return v.timestamp()
        if isinstance(v, (int, float)):
            return float(v)
    return 0.0  # unknown: treated as old


def _secrets_of(opts: Mapping[str, Any] | None) -> tuple[str, ...]:
    if not opts:
        return ()
    return tuple(str(opts[k]) for k in ("key", "secret", "token") if opts.get(k))
