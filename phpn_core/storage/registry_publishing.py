"""Publishing a registry entry: the staged classes (and the linear rows of the others) gathered into one immutable
version, its objects written first and the pointer last; and the run's metrics recorded beside a version."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import torch

from phpn_core.errors import InputValueError
from phpn_core.method.head import PartPrototypeHead
from phpn_core.storage.registry_format import (
    ARRAY_NAMES,
    ARRAYS_FORMAT,
    ARRAYS_OBJECT,
    HEAD_OBJECT,
    METRICS_OBJECT,
    PROTOPNET_FORMAT,
    PROTOPNET_OBJECT,
    REQUIRED_TENSORS,
    SLUG_ID_RE,
    EntryInfo,
    ObjectRef,
    RegistryError,
    brief,
    check_bias,
    check_classes,
    check_id,
    check_json,
    check_k,
    check_positive_int,
    digest12,
    fmt_classes,
    phpn_version,
    serialize,
)
from phpn_core.storage.registry_staging import RegistryStaging
from phpn_core.storage.uri import (
    redact,
    safe_join,
)

__all__ = ["RegistryPublishing"]


def _finite_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (metrics can be NaN: an undefined score)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


class RegistryPublishing(RegistryStaging):
    """Publish an entry from its staged classes; record and read a version's metrics."""

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
        check_id(entry_id)  # before anything else, I/O included
        C = check_positive_int("n_classes", n_classes)
        bias_t = check_bias(bias, C)
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
            rows = sorted(check_classes(decomposed, "decomposed"))
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
                f"staged, got {len(missing)} missing: {fmt_classes(missing)}. Fix: compute and stage them with "
                "write_classes (the pipeline's resume recomputes exactly these), then publish again."
            )
        if extra:
            raise RegistryError(
                f"Cannot publish entry {entry_id!r} in the registry at {self.uri}: expected classes 0..{C - 1} "
                f"(n_classes={C}), got staged classes beyond that: {fmt_classes(extra)}. Fix: check n_classes, or "
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
                    f"k={k} (staged), config_digest={digest12(config_digest)}... give {want!r}, got entry id "
                    f"{entry_id!r}. Fix: publish under PrototypeRegistry.entry_id(model, dataset, k, config_digest)."
                )
            ident = {"model": model, "dataset": dataset, "config_digest": config_digest}
        else:
            m = SLUG_ID_RE.match(entry_id)
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
        arrays_bytes = serialize(
            {n: arrays[n] for n in (*ARRAY_NAMES, *diagnostics)},
            {"format": ARRAYS_FORMAT, "entry_id": entry_id, "version": version,
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
            phpn_version=phpn_version(),
            metadata=meta,
            objects=objects,
            **redact(ident, secrets=self._secrets),
        )
        pointer = info.model_dump_json(indent=2).encode("utf-8")
        # Last: the entry becomes visible (or moves to this version) in one atomic write.
        self._put(self._pointer(entry_id), pointer, f"write the pointer of entry {entry_id!r} to")
        return info

    def publish_protopnet(
        self,
        *,
        model: str,
        dataset: str,
        config_digest: str,
        tensors: Mapping[str, torch.Tensor],
        n_classes: int,
        prototypes_per_class: int,
        prototype_dim: int,
        metadata: Mapping[str, Any] | None = None,
    ) -> EntryInfo:
        """Publish a trained ProtoPNet baseline as an entry of kind ``"protopnet"``: ``tensors`` (its state dict and
        push record, flat names, as :func:`phpn_core.protopnet.entry.protopnet_tensors` makes them) go into one
        immutable ``protopnet.safetensors`` under a fresh version, then the pointer is written last (as
        :meth:`publish` does). The entry id is :meth:`entry_id` of ``(model, dataset, prototypes_per_class,
        config_digest)``: give ``model`` a name of its own (``"protopnet-<arch>"``) so that it never collides with
        the phpn entry of the same trunk. ``metadata``: JSON (redacted). Returns the :class:`EntryInfo`.
        """
        C = check_positive_int("n_classes", n_classes)
        m = check_k(prototypes_per_class)
        d = check_positive_int("prototype_dim", prototype_dim)
        entry_id = self.entry_id(model, dataset, m, config_digest)
        meta = self._clean_metadata(metadata)
        if not isinstance(tensors, Mapping) or not tensors or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
            raise InputValueError(
                "publish_protopnet: tensors must be a non-empty mapping of names to tensors (the network's state dict "
                "and push record). Fix: pass phpn_core.protopnet.entry.protopnet_tensors(result).")
        if not all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point()):
            bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all())
            raise InputValueError(f"publish_protopnet: tensors {bad[:5]} hold NaN/inf: expected a trained, finite "
                                  "network. Fix: check the training (lower the learning rates).")
        version = uuid.uuid4().hex
        data = serialize({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                         {"format": PROTOPNET_FORMAT, "entry_id": entry_id, "version": version})
        self._put(safe_join(self._version_dir(entry_id, version), PROTOPNET_OBJECT), data,
                  f"write {PROTOPNET_OBJECT} of entry {entry_id!r} (version {version}) to")
        info = EntryInfo(
            kind="protopnet", entry_id=entry_id, version=version,
            created=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            k=m, n_classes=C, D=d, dtype="float32", phpn_version=phpn_version(), metadata=meta,
            objects={PROTOPNET_OBJECT: ObjectRef(sha256=hashlib.sha256(data).hexdigest(), size=len(data))},
            **redact({"model": model, "dataset": dataset, "config_digest": config_digest}, secrets=self._secrets),
        )
        self._put(self._pointer(entry_id), info.model_dump_json(indent=2).encode("utf-8"),
                  f"write the pointer of entry {entry_id!r} to")
        return info

    def record_metrics(self, entry_id: str, metrics: Mapping[str, Any], *, version: str) -> str:
        """Store a run's evaluation of ``version`` of ``entry_id`` beside its data, as
        ``objects/<entry_id>/<version>/metrics.json``, so that whoever reads the registry (``phpn serve``, a
        notebook) finds the metrics wherever the run directory went. The pointer is not touched: a version's data
        stay immutable and its metrics travel with it (a re-publish starts a version without metrics).

        ``metrics``: JSON with str keys; NaN and infinities are stored as None (JSON has neither); stored redacted.
        ``version``: the version evaluated (``publish(...).version``). Returns the object's URI. Raises
        RegistryError when that version of the entry does not exist, InputValueError for non-JSON metrics.
        """
        check_id(entry_id)
        vdir = self._version_dir(entry_id, version)
        if not any(self._exists(safe_join(vdir, name), f"look up version {version} of entry {entry_id!r} in")
                   for name in (HEAD_OBJECT, PROTOPNET_OBJECT)):
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
            raise self._corrupt(entry_id, version, METRICS_OBJECT, f"it is not JSON ({brief(e)})") from None
        if not isinstance(out, dict):
            raise self._corrupt(entry_id, version, METRICS_OBJECT,
                                f"it holds a JSON {type(out).__name__}, expected an object")
        return out

    def _clean_metadata(self, metadata: Mapping[str, Any] | None) -> dict[str, Any]:
        if metadata is None:
            return {}
        if not isinstance(metadata, Mapping):
            raise InputValueError(
                f"metadata must be a dict of JSON values, got {type(metadata).__name__}. Fix: pass a dict such as "
                "{'config': cfg.model_dump(mode='json'), 'provenance': {...}}."
            )
        check_json(metadata, "metadata")
        clean = redact(dict(metadata), secrets=self._secrets)
        return json.loads(json.dumps(clean, allow_nan=False))  # plain JSON types (tuples -> lists)


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
