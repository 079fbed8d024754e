"""The ``qinco2 task=... key=value ...`` command line: a thin layer over the public API."""

from .main import main

__all__ = ["main"]
