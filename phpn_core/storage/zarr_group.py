"""The Zarr side of a feature store: open a location as a Zarr store, find a phpn group there, create one with its
arrays in one concurrent batch, and turn any storage failure into a :class:`~phpn_core.errors.StoreError` that
names the location and never a credential."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import zarr
from pydantic import ValidationError

from phpn_core.errors import PhpnError, StoreError
from phpn_core.storage.chunkio import gather_settled
from phpn_core.storage.schema import ATTR_KEY, FORMAT_VERSION, STORE_KIND, FeatureSchema
from phpn_core.storage.uri import StorageLocation, redact

__all__ = ["create_group", "probe_group", "schema_from_meta", "storage_errors", "zarr_store"]


def create_group(
    zstore: zarr.abc.store.Store, meta: dict[str, Any], arrays: list[tuple[str, dict[str, Any], np.ndarray | None]]
) -> zarr.Group:
    """Create the group (deleting whatever is there: mode "w") and its arrays concurrently, write the arrays that
    have data, then set ``layout_complete`` (an interrupted create is detected by its absence and rebuilt). One call
    into zarr's event loop: ~10 sequential metadata writes become one concurrent batch (on S3, one round trip's
    latency instead of ten)."""
    from zarr.api.asynchronous import open_group
    from zarr.core.sync import sync

    async def build() -> zarr.Group:
        group = await open_group(store=zstore, mode="w", zarr_format=3, attributes={ATTR_KEY: meta})
        made = await gather_settled(group.create_array(name, **opts) for name, opts, _ in arrays)
        await gather_settled(a.setitem(slice(None), data) for a, (_, _, data) in zip(made, arrays) if data is not None)
        await group.update_attributes({ATTR_KEY: {**meta, "layout_complete": True}})
        return zarr.Group(group)

    return sync(build())


def zarr_store(loc: StorageLocation, opts: dict[str, Any] | None, *, read_only: bool) -> zarr.abc.store.Store:
    if loc.is_remote:
        return zarr.storage.FsspecStore.from_url(loc.url, storage_options=opts, read_only=read_only)
    return zarr.storage.LocalStore(loc.path, read_only=read_only)


def probe_group(zstore: zarr.abc.store.Store, shown: str) -> tuple[zarr.Group, dict[str, Any] | None] | None:
    """The group at the store's root and its phpn metadata (None if it has none); None if nothing is there."""
    try:
        group = zarr.open_group(store=zstore, mode="r+", zarr_format=3, use_consolidated=False)
    except FileNotFoundError:  # zarr's GroupNotFoundError is one; so is a missing bucket
        return None
    except zarr.errors.ContainsArrayError:
        raise StoreError(
            f"A Zarr array (not a group) exists at {shown}: expected a feature store group or nothing."
            " Fix: choose another URI, or pass overwrite=True to FeatureStore.create to replace it."
        ) from None
    meta = group.attrs.get(ATTR_KEY)
    if not isinstance(meta, dict) or meta.get("kind") != STORE_KIND:
        return group, None
    if meta.get("format_version") != FORMAT_VERSION:
        raise StoreError(
            f"Feature store at {shown} has format {meta.get('format_version')!r}, which is not supported: "
            f"expected format {FORMAT_VERSION}. Fix: re-extract the features with this phpn version (overwrite=True)."
        )
    return group, meta


def schema_from_meta(meta: dict[str, Any], shown: str) -> FeatureSchema:
    try:
        return FeatureSchema.model_validate(meta["schema"])
    except (KeyError, ValidationError) as e:
        raise StoreError(
            f"Feature store at {shown} has unreadable metadata: expected a valid FeatureSchema under "
            f"attributes[{ATTR_KEY!r}]['schema'], got an error: {redact(str(e))}. Fix: recreate the store with "
            "FeatureStore.create(..., overwrite=True)."
        ) from None


@contextmanager
def storage_errors(
    action: str, loc: StorageLocation, opts: dict[str, Any] | None, secrets: tuple[str, ...], *, write: bool
) -> Iterator[None]:
    """Turn I/O failures (OS, botocore, aiohttp, zarr) into a StoreError that names the location and endpoint and
    never a credential. The original exception is not chained: its text is included, redacted."""
    try:
        yield
    except PhpnError:
        raise
    except Exception as e:
        shown = redact(loc.url, secrets=secrets)
        detail = redact(f"{type(e).__name__}: {e}", secrets=secrets)
        if loc.is_remote:
            endpoint = redact(str((opts or {}).get("endpoint_url") or "the default AWS endpoint"), secrets=secrets)
            where = f"{shown} (endpoint {endpoint})"
            fix = (
                "check that the endpoint is up and reachable (storage_options['endpoint_url'] / AWS_ENDPOINT_URL), "
                f"that bucket {loc.bucket!r} exists and that the credentials may {'write' if write else 'read'} it"
            )
        else:
            where = shown
            fix = f"check that the path is {'writable and the disk not full' if write else 'readable'}"
        raise StoreError(
            f"Could not {action} {where}: expected the storage to answer, got {detail}. Fix: {fix}."
        ) from None
