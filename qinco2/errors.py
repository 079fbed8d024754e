"""Typed errors raised at the boundary of the library.

Every message says what was expected, what came, and how to fix it.
All errors derive from :class:`QincoError`, so callers can catch one type.
"""


class QincoError(Exception):
    """Base class of every error raised on purpose by qinco2."""


class VectorFileError(QincoError, ValueError):
    """A vector file is malformed, truncated, of unknown type or holds bad values."""


class DatasetError(QincoError, ValueError):
    """A named data set or one of its files cannot be found or is inconsistent."""


class InputError(QincoError, ValueError):
    """An array passed to the API has the wrong rank, dimension, dtype or values."""


class NotTrainedError(QincoError, RuntimeError):
    """A codec or index was used before `train` (or `load`)."""


class ModelFileError(QincoError, ValueError):
    """A file passed as a model is not a qinco2 model or has an unsupported format version."""


class ConfigError(QincoError, ValueError):
    """A configuration key or value is unknown or invalid (CLI and config dataclasses)."""
