"""phpn datasets. Every dataset follows the sample contract of :mod:`phpn_core.data.base`."""

from .base import IMAGENET_MEAN, IMAGENET_STD, Sample, normalize
from .synthparts import MIN_IMAGE_SIZE, PART_TYPES, SynthParts

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Sample",
    "normalize",
    "MIN_IMAGE_SIZE",
    "PART_TYPES",
    "SynthParts",
]
