"""The registry's storage: one fsspec filesystem, its folder layout, and the object primitives (whole-object PUTs
and atomic local writes, reads that treat "not there" as None, listings, removal), each turning any failure into a
:class:`~phpn_core.storage.registry_format.RegistryError` without credentials; and following an entry's pointer to
its verified objects. :class:`~phpn_core.storage.registry.PrototypeRegistry` builds on it."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import Any

import fsspec
from pydantic import ValidationError

from phpn_core.errors import PhpnError
from phpn_core.storage.registry_format import (
    ENTRY_FORMAT,
    ID_RE,
    MAX_REQUESTS,
    VERSION_RE,
    EntryInfo,
    RegistryError,
    brief,
    check_id,
)
from phpn_core.storage.uri import (
    StorageLocation,
    parse_uri,
    redact,
    resolve_storage_options,
    safe_join,
    secrets_of,
)

__all__ = ["RegistryObjects"]


class RegistryObjects:
    """Where a registry's objects live and how they are read and written (see the module docstring)."""

    def __init__(self, uri: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None) -> None:
        self._loc: StorageLocation = parse_uri(uri)
        opts = resolve_storage_options(uri, storage_options)
        if opts is not None:
            # Other processes write here: a cached listing would hide their classes and entries.
            opts["use_listings_cache"] = False
        self._options = opts
        self._secrets = secrets_of(opts)

    @property
    def uri(self) -> str:
        """The registry's canonical URI, with any credentials redacted."""
        return redact(self._loc.url, secrets=self._secrets)

    @property
    def is_remote(self) -> bool:
        """True for an ``s3://`` registry (where overlapping requests pays)."""
        return self._loc.is_remote

    def entry_ids(self) -> list[str]:
        """The ids of the entries with a pointer, ascending (the listing alone: no pointer is read)."""
        return self._entry_ids()

    @cached_property
    def _fs(self) -> fsspec.AbstractFileSystem:
        with self._io("connect to"):
            if self._loc.is_remote:
                return fsspec.filesystem(self._loc.scheme, **(self._options or {}))
            return fsspec.filesystem("file")

    def _staging_dir(self, entry_id: str) -> str:
        return safe_join(self._loc.url, f"staging/{check_id(entry_id)}")

    def _objects_dir(self, entry_id: str) -> str:
        return safe_join(self._loc.url, f"objects/{check_id(entry_id)}")

    def _version_dir(self, entry_id: str, version: str) -> str:
        if not isinstance(version, str) or not VERSION_RE.match(version):
            raise RegistryError(
                f"Invalid version {redact(str(version))!r} in the registry at {self.uri}: expected 32 hex digits "
                "(a uuid). Fix: publish the entry again."
            )
        return safe_join(self._loc.url, f"objects/{check_id(entry_id)}/{version}")

    def _pointer(self, entry_id: str) -> str:
        return safe_join(self._loc.url, f"entries/{check_id(entry_id)}.json")

    def _entry_ids(self) -> list[str]:
        names = self._ls_names(safe_join(self._loc.url, "entries"), "list the entries of")
        return sorted(n[: -len(".json")] for n in names if n.endswith(".json") and ID_RE.match(n[: -len(".json")]))

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
                f"{ENTRY_FORMAT} JSON document, got errors: {redact(brief(e), secrets=self._secrets)}. "
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
        with ThreadPoolExecutor(min(MAX_REQUESTS, len(items))) as pool:
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
