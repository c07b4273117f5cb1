"""phpn's error types. Each message says what was wrong, what was expected, what was got, and how to fix it."""

from __future__ import annotations


class PhpnError(Exception):
    """Base class of phpn's own errors."""


class ShapeError(PhpnError, ValueError):
    """An input had the wrong shape."""


class InputValueError(PhpnError, ValueError):
    """An input had invalid values (negative, NaN, inf, empty, too few rows)."""


class UnsupportedModelError(PhpnError, ValueError):
    """A model's head is not global-average-pool + linear, or its architecture is not known."""


class StoreError(PhpnError, RuntimeError):
    """A feature store or registry could not be read or written."""


class SchemaMismatchError(PhpnError, ValueError):
    """A store's recorded schema disagrees with what was requested."""


class ConfigError(PhpnError, ValueError):
    """A configuration file or value is invalid."""
