"""Small named-tensor files by URI (local path or s3://), as safetensors: no pickle, one atomic object each."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from typing import Any

import torch

from phpn_core.errors import StoreError
from phpn_core.storage.uri import parse_uri, redact, resolve_storage_options

__all__ = ["write_tensors", "read_tensors"]


def _fs(uri: str, storage_options: Mapping[str, Any] | None):
    import fsspec

    loc = parse_uri(uri)
    opts = resolve_storage_options(uri, storage_options) or {}
    fs, path = fsspec.core.url_to_fs(loc.url, **opts)
    return fs, path, loc


def write_tensors(uri: str, tensors: Mapping[str, torch.Tensor], *, metadata: Mapping[str, Any] | None = None,
                  storage_options: Mapping[str, Any] | None = None) -> str:
    """Write ``tensors`` to ``uri`` atomically (local: temp file + rename; S3: one PUT). Returns the redacted URI."""
    from safetensors.torch import save

    blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                metadata={"phpn": json.dumps(dict(metadata or {}))})
    fs, path, loc = _fs(uri, storage_options)
    try:
        if loc.is_remote:
            fs.pipe_file(path, blob)
        else:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    f.write(blob)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)  # whole or not at all
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    except OSError as e:
        raise StoreError(f"could not write {redact(uri)}: {redact(str(e))}") from None
    return redact(uri)


def read_tensors(uri: str, *, storage_options: Mapping[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`write_tensors`: ``(tensors, metadata)``. Only safetensors is parsed (never a
    pickle): anything else raises StoreError without running any of its content."""
    from safetensors.torch import load

    fs, path, _ = _fs(uri, storage_options)
    try:
        blob = fs.cat_file(path)
    except FileNotFoundError:
        raise StoreError(f"no tensor file at {redact(uri)}; was the step that writes it run?") from None
    except OSError as e:
        raise StoreError(f"could not read {redact(uri)}: {redact(str(e))}") from None
    try:
        meta = json.loads(_header(blob).get("__metadata__", {}).get("phpn", "{}"))
        tensors = load(blob)
    except Exception as e:
        raise StoreError(
            f"{redact(uri)} is not a phpn tensor file: expected safetensors written by write_tensors, got "
            f"{len(blob)} bytes that do not parse ({type(e).__name__}). Nothing in it was run. Fix: re-run the step "
            "that writes it (the flow rewrites it on the next run)."
        ) from None
    if not isinstance(meta, dict):
        meta = {}
    return tensors, meta


def _header(blob: bytes) -> dict:
    """The JSON header of a safetensors blob (its ``__metadata__`` holds the string metadata)."""
    if len(blob) < 8:
        raise ValueError("too short for a safetensors header")
    n = int.from_bytes(blob[:8], "little")
    if n > len(blob) - 8 or n > 100_000_000:
        raise ValueError("header length out of range")
    header = json.loads(blob[8 : 8 + n])
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header
