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

import os
import tempfile
import time

import torch

from phpn_core.errors import InputValueError
from phpn_core.method.head import PartPrototypeHead
from phpn_core.storage.registry_format import (
    ARRAY_NAMES,
    ARRAYS_OBJECT,
    ENTRY_FORMAT,
    HEAD_OBJECT,
    PROTOPNET_FORMAT,
    PROTOPNET_OBJECT,
    REQUIRED_TENSORS,
    VERSION_RE,
    EntryInfo,
    ObjectRef,
    RegistryError,
    brief,
    check_id,
    check_k,
    decomposition_tensors,
    digest12,
    mtime,
    safetensors_metadata,
    slug,
)
from phpn_core.storage.registry_publishing import RegistryPublishing

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


class PrototypeRegistry(RegistryPublishing):
    """A registry of decomposed heads at a local path or ``s3://bucket/prefix``; see the module docstring.
    
    ``storage_options`` are s3fs options (None: from the environment; see
    :func:`phpn_core.storage.uri.resolve_storage_options`, which bounds timeouts and retries). Nothing is read or written
    until a method needs it, so constructing a registry never fails on a dead endpoint. Safe to use from many
    threads and processes at once (see the module docstring for what concurrent writers may do).
    
    Workflow: tasks call :meth:`write_classes` for their classes (check :meth:`staged_classes` to resume); one
    gather calls :meth:`publish`; readers call :meth:`entries`, :meth:`info`, :meth:`load`, :meth:`load_arrays`.

    Built in layers, one job each: :mod:`~phpn_core.storage.registry_objects` (storage primitives),
    :mod:`~phpn_core.storage.registry_staging` (staged classes), :mod:`~phpn_core.storage.registry_publishing`
    (publishing, metrics); this class adds naming, reading and removal.
    """

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
        m_slug = slug(model, "model")
        d_slug = slug(dataset, "dataset")
        k = check_k(k)
        digest = digest12(config_digest)
        return check_id(f"{m_slug}--{d_slug}--k{k}--{digest}")

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
        self._require_kind(entry_id, "phpn", "load")
        info, data = self._read_object(entry_id, HEAD_OBJECT)
        with tempfile.TemporaryDirectory(prefix="phpn-registry-") as tmp:
            path = os.path.join(tmp, HEAD_OBJECT)
            with open(path, "wb") as f:
                f.write(data)
            try:
                head, _ = PartPrototypeHead.load(path, device=device)
            except Exception as e:
                why = f"it is not a phpn head in safetensors format ({brief(e)})"
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
        self._require_kind(entry_id, "phpn", "load_arrays")
        info, data = self._read_object(entry_id, ARRAYS_OBJECT)
        try:
            from safetensors.torch import load as st_load

            arrays = st_load(data)
        except Exception as e:
            raise self._corrupt(info.entry_id, info.version, ARRAYS_OBJECT,
                                f"it is not a safetensors file ({brief(e)})") from None
        expected = set(ARRAY_NAMES) | set(info.diagnostics)
        if set(arrays) != expected:
            raise self._corrupt(info.entry_id, info.version, ARRAYS_OBJECT,
                                f"it holds {sorted(arrays)}, expected {sorted(expected)}")
        return {n: t.to(device) for n, t in arrays.items()}

    def load_protopnet_tensors(self, entry_id: str) -> tuple[dict[str, torch.Tensor], EntryInfo]:
        """The tensors of a ProtoPNet entry (kind ``"protopnet"``; :meth:`publish_protopnet`), on the CPU, and its
        :class:`EntryInfo`; sha256-verified, never unpickled. Rebuild the network with
        :func:`phpn_core.protopnet.entry.rebuild_protopnet`."""
        self._require_kind(entry_id, "protopnet", "load_protopnet_tensors")
        info, data = self._read_object(entry_id, PROTOPNET_OBJECT)
        try:
            from safetensors.torch import load as st_load

            tensors = st_load(data)
            fmt = safetensors_metadata(data).get("format")
        except Exception as e:
            raise self._corrupt(info.entry_id, info.version, PROTOPNET_OBJECT,
                                f"it is not a safetensors file ({brief(e)})") from None
        if fmt != PROTOPNET_FORMAT:
            raise self._corrupt(info.entry_id, info.version, PROTOPNET_OBJECT,
                                f"its format is {fmt!r}, expected {PROTOPNET_FORMAT!r}")
        return tensors, info

    def _require_kind(self, entry_id: str, kind: str, what: str) -> None:
        got = self.info(entry_id).kind
        if got != kind:
            other = "load_protopnet_tensors" if got == "protopnet" else "load / load_arrays"
            raise RegistryError(
                f"{what}: entry {entry_id!r} in the registry at {self.uri} is of kind {got!r}, expected {kind!r} "
                f"(a {'ProtoPNet baseline has no part-prototype head' if got == 'protopnet' else 'phpn entry holds a head, not a ProtoPNet'}). "
                f"Fix: pick an entry of kind {kind!r} (phpn registry list shows each entry's kind), or read this one "
                f"with {other}.")

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
        return sorted(n for n in names if VERSION_RE.match(n))

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
            ages = [now - mtime(i) for i in infos]
            if ages and min(ages) >= min_age_s:
                self._rm(vdir, f"remove version {v} of entry {entry_id!r} from", recursive=True)
                removed.append(v)
        return removed
