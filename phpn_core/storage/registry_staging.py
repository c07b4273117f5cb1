"""The registry's staging area: one object per decomposed class, written by the distributed tasks and read back
by the publisher (``staging/<entry_id>/class-00042.safetensors``; see :mod:`phpn_core.storage.registry`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from phpn_core.storage.registry_format import (
    CLASS_FILE_RE,
    CLASS_FORMAT,
    REQUIRED_TENSORS,
    RegistryError,
    brief,
    check_classes,
    check_tensors,
    class_file,
    fmt_classes,
    safetensors_metadata,
    serialize,
    stack,
)
from phpn_core.storage.registry_objects import RegistryObjects
from phpn_core.storage.uri import (
    redact,
    safe_join,
)

__all__ = ["RegistryStaging"]


class RegistryStaging(RegistryObjects):
    """Write, list, read and drop a run's staged classes."""

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
        idx = check_classes(classes, "classes")
        k, D, arrays = check_tensors(tensors, len(idx))

        def write_one(pos: int) -> str:
            c = idx[pos]
            per_class = {name: t[pos].clone() for name, t in arrays.items()}  # independent, contiguous slices
            meta = {"format": CLASS_FORMAT, "entry_id": entry_id, "class": str(c), "k": str(k), "D": str(D)}
            path = safe_join(root, class_file(c))
            self._put(path, serialize(per_class, meta), f"stage class {c} of entry {entry_id!r} in")
            return redact(path, secrets=self._secrets)

        return self._map(write_one, range(len(idx)))

    def staged_classes(self, entry_id: str) -> set[int]:
        """The classes of ``entry_id`` that are completely staged (an interrupted write is not among them)."""
        root = self._staging_dir(entry_id)
        out = set()
        for name in self._ls_names(root, f"list the staged classes of entry {entry_id!r} in"):
            m = CLASS_FILE_RE.match(name)
            if m:
                out.add(int(m.group("c")))
        return out

    def read_staged(self, entry_id: str, classes: Sequence[int]) -> dict[str, torch.Tensor]:
        """The staged tensors of ``classes`` (``n`` of them), stacked in that order: ``prototypes [n, k, D]``,
        ``initial [n, k, D]``, ``alpha [n, k]``, ``residual [n, k, D]``, ``rel_error [n]``, ``head_error [n]`` and
        the diagnostics ``[n]``, on the CPU. Raises RegistryError when some are not staged or the staged classes
        disagree (shapes, dtypes, names)."""
        root = self._staging_dir(entry_id)
        idx = check_classes(classes, "classes")
        blobs = self._map(
            lambda c: self._cat(safe_join(root, class_file(c)), f"read staged class {c} of entry {entry_id!r} from"),
            idx,
        )
        missing = [c for c, data in zip(idx, blobs) if data is None]
        if missing:
            raise RegistryError(
                f"Entry {entry_id!r} in the registry at {self.uri} lacks staged classes: expected "
                f"{fmt_classes(idx)} staged, got {len(missing)} missing: {fmt_classes(missing)}. "
                "Fix: compute and stage them with write_classes (staged_classes tells which are there)."
            )
        per_class = [self._parse_class(data, entry_id, c) for c, data in zip(idx, blobs)]
        return stack(per_class, idx, entry_id, self.uri)

    def drop_staged(self, entry_id: str, c: int) -> bool:
        """Remove class ``c``'s staged object (to recompute it). Returns whether it was there."""
        root = self._staging_dir(entry_id)
        (c,) = check_classes([c], "c")
        return self._rm(safe_join(root, class_file(c)), f"drop staged class {c} of entry {entry_id!r} from")

    def clear_staged(self, entry_id: str) -> int:
        """Remove all of ``entry_id``'s staged classes (e.g. once it is published). Returns how many there were."""
        root = self._staging_dir(entry_id)
        n = len(self.staged_classes(entry_id))
        self._rm(root, f"clear the staging of entry {entry_id!r} in", recursive=True)
        return n

    def _parse_class(self, data: bytes, entry_id: str, c: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load as st_load

        def bad(why: str) -> RegistryError:
            return RegistryError(
                f"Staged class {c} of entry {entry_id!r} in the registry at {self.uri} is unusable: {why}. "
                f"Fix: drop_staged({entry_id!r}, {c}) and compute it again."
            )

        try:
            meta = safetensors_metadata(data)
            tensors = st_load(data)
        except Exception as e:
            raise bad(f"expected a safetensors file, got an unreadable object ({brief(e)})") from None
        if meta.get("format") != CLASS_FORMAT:
            raise bad(f"expected format {CLASS_FORMAT!r}, got {meta.get('format')!r}")
        if meta.get("entry_id") != entry_id or meta.get("class") != str(c):
            raise bad(
                f"expected class {c} of entry {entry_id!r}, got class {meta.get('class')!r} of entry "
                f"{meta.get('entry_id')!r}"
            )
        absent = [n for n in REQUIRED_TENSORS if n not in tensors]
        if absent:
            raise bad(f"expected tensors {list(REQUIRED_TENSORS)}, got {sorted(tensors)} ({absent} absent)")
        return tensors
