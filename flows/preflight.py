"""Checks that run before any compute: a bad config or an unreachable store fails in seconds, not mid-run."""

from __future__ import annotations

from pathlib import Path

from phpn_core.config import RunConfig
from phpn_core.errors import StoreError
from phpn_core.storage.uri import parse_uri, redact, resolve_storage_options


def check_store_reachable(uri: str) -> None:
    """Raise StoreError unless ``uri``'s bucket (S3) or parent directory (local) can be reached and written."""
    loc = parse_uri(uri)
    if not loc.is_remote:
        parent = Path(loc.path)
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise StoreError(f"store {uri!r}: {parent} is not a directory; choose a writable location.")
        return
    import fsspec

    opts = resolve_storage_options(uri, None) or {}
    try:
        fs = fsspec.filesystem("s3", **opts)
        fs.ls(loc.bucket, refresh=True)
    except FileNotFoundError:
        raise StoreError(f"store {redact(uri)}: bucket {loc.bucket!r} does not exist; create it first.") from None
    except Exception as e:  # botocore wraps connection failures in several types
        endpoint = opts.get("endpoint_url") or opts.get("client_kwargs", {}).get("endpoint_url") or "AWS default"
        raise StoreError(
            f"store {redact(uri)} is unreachable (endpoint {redact(str(endpoint))}): {type(e).__name__}: "
            f"{redact(str(e))[:200]}. Check AWS_ENDPOINT_URL and the credentials in the environment."
        ) from None


def preflight(cfg: RunConfig, out_dir: str | Path) -> None:
    """Everything checkable without compute: stores reachable (the config model validated the rest)."""
    for uri in (cfg.storage.features_uri, cfg.storage.registry_uri):
        if uri:
            check_store_reachable(uri)
    check_store_reachable(str(Path(out_dir).resolve()))
