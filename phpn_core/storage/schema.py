"""What a feature store holds and where each image lives: the schema, its identity, and the chunk layout.

:class:`FeatureSchema` is the store's identity and shape (stored as JSON in the group attributes); ``StoreLayout`` places
images class-contiguously on chunk boundaries (see :mod:`phpn_core.storage.feature_store` for the arrays).
No I/O here: the store's reading and writing live in :mod:`~phpn_core.storage.feature_store`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from phpn_core.errors import InputValueError

__all__ = [
    "COMPRESSIONS", "Compression", "FORMAT_VERSION", "FeatureSchema", "IDENTITY_FIELDS", "default_images_per_chunk",
]

Compression = Literal["zstd", "lz4", "none"]
COMPRESSIONS: tuple[str, ...] = ("zstd", "lz4", "none")
"""Feature-chunk compression: ``zstd`` (level 1, the default: about 2x smaller post-ReLU maps for half the encode
time of zarr's default level), ``lz4`` (blosc, byte-shuffled: faster, larger) or ``none`` (raw bytes: cheapest to
write, for fast local disks). Extraction encodes in background threads, so on few cores this cost competes with the
forward pass; reading decodes."""


def compressors_for(compression: Any) -> tuple:
    from zarr.codecs import BloscCodec, ZstdCodec

    if compression == "zstd":
        return (ZstdCodec(level=1),)
    if compression == "lz4":
        return (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),)
    if compression == "none":
        return ()
    raise InputValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}; e.g. compression='zstd'")


FORMAT_VERSION = 1
ATTR_KEY = "phpn"
STORE_KIND = "feature_store"
# Identity of the features: two stores with equal values here hold the same numbers (up to nondeterminism).
IDENTITY_FIELDS = (
    "model",
    "checkpoint_digest",
    "layer",
    "input_size",
    "dataset_fingerprint",
    "split",
    "dtype",
    "feature_shift",
)
# Fields that fix the store's layout; with an equal fingerprint they must agree too before a store is resumed.
_STRUCTURE_FIELDS = ("n_images", "n_classes", "feature_shape", "class_names", "part_names")
_CHUNK_BYTES_MIN = 1 << 20
_CHUNK_BYTES_MAX = 4 << 20
INDEX_CHUNK_ROWS = 1 << 18  # 1-D index arrays: few, large chunks (they are read whole)


def _phpn_version() -> str:
    try:
        from importlib.metadata import version

        return version("phpn")
    except Exception:  # not installed (a source checkout on sys.path)
        return "0+unknown"


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class FeatureSchema(BaseModel):
    """What a feature store holds. Frozen; unknown fields are refused. Stored as JSON in the group attributes.

    ``feature_shape`` is ``(H, W, D)`` of one image's feature map (channels last). ``feature_shift`` is the
    constant added to the features to make them non-negative (0.0 for post-ReLU features).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    model: str = Field(min_length=1)
    checkpoint_digest: str = Field(min_length=1)
    layer: str = Field(min_length=1)
    input_size: int = Field(ge=1)
    dataset: str = Field(min_length=1)
    dataset_fingerprint: str = Field(min_length=1)
    split: str = Field(min_length=1)
    dtype: Literal["float16", "float32"] = "float32"
    feature_shift: float = Field(default=0.0, allow_inf_nan=False)
    n_images: int = Field(ge=1)
    n_classes: int = Field(ge=1)
    feature_shape: tuple[int, int, int]
    class_names: list[str]
    part_names: list[str] | None = None
    phpn_version: str = Field(default_factory=_phpn_version)
    created: str = Field(default_factory=_now_iso)

    @field_validator("feature_shape")
    @classmethod
    def _positive_shape(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(s < 1 for s in v):
            raise ValueError(f"feature_shape must be (H, W, D) with every size >= 1, got {v}")
        return v

    @field_validator("created")
    @classmethod
    def _iso_datetime(cls, v: str) -> str:
        try:
            datetime.fromisoformat(v)
        except ValueError:
            raise ValueError(f"created must be an ISO 8601 datetime such as '2024-05-01T12:00:00+00:00', got {v!r}")
        return v

    @field_validator("part_names")
    @classmethod
    def _nonempty_parts(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(v) == 0:
            raise ValueError("part_names must be None (no parts) or a non-empty list")
        return v

    @model_validator(mode="after")
    def _class_names_match(self) -> FeatureSchema:
        if len(self.class_names) != self.n_classes:
            raise ValueError(
                f"class_names must have n_classes={self.n_classes} entries, got {len(self.class_names)}"
            )
        return self

    def identity(self) -> dict[str, Any]:
        """The identity fields (:data:`IDENTITY_FIELDS`) as a dict."""
        return {k: getattr(self, k) for k in IDENTITY_FIELDS}

    def fingerprint(self) -> str:
        """A short stable digest (16 hex chars) of the identity fields; independent of ``created``/``phpn_version``."""
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]

    def identity_diff(self, other: FeatureSchema) -> dict[str, tuple[Any, Any]]:
        """``{field: (self's value, other's value)}`` for the identity fields that differ."""
        return {
            k: (getattr(self, k), getattr(other, k)) for k in IDENTITY_FIELDS if getattr(self, k) != getattr(other, k)
        }

    def structure_diff(self, other: FeatureSchema) -> dict[str, tuple[Any, Any]]:
        """``{field: (self's value, other's value)}`` for the layout fields (sizes, names) that differ."""
        return {
            k: (getattr(self, k), getattr(other, k)) for k in _STRUCTURE_FIELDS if getattr(self, k) != getattr(other, k)
        }


def default_images_per_chunk(counts: Sequence[int] | np.ndarray, image_bytes: int) -> int:
    """Images per chunk for class sizes ``counts [C]`` and ``image_bytes`` per image (H*W*D*itemsize).

    Among sizes whose chunks are 1-4 MiB (clipped to [1, largest class]), the one with the fewest padding rows,
    ties going to the larger size (fewer objects). E.g. 30 images/class of 7x7x512 float32 -> 30 (3 MiB, no padding).
    """
    counts = np.asarray(counts, dtype=np.int64)
    largest = int(max(1, counts.max(initial=1)))
    lo = max(1, math.ceil(_CHUNK_BYTES_MIN / max(1, image_bytes)))
    hi = max(1, _CHUNK_BYTES_MAX // max(1, image_bytes))
    lo, hi = min(lo, largest), min(hi, largest)
    lo = min(lo, hi)
    ipc = np.arange(lo, hi + 1, dtype=np.int64)
    rows = (-(-counts[None, :] // ipc[:, None]) * ipc[:, None]).sum(axis=1)  # padded rows per candidate
    best = np.flatnonzero(rows == rows.min())
    return int(ipc[best[-1]])


class StoreLayout:
    """Where each image lives. ``class_offsets [C+1]`` block starts (chunk-aligned), ``class_counts [C]``,
    ``dataset_index [R]`` (-1 on padding), ``ipc`` images per chunk."""

    def __init__(self, *, ipc: int, class_offsets: np.ndarray, class_counts: np.ndarray, dataset_index: np.ndarray):
        self.ipc = int(ipc)
        self.class_offsets = np.asarray(class_offsets, dtype=np.int64)
        self.class_counts = np.asarray(class_counts, dtype=np.int64)
        self.dataset_index = np.asarray(dataset_index, dtype=np.int64)
        self.n_rows = int(self.class_offsets[-1])
        self.n_chunks = self.n_rows // self.ipc

    @classmethod
    def build(cls, labels: np.ndarray, n_classes: int, ipc: int) -> StoreLayout:
        counts = np.bincount(labels, minlength=n_classes).astype(np.int64)
        chunks_per_class = -(-counts // ipc)
        offsets = np.concatenate([[0], np.cumsum(chunks_per_class) * ipc]).astype(np.int64)
        order = np.argsort(labels, kind="stable")  # class-contiguous, dataset order within a class
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank = np.arange(len(labels)) - starts[labels[order]]
        rows = offsets[labels[order]] + rank
        dataset_index = np.full(int(offsets[-1]), -1, dtype=np.int64)
        dataset_index[rows] = order
        return cls(ipc=ipc, class_offsets=offsets, class_counts=counts, dataset_index=dataset_index)
