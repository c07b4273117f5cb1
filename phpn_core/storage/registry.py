"""Prototype registry: decomposed heads, published as immutable versions behind one pointer per entry.

A registry lives at a local path or an ``s3://bucket/prefix`` URI (the same code through fsspec; see
:mod:`phpn_core.storage.uri`). An *entry* is one decomposition, keyed by ``(model, dataset, k, config_digest)`` and named
by :meth:`PrototypeRegistry.entry_id` (``resnet34--cub200--k10--0123456789ab``).

Layout (``C`` classes, ``k`` prototypes per class, ``D`` channels)::

    staging/<entry_id>/class-00042.safetensors   one object per class, written by the distributed tasks:
                                                 prototypes/initial/residual [k, D], alpha [k], rel_error [],
                                                 head_error [], diagnostics [] (class c's slice of each)
    objects/<entry_id>/<version>/head.safetensors    prototypes [C, k, D], bias [C], signs [C, k] = sign(alpha)
                                                     (PartPrototypeHead.save's format)
    objects/<entry_id>/<version>/arrays.safetensors  initial/residual [C, k, D], alpha [C, k], rel_error [C],
                                                     head_error [C], diagnostics [C]
    objects/<entry_id>/<version>/metrics.json        optional: the run's evaluation of that version (accuracy,
                                                     parity, ProtoEval, baselines), added by record_metrics
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
  one plain name (:func:`phpn_core.storage.uri.safe_join`); locally, a path that resolves outside the root through a
  symbolic link is refused too. Metadata must be JSON and is stored redacted
  (:func:`phpn_core.storage.uri.redact`): credentials never reach the registry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from functools import cached_property
from typing import Any

import fsspec
import torch
from pydantic import ValidationError

from phpn_core.errors import InputValueError, PhpnError
from phpn_core.method.head import PartPrototypeHead
from phpn_core.storage.registry_format import (
    _ARRAYS_FORMAT,
    _CLASS_FILE_RE,
    _CLASS_FORMAT,
    _ID_RE,
    _MAX_REQUESTS,
    _SLUG_ID_RE,
    _VERSION_RE,
    ARRAY_NAMES,
    ARRAYS_OBJECT,
    ENTRY_FORMAT,
    HEAD_OBJECT,
    METRICS_OBJECT,
    REQUIRED_TENSORS,
    EntryInfo,
    ObjectRef,
    RegistryError,
    _brief,
    _check_bias,
    _check_classes,
    _check_id,
    _check_json,
    _check_k,
    _check_positive_int,
    _check_tensors,
    _class_file,
    _digest12,
    _fmt_classes,
    _mtime,
    _phpn_version,
    _safetensors_metadata,
    _secrets_of,
    _serialize,
    _slug,
    _stack,
    decomposition_tensors,
)
from phpn_core.storage.uri import (
    StorageLocation,
    parse_uri,
    redact,
    resolve_storage_options,
    safe_join,
)

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

# ------------------------------------------------------------------------------------------------------------------


def _finite_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (metrics can be NaN: an undefined score)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


class PrototypeRegistry:
    """A registry of decomposed heads at a local path or ``s3://bucket/prefix``; see the module docstring.

    ``storage_options`` are s3fs options (None: from the environment; see
    :func:`phpn_core.storage.uri.resolve_storage_options`, which bounds timeouts and retries). Nothing is read or written
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
        decomposed: Sequence[int] | None = None,
        weight: torch.Tensor | None = None,
    ) -> EntryInfo:
        """Gather the staged classes ``0..C-1`` of ``entry_id`` (C = ``n_classes``) into a new version and point
        the entry at it. Returns the new :class:`EntryInfo`.

        Decomposing only some rows (a 1000-class ImageNet head explained on 5 classes): ``decomposed`` lists the
        staged rows and ``weight [C, D]`` is the linear head. Every other row ``c`` keeps its linear row, stored
        exactly as ``k`` equal prototypes ``weight[c] / k`` (``initial`` the same, ``alpha`` 1, ``residual``,
        ``rel_error``, ``head_error`` and diagnostics 0), so the head still gives the original logits of all C
        classes. ``metadata["decomposed_classes"]`` records ``decomposed``, and ``mean_rel_error`` is over those
        rows only.

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
        rows = list(range(C))
        if decomposed is not None:
            rows = sorted(_check_classes(decomposed, "decomposed"))
            if rows[-1] >= C:
                raise InputValueError(
                    f"publish: decomposed lists rows {[c for c in rows if c >= C][:10]} outside 0..{C - 1} "
                    f"(n_classes={C}). Fix: pass head rows of this head.")
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] != C:
                got = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
                raise InputValueError(
                    f"publish: decomposed= needs the linear head weight [C, D] with C={C} for the other rows, got "
                    f"{got}. Fix: pass weight=the classifier's head weight.")
            staged = staged & set(rows)
            meta = {**meta, "decomposed_classes": rows}
        missing = sorted(set(rows) - staged)
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
        arrays = self.read_staged(entry_id, rows)
        if decomposed is not None:
            arrays = _with_linear_rows(arrays, rows, weight, entry_id, self.uri)
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
            mean_rel_error=float(rel_err[rows].mean()),
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
        return self._exists(self._pointer(entry_id), f"look up entry {entry_id!r} in")

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
                raise self._corrupt(info.entry_id, info.version, HEAD_OBJECT, why) from None
        want = (info.n_classes, info.k, info.D)
        if tuple(head.prototypes.shape) != want:
            raise self._corrupt(
                info.entry_id, info.version, HEAD_OBJECT,
                f"its prototypes have shape {list(head.prototypes.shape)}, the pointer says [C, k, D] = {list(want)}"
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
            raise self._corrupt(info.entry_id, info.version, ARRAYS_OBJECT,
                                f"it is not a safetensors file ({_brief(e)})") from None
        expected = set(ARRAY_NAMES) | set(info.diagnostics)
        if set(arrays) != expected:
            raise self._corrupt(info.entry_id, info.version, ARRAYS_OBJECT,
                                f"it holds {sorted(arrays)}, expected {sorted(expected)}")
        return {n: t.to(device) for n, t in arrays.items()}

    # -- metrics -------------------------------------------------------------------------------------------------

    def record_metrics(self, entry_id: str, metrics: Mapping[str, Any], *, version: str) -> str:
        """Store a run's evaluation of ``version`` of ``entry_id`` beside its data, as
        ``objects/<entry_id>/<version>/metrics.json``, so that whoever reads the registry (``phpn serve``, a
        notebook) finds the metrics wherever the run directory went. The pointer is not touched: a version's data
        stay immutable and its metrics travel with it (a re-publish starts a version without metrics).

        ``metrics``: JSON with str keys; NaN and infinities are stored as None (JSON has neither); stored redacted.
        ``version``: the version evaluated (``publish(...).version``). Returns the object's URI. Raises
        RegistryError when that version of the entry does not exist, InputValueError for non-JSON metrics.
        """
        _check_id(entry_id)
        vdir = self._version_dir(entry_id, version)
        if not self._exists(safe_join(vdir, HEAD_OBJECT), f"look up version {version} of entry {entry_id!r} in"):
            raise RegistryError(
                f"Cannot record metrics for entry {entry_id!r} version {version} in the registry at {self.uri}: "
                "that version does not exist. Fix: pass the version publish() returned (PrototypeRegistry.info("
                "entry_id).version is the current one).")
        clean = self._clean_metadata(_finite_json(metrics))
        path = safe_join(vdir, METRICS_OBJECT)
        self._put(path, json.dumps(clean, indent=2, sort_keys=True).encode("utf-8"),
                  f"write the metrics of entry {entry_id!r} (version {version}) to")
        return path

    def read_metrics(self, entry_id: str, *, version: str | None = None) -> dict[str, Any] | None:
        """The metrics recorded for ``version`` of ``entry_id`` (default: the current one; :meth:`record_metrics`),
        or None when none were. RegistryError when the entry is not published or the object is not a JSON object."""
        current = self.info(entry_id).version  # refuses an unpublished entry
        version = current if version is None else version
        data = self._cat(safe_join(self._version_dir(entry_id, version), METRICS_OBJECT),
                         f"read the metrics of entry {entry_id!r} from")
        if data is None:
            return None
        try:
            out = json.loads(data)
        except ValueError as e:
            raise self._corrupt(entry_id, version, METRICS_OBJECT, f"it is not JSON ({_brief(e)})") from None
        if not isinstance(out, dict):
            raise self._corrupt(entry_id, version, METRICS_OBJECT,
                                f"it holds a JSON {type(out).__name__}, expected an object")
        return out

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
            raise self._corrupt(info.entry_id, info.version, name, "the pointer records no checksum for it")
        digest = hashlib.sha256(data).hexdigest()
        if digest != ref.sha256 or len(data) != ref.size:
            raise self._corrupt(
                info.entry_id, info.version, name, f"its sha256 is {digest} ({len(data)} bytes), the pointer "
                f"recorded {ref.sha256} ({ref.size} bytes)"
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

    def _corrupt(self, entry_id: str, version: str, name: str, why: str) -> RegistryError:
        return RegistryError(
            f"Corrupt object {name} of entry {entry_id!r} (version {version}) in the registry at "
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

    def _exists(self, path: str, action: str) -> bool:
        """Whether the object at ``path`` exists (a metadata request: nothing is read)."""
        self._contained(path)
        with self._io(action):
            try:
                self._fs.info(path)
                return True
            except FileNotFoundError:
                return False

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


def _with_linear_rows(arrays: dict[str, torch.Tensor], rows: list[int], weight: torch.Tensor, entry_id: str,
                      uri: str) -> dict[str, torch.Tensor]:
    """The staged arrays of ``rows`` (``[n, ...]``) spread to all ``C = weight.shape[0]`` rows (``[C, ...]``); the
    other rows hold their linear row as ``k`` prototypes ``weight[c] / k`` (see :meth:`PrototypeRegistry.publish`)."""
    C = weight.shape[0]
    k, D = arrays["prototypes"].shape[1:]
    if weight.shape[1] != D:
        raise InputValueError(
            f"publish: weight has D={weight.shape[1]} columns, the staged prototypes of entry {entry_id!r} in the "
            f"registry at {uri} have D={D}. Fix: pass the head of the model the entry was decomposed from.")
    idx = torch.tensor(rows, dtype=torch.long)
    out = {}
    for name, t in arrays.items():
        full = torch.zeros((C, *t.shape[1:]), dtype=t.dtype)
        if name in ("prototypes", "initial"):
            full[:] = (weight.detach().to("cpu", t.dtype) / k)[:, None, :]
        elif name == "alpha":
            full[:] = 1
        full[idx] = t
        out[name] = full
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
