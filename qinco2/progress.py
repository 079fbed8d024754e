"""Progress bars that suit where they are read: a terminal, a notebook or a log file.

    >>> from qinco2.progress import progress_bar
    >>> for block in progress_bar(range(3), desc="blocks", enabled=False):
    ...     pass

On a terminal :func:`progress_bar` is a plain tqdm bar redrawn in place; in a notebook,
tqdm's widget. Where stderr is redirected (a batch job's log, ``2> log``), a redrawn bar
would leave one line per refresh, thousands in a long run; there it writes one whole line at
the start, then at most one every :data:`LOG_INTERVAL_S` seconds, and nothing to clear at the
end. ``enabled=False`` shows nothing (the library's ``progress=False``).
"""

from __future__ import annotations

import sys

from tqdm import autonotebook, std

__all__ = ["LOG_INTERVAL_S", "progress_bar", "is_terminal"]

LOG_INTERVAL_S = 30.0   # seconds between two progress lines in a log file


class _LogLines(std.tqdm):
    """A tqdm bar written as whole lines: no carriage returns, no clearing."""

    def display(self, msg=None, pos=None):
        if msg == "":                 # tqdm clearing its line on close: a log has nothing to clear
            return False
        self.fp.write(f"{(msg if msg is not None else str(self)).strip()}\n")
        self.fp.flush()
        return True


def is_terminal(stream) -> bool:
    """Whether ``stream`` (default stderr where None) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):    # no isatty, or closed
        return False


def progress_bar(iterable=None, *, enabled: bool = True, **kwargs) -> std.tqdm:
    """A tqdm bar (same arguments as ``tqdm.tqdm``) drawn the way its reader sees it best (see
    the module docstring). ``enabled=False``, or tqdm's ``disable=True``, shows nothing."""
    if not enabled:
        kwargs["disable"] = True
    if kwargs.get("disable"):
        return std.tqdm(iterable, **kwargs)
    if autonotebook.tqdm is not std.tqdm:     # a notebook: tqdm's widget
        return autonotebook.tqdm(iterable, **kwargs)
    if is_terminal(kwargs.get("file")):
        return std.tqdm(iterable, **kwargs)
    kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    kwargs.setdefault("maxinterval", max(kwargs["mininterval"], LOG_INTERVAL_S))
    kwargs.setdefault("ncols", 100)
    return _LogLines(iterable, **kwargs)
