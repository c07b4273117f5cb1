"""Old import path, kept for outside scripts: the feature store lives in :mod:`phpn_core.storage`."""

from phpn_core.storage.feature_store import FeatureStore, default_images_per_chunk
from phpn_core.storage.schema import Compression, FeatureSchema

__all__ = ["FeatureStore", "FeatureSchema", "Compression", "default_images_per_chunk"]
