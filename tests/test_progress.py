"""Tests of qinco2.progress: bars on a terminal, whole lines in a redirected log, nothing when
disabled; and a training run's log when stderr is a file (issue: thousands of redrawn lines)."""

from __future__ import annotations

import io
import logging

from qinco2.codec.codec import QincoCodec
from qinco2.progress import LOG_INTERVAL_S, is_terminal, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(stream, n: int = 5000, **kwargs) -> str:
    with progress_bar(total=n, desc="work", file=stream, leave=False, **kwargs) as bar:
        for _ in range(n):
            bar.update(1)
            bar.set_postfix(loss="0.1", refresh=False)
    return stream.getvalue()


def test_a_log_gets_whole_lines_at_most_one_per_interval():
    out = _run(io.StringIO())
    assert "\r" not in out and "\x1b" not in out          # no redraws, no cursor moves
    lines = out.splitlines()
    # the start line, then one per LOG_INTERVAL_S (this loop takes far less than 30 s)
    assert 1 <= len(lines) <= 2, lines
    assert lines[0].startswith("work:")
    assert LOG_INTERVAL_S == 30.0


def test_a_log_line_is_written_once_the_interval_has_passed():
    out = _run(io.StringIO(), n=3, mininterval=0, maxinterval=0, miniters=1)
    lines = out.splitlines()
    assert len(lines) == 4 and lines[-1].startswith("work: 100%")   # start + one per update, whole lines


def test_a_terminal_gets_a_redrawn_bar():
    out = _run(_Terminal(), n=10)
    assert "\r" in out


def test_disabled_writes_nothing():
    stream = io.StringIO()
    assert _run(stream, enabled=False) == "" and _run(_Terminal(), enabled=False) == ""
    assert _run(io.StringIO(), disable=True) == ""


def test_is_terminal_of_odd_streams():
    assert not is_terminal(io.StringIO()) and is_terminal(_Terminal())
    assert not is_terminal(object())       # no isatty: not a terminal
    closed = io.StringIO()
    closed.close()
    assert not is_terminal(closed)


def test_training_into_a_log_file_writes_few_lines_and_one_summary_per_epoch(clustered, capsys, caplog):
    """stderr captured (not a terminal): 40 batches per epoch give at most a start line per
    epoch bar, and each epoch has its one-line summary in the log."""
    x = clustered(2200, seed=1)
    codec = QincoCodec.from_preset("qinco2-S", M=2, K=16, L=1, dh=16, A=2, B=2, batch=50, epochs=3,
                                   max_epochs=3, seed=0)
    with caplog.at_level(logging.INFO, logger="qinco2"):
        codec.train(x[:2000], x[2000:], progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    bar_lines = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert len(bar_lines) <= 2 * 3, bar_lines       # ~40 batches x 3 epochs drawn as <= 2 lines each
    summaries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(summaries) == 3 and "val MSE" in summaries[0]
