"""What the explorer reads: the registry, the feature stores its entries point to, and the datasets (read-only).

:class:`ExplorerData` wraps one :class:`~phpn_core.storage.registry.PrototypeRegistry` and caches everything it
reads, keyed by ``(entry_id, version)`` so a re-published entry is never served stale:

- the entry listing (refreshed at most every ``listing_ttl_s`` seconds);
- heads (prototypes ``[C, k, D]``), arrays (alpha ``[C, k]``, ...), class names, metrics;
- feature stores (opened once) and datasets (built once, only to show pixels);
- per-class views (:class:`ClassView`: test heatmaps and contributions computed from the *stored* test features,
  gallery patches from the stored training features), in a bounded LRU;
- the classifier of an entry for the Explain page (:func:`phpn_core.report.explain.load_entry_model`).

Nothing here writes. Entry ids and class references are validated before any I/O (:func:`check_entry_id`,
:meth:`ExplorerData.resolve_class`): a path-like id never reaches storage.

Metrics of an entry (accuracy parity, consistency, stability, baselines) come from, in order: the entry's
``metadata["metrics"]`` (when a publisher records them), then the metrics the run recorded beside the entry's
version (``PrototypeRegistry.record_metrics``: every ``phpn run``/``demo``/``decompose`` does, so they travel with
the registry, S3 included), then, for registries written before that, the run's ``metrics.json`` next to the
registry (``<registry>/../metrics.json``) or next to its training store (``<train store>/../../metrics.json``) when
that file names this entry (``"entry_id"``); otherwise "n/a".
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from explorer.views import ClassView, EntryRow  # re-exported: explorer.data's records
from phpn_core.errors import InputValueError, PhpnError
from phpn_core.storage.registry_format import RegistryError

__all__ = ["ExplorerData", "ClassView", "EntryRow", "NotFound", "BadRequest", "check_entry_id", "LRU"]

_ENTRY_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,199}$")
_METRIC_KEYS = ("accuracy_original", "accuracy_decomposed", "max_abs_logit_diff", "max_head_reconstruction_error",
                "consistency", "stability", "insertion_auc", "deletion_auc", "insertion_auc_class",
                "deletion_auc_class", "box_stability", "redundancy", "duplicate_rate", "n_test_images", "accuracy",
                "accuracy_cnn", "train_seconds")




class NotFound(PhpnError):
    """An entry, class or object the request names does not exist (HTTP 404)."""


class BadRequest(InputValueError):
    """A request parameter is malformed (HTTP 400)."""


def check_entry_id(entry_id: Any) -> str:
    """``entry_id`` if it is one plain registry id (``[A-Za-z0-9][A-Za-z0-9._-]{0,199}``, no ``..``), else
    :class:`BadRequest`. Runs before any I/O: ``../x``, ``a/b``, ``%2e%2e`` never reach storage."""
    if not isinstance(entry_id, str) or not _ENTRY_ID_RE.match(entry_id) or ".." in entry_id:
        shown = repr(entry_id)[:80]
        raise BadRequest(
            f"Invalid entry id {shown}: expected one registry id such as 'synthparts_cnn--synthparts--k3--"
            "0123456789ab' (letters, digits, '.', '_', '-'; no '/' or '..'). Fix: pick an id from / or /api/entries."
        )
    return entry_id


class LRU:
    """A small thread-safe LRU cache: ``get_or_make(key, make)`` computes ``make()`` once per key (concurrent
    callers of the same key wait for the first), keeping at most ``size`` values. Exceptions are not cached."""

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[Any, threading.Lock] = {}
        self.hits = 0
        self.misses = 0

    def get_or_make(self, key: Any, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            klock = self._key_locks.setdefault(key, threading.Lock())
        with klock:
            with self._lock:
                if key in self._data:
                    self.hits += 1
                    return self._data[key]
            value = make()
            with self._lock:
                self.misses += 1
                self._data[key] = value
                self._data.move_to_end(key)
                while len(self._data) > self.size:
                    self._data.popitem(last=False)
                self._key_locks.pop(key, None)
            return value

    def __len__(self) -> int:
        return len(self._data)


def _finite_or_none(v: Any) -> Any:
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, (int, float)):
        return v if math.isfinite(float(v)) else None
    return v


class ExplorerData:
    """Read-only, cached access to a registry and what its entries point to; see the module docstring.

    ``storage_options``: s3fs options for the registry and the stores (None: from the environment).
    ``images_per_class``: test images shown per class; ``gallery_size``: patches per prototype;
    ``class_cache``: class views kept; ``listing_ttl_s``: how long the entries listing is reused.
    """

    def __init__(
        self,
        registry_uri: str | os.PathLike[str],
        *,
        storage_options: Mapping[str, Any] | None = None,
        images_per_class: int = 4,
        gallery_size: int = 6,
        class_cache: int = 256,
        listing_ttl_s: float = 10.0,
    ) -> None:
        from phpn_core.storage.registry import PrototypeRegistry

        self.registry_uri = os.fspath(registry_uri)
        self.storage_options = dict(storage_options) if storage_options is not None else None
        self.registry = PrototypeRegistry(self.registry_uri, storage_options=storage_options)
        self.images_per_class = int(images_per_class)
        self.gallery_size = int(gallery_size)
        self.listing_ttl_s = float(listing_ttl_s)
        self._listing: tuple[float, list[EntryRow]] | None = None
        self._listing_lock = threading.Lock()
        self._infos = LRU(1024)
        self._heads = LRU(8)
        self._arrays = LRU(8)
        self._names = LRU(64)
        self._metrics = LRU(1024)
        self._stores = LRU(32)
        self._datasets = LRU(16)
        self._models = LRU(4)
        self._why: dict[tuple, str] = {}  # the latest reason a store/dataset could not be opened (retried next time)
        self.classes = LRU(class_cache)
        self.pngs = LRU(1024)

    # -- entries ---------------------------------------------------------------------------------------------------

    def entries(self, *, refresh: bool = False) -> list[EntryRow]:
        """Every published entry (sorted by id), with its metrics; an unreadable pointer gives a row with ``error``."""
        with self._listing_lock:
            now = time.monotonic()
            if not refresh and self._listing is not None and now - self._listing[0] < self.listing_ttl_s:
                return self._listing[1]
            ids = self._entry_ids()
            if self.registry.is_remote and len(ids) > 1:  # one GET per pointer: overlap them on S3
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(min(16, len(ids))) as pool:
                    rows = list(pool.map(self._row, ids))
            else:
                rows = [self._row(eid) for eid in ids]
            self._listing = (now, rows)
            return rows

    def _entry_ids(self) -> list[str]:
        return self.registry.entry_ids()  # the listing alone: one unreadable pointer must not hide the others

    def _row(self, entry_id: str) -> EntryRow:
        try:
            info = self.registry.info(entry_id)
        except PhpnError as e:
            return EntryRow(entry_id=entry_id, error=str(e))
        return self.row(info)

    def row(self, info) -> EntryRow:
        """The :class:`EntryRow` of an entry's pointer, with its metrics."""
        metrics, baselines, source = self.metrics(info)
        return EntryRow(entry_id=info.entry_id, kind=info.kind, model=info.model, dataset=info.dataset, k=info.k,
                        n_classes=info.n_classes, D=info.D, created=info.created, version=info.version,
                        run=str(info.metadata.get("run")) if info.metadata.get("run") is not None else None,
                        metrics=metrics, baselines=baselines, metrics_source=source)

    def info(self, entry_id: str):
        """The entry's :class:`~phpn_core.storage.registry_format.EntryInfo` (pointer re-read at most every
        ``listing_ttl_s``); :class:`NotFound` for an unknown id."""
        check_entry_id(entry_id)
        bucket = int(time.monotonic() / max(self.listing_ttl_s, 1e-3))

        def read():
            if not self.registry.exists(entry_id):
                known = [r.entry_id for r in self.entries()][:5]
                raise NotFound(
                    f"Unknown entry {entry_id!r} in the registry at {self.registry.uri}: expected a published entry. "
                    f"Known entries: {', '.join(known) or 'none'}. Fix: pick one from / or /api/entries."
                )
            return self.registry.info(entry_id)

        return self._infos.get_or_make((entry_id, bucket), read)

    def head(self, entry_id: str):
        """``(head, info)``: the entry's :class:`~phpn_core.method.head.PartPrototypeHead` (CPU) and pointer."""
        info = self.info(entry_id)
        return self._heads.get_or_make((entry_id, info.version), lambda: self.registry.load(entry_id)[0]), info

    def arrays(self, entry_id: str) -> dict[str, torch.Tensor]:
        """The entry's arrays (``alpha [C, k]``, ``rel_error [C]``, ...)."""
        info = self.info(entry_id)
        return self._arrays.get_or_make((entry_id, info.version), lambda: self.registry.load_arrays(entry_id))

    # -- metrics ---------------------------------------------------------------------------------------------------

    def metrics(self, info) -> tuple[dict[str, Any], dict[str, dict[str, Any]], str | None]:
        """``(metrics, baselines, source)`` of an entry; see the module docstring for where they come from."""
        return self._metrics.get_or_make((info.entry_id, info.version), lambda: self._find_metrics(info))

    def _find_metrics(self, info) -> tuple[dict[str, Any], dict[str, dict[str, Any]], str | None]:
        meta = info.metadata or {}
        found: dict[str, Any] | None = None
        source = None
        if isinstance(meta.get("metrics"), Mapping):
            found, source = dict(meta["metrics"]), "entry metadata"
        else:
            try:  # recorded beside the version by the run (PrototypeRegistry.record_metrics)
                recorded = self.registry.read_metrics(info.entry_id, version=info.version)
            except RegistryError:
                recorded = None  # unreadable: fall back to the run directory, as for older registries
            if recorded is not None and recorded.get("entry_id", info.entry_id) == info.entry_id:
                found, source = recorded, "registry (this version's metrics.json)"
        if found is None:
            for path in self._metrics_candidates(meta):
                try:
                    data = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
                if isinstance(data, Mapping) and data.get("entry_id") == info.entry_id:
                    found, source = dict(data), str(path)
                    break
        if found is None:
            return {}, {}, None
        metrics = {k: _finite_or_none(found.get(k)) for k in _METRIC_KEYS if k in found}
        baselines: dict[str, dict[str, Any]] = {}
        if isinstance(found.get("baselines"), Mapping):
            for name, vals in found["baselines"].items():
                if isinstance(vals, Mapping):
                    baselines[str(name)] = {str(k): _finite_or_none(v) for k, v in vals.items()
                                            if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))}
        return metrics, baselines, source

    def _metrics_candidates(self, meta: Mapping[str, Any]) -> list[Path]:
        from phpn_core.storage.uri import parse_uri

        out: list[Path] = []
        try:
            loc = parse_uri(self.registry_uri)
            if not loc.is_remote:
                out.append(Path(loc.path).parent / "metrics.json")
        except Exception:  # noqa: BLE001 - no candidate from an odd URI
            pass
        feats = meta.get("features")
        train = feats.get("train") if isinstance(feats, Mapping) else None
        if isinstance(train, str):
            try:
                floc = parse_uri(train)
                if not floc.is_remote:
                    out.append(Path(floc.path).parent.parent / "metrics.json")
            except Exception:  # noqa: BLE001
                pass
        return list(dict.fromkeys(out))

    # -- classes ---------------------------------------------------------------------------------------------------

    def class_names(self, entry_id: str) -> list[str]:
        """C class names: ``metadata["class_names"]``, else the feature stores' schema, else the test dataset's (when it
        can be built), else ``class_00`` (synthparts) / ``class 0``."""
        info = self.info(entry_id)

        def make() -> list[str]:
            meta = info.metadata or {}
            names = meta.get("class_names")
            if isinstance(names, list) and len(names) == info.n_classes:
                return [str(n) for n in names]
            kind = _dataset_cfg(meta).get("kind")
            for split in ("train", "test"):  # the feature stores record the dataset's class names
                st = self.store(entry_id, split)
                got = list(getattr(st.schema, "class_names", None) or []) if st is not None else []
                if len(got) == info.n_classes:
                    return [str(n) for n in got]
            if kind != "synthparts":
                ds = self.dataset(entry_id, "test")
                got = getattr(ds, "classes", None) if ds is not None else None
                if got is not None and len(got) == info.n_classes:
                    return [str(n) for n in got]
            fmt = "class_{:02d}" if kind == "synthparts" else "class {}"
            return [fmt.format(c) for c in range(info.n_classes)]

        return self._names.get_or_make((entry_id, info.version), make)

    def resolve_class(self, entry_id: str, ref: str | int) -> int:
        """Class index of ``ref``: an index ``0 <= c < C`` (int or digits), or a class name (exact, then
        case-insensitive). :class:`NotFound` otherwise."""
        info = self.info(entry_id)
        C = info.n_classes
        text = str(ref).strip()
        if len(text) > 300:
            raise BadRequest(f"Class reference too long ({len(text)} characters): expected an index or a name.")
        names = self.class_names(entry_id)
        if text in names:
            return names.index(text)
        if re.fullmatch(r"[0-9]{1,9}", text):
            c = int(text)
            if 0 <= c < C:
                return c
            raise NotFound(f"Class index {c} is out of range for entry {entry_id!r}: expected 0 <= c < {C}. "
                           f"Fix: pick a class from /entries/{entry_id}.")
        low = text.casefold()
        for i, n in enumerate(names):
            if n.casefold() == low:
                return i
        close = [n for n in names if low in n.casefold()][:5]
        raise NotFound(
            f"No class {text[:80]!r} in entry {entry_id!r}: expected an index 0..{C - 1} or one of its {C} class "
            f"names{' (close: ' + ', '.join(close) + ')' if close else ''}. Fix: search the class list on "
            f"/entries/{entry_id}."
        )

    # -- stores and datasets ---------------------------------------------------------------------------------------

    def store(self, entry_id: str, split: str):
        """The entry's ``split`` ("train"/"test") feature store, or None when the entry records none or it cannot
        be opened (the reason is in :meth:`why_missing`)."""
        info = self.info(entry_id)
        feats = (info.metadata or {}).get("features")
        uri = feats.get(split) if isinstance(feats, Mapping) else None
        key = ("store", entry_id, info.version, split)
        if not isinstance(uri, str):
            self._why[key] = f"the entry records no {split} feature store"
            return None

        def open_():
            from phpn_core.storage.feature_store import FeatureStore
            from phpn_core.storage.uri import parse_uri

            remote = parse_uri(uri).is_remote
            opts = self.storage_options if remote else None
            fp = feats.get(f"{split}_fingerprint")
            return FeatureStore.open(uri, storage_options=opts, expected_fingerprint=fp if isinstance(fp, str) else None)

        try:
            return self._stores.get_or_make(key, open_)  # a failure is not cached: the next request tries again
        except PhpnError as err:
            self._why[key] = str(err)
            return None

    def dataset(self, entry_id: str, split: str):
        """The entry's ``split`` dataset built from its recorded config (pixels for the pages), or None."""
        info = self.info(entry_id)
        key = ("dataset", entry_id, info.version, split)

        def build():
            from phpn_core.config import DatasetConfig
            from phpn_core.data.factory import build_dataset

            return build_dataset(DatasetConfig(**_dataset_cfg(info.metadata or {})), split)

        if not _dataset_cfg(info.metadata or {}):
            self._why[key] = "the entry records no dataset config"
            return None
        try:
            return self._datasets.get_or_make(key, build)
        except Exception as err:  # noqa: BLE001 - a dataset not on this machine: pages show maps without pixels
            self._why[key] = f"its {split} dataset cannot be built here ({type(err).__name__}: {str(err)[:300]})"
            return None

    def why_missing(self, entry_id: str, what: str, split: str) -> str | None:
        info = self.info(entry_id)
        return self._why.get((what, entry_id, info.version, split))

    # -- the class view --------------------------------------------------------------------------------------------

    def class_view(self, entry_id: str, c: int) -> ClassView:
        """Class ``c``'s :class:`ClassView` (cached)."""
        info = self.info(entry_id)
        if info.kind == "protopnet":
            from explorer.protopnet_view import protopnet_class_view

            make = lambda: protopnet_class_view(self, entry_id, c)  # noqa: E731
        else:
            make = lambda: self._make_class_view(entry_id, c)  # noqa: E731
        return self.classes.get_or_make((entry_id, info.version, int(c)), make)

    def _make_class_view(self, entry_id: str, c: int) -> ClassView:
        head, info = self.head(entry_id)
        arrays = self.arrays(entry_id)
        names = self.class_names(entry_id)
        k = info.k
        notes: list[str] = []
        decomposed = (info.metadata or {}).get("decomposed_classes")
        if isinstance(decomposed, list) and c not in decomposed:
            notes.append(f"Class {c} was not decomposed in this entry (only {len(decomposed)} of {info.n_classes} "
                         f"classes were): its {k} prototypes are its linear head row divided by k.")
        protos = head.prototypes[c].float()
        signs = head.signs[c].float()
        alpha = arrays["alpha"][c].float() if "alpha" in arrays else signs.clone()
        rel = float(arrays["rel_error"][c]) if "rel_error" in arrays else None

        # Where + why: from the stored test features (no model needed).
        test_ids: list[str] = []
        logits = torch.zeros(0)
        contributions = torch.zeros(0, k)
        oriented = torch.zeros(0, k, 1, 1)
        preds: list[int] = []
        images = None
        tstore = self.store(entry_id, "test")
        if tstore is None:
            notes.append(f"No test heatmaps: {self.why_missing(entry_id, 'store', 'test')}.")
        elif c not in set(tstore.classes) or int(tstore.class_counts[c]) == 0:
            notes.append("The test store has no images of this class.")
        else:
            n = min(self.images_per_class, int(tstore.class_counts[c]))
            F = tstore.class_features(c)[:n]  # [n, h, w, D]
            fmap = F.permute(0, 3, 1, 2).to(head.prototypes.dtype)  # [n, D, h, w]
            with torch.inference_mode():
                all_logits = head(fmap)  # [n, C]
                ex = head.explain(fmap, classes=[c])
            logits = ex.logits[:, 0].float()
            contributions = ex.contributions[:, 0].float()
            oriented = ex.oriented_heatmaps[:, 0].float()
            preds = all_logits.argmax(1).tolist()
            test_ids = tstore.class_image_ids(c)[:n]
            ds = self.dataset(entry_id, "test")
            if ds is None:
                notes.append(f"Heatmaps drawn without the images: {self.why_missing(entry_id, 'dataset', 'test')}.")
            else:
                try:
                    idx = tstore.class_indices(c)[:n]
                    items = [ds[int(i)] for i in idx]
                    bad = [(it["image_id"], want) for it, want in zip(items, test_ids) if str(it["image_id"]) != want]
                    if bad:
                        notes.append(f"Heatmaps drawn without the images: the test dataset built here does not match "
                                     f"the store (image {bad[0][0]!r} where the store has {bad[0][1]!r}).")
                    else:
                        images = torch.stack([it["image"].float() for it in items])
                except Exception as e:  # noqa: BLE001 - unreadable files: maps without pixels
                    notes.append(f"Heatmaps drawn without the images: {type(e).__name__}: {str(e)[:200]}.")

        # What: the gallery (training patches where each prototype peaks).
        gallery: list[list[tuple[str, float, torch.Tensor | None]]] = [[] for _ in range(k)]
        store = self.store(entry_id, "train")
        if store is None:
            notes.append(f"No gallery: {self.why_missing(entry_id, 'store', 'train')}.")
        elif c not in set(store.classes) or int(store.class_counts[c]) == 0:
            notes.append("The training store has no images of this class.")
        else:
            ds = self.dataset(entry_id, "train")
            if ds is not None:
                from phpn_core.report.gallery import gallery_patches

                try:
                    gp = gallery_patches(head, c, train_store=store, train_dataset=ds, size=self.gallery_size)
                    gallery = [[(g.image_id, g.score, g.patch) for g in row] for row in gp]
                except PhpnError as e:
                    ds = None
                    notes.append(f"Gallery without patches: {e}")
            else:
                notes.append(f"Gallery without patches (ids and scores only): "
                             f"{self.why_missing(entry_id, 'dataset', 'train')}.")
            if ds is None:
                gallery = _gallery_scores(store, c, protos, signs, self.gallery_size)
        used = head.active[c].cpu()
        if not bool(used.all()):  # decompose.k: auto merged duplicates: show the prototypes in use only
            notes.append(f"{int(used.sum())} of {k} prototypes in use: decompose.k: auto merged this class's "
                         f"duplicate prototypes (the other slots are zero and add nothing to its logit).")
            alpha, signs, protos = alpha[used], signs[used], protos[used]
            contributions, oriented = contributions[:, used], oriented[:, used]
            gallery = [row for row, on in zip(gallery, used.tolist()) if on]
        return ClassView(entry_id=entry_id, c=c, name=names[c], bias=float(head.bias[c]), alpha=alpha, signs=signs,
                         norms=protos.norm(dim=1), rel_error=rel, test_ids=test_ids, test_logits=logits,
                         test_pred=preds, contributions=contributions, oriented=oriented, test_images=images,
                         gallery=gallery, notes=notes)

    # -- explain ---------------------------------------------------------------------------------------------------

    def cached_model(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()`` kept in the bounded model cache under ``key`` (rebuilt networks are costly)."""
        return self._models.get_or_make(key, make)

    def entry_model(self, entry_id: str):
        """The entry's :class:`~phpn_core.report.explain.LoadedEntry` (classifier found and verified as
        ``phpn explain`` does), cached."""
        from phpn_core.report.explain import load_entry_model

        info = self.info(entry_id)
        return self._models.get_or_make(
            (entry_id, info.version),
            lambda: load_entry_model(self.registry_uri, entry_id, storage_options=self.storage_options))


def _dataset_cfg(meta: Mapping[str, Any]) -> dict[str, Any]:
    cfg = meta.get("config")
    ds = cfg.get("dataset") if isinstance(cfg, Mapping) else None
    return dict(ds) if isinstance(ds, Mapping) else {}


def _gallery_scores(store, c: int, protos: torch.Tensor, signs: torch.Tensor, size: int):
    """Gallery rows without pixels: per prototype, the ``size`` training images of class c where its oriented map
    peaks highest, as ``(image_id, score, None)``."""
    Fc = store.class_features(c)  # [n, h, w, D]
    n = Fc.shape[0]
    k = protos.shape[0]
    best = (torch.einsum("nhwd,kd->knhw", Fc.float(), protos) * signs.view(k, 1, 1, 1)).reshape(k, n, -1).amax(-1)
    ids = store.class_image_ids(c)
    top = min(size, n)
    order = best.argsort(dim=1, descending=True)[:, :top]
    return [[(ids[j], float(best[i, j]), None) for j in order[i].tolist()] for i in range(k)]
