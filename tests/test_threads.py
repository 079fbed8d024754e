"""qinco2.threads: fewer CPU threads while other processes keep cores busy."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from qinco2 import QincoCodec, threads
from qinco2.threads import FIRST_PERIOD_S, PERIOD_S, Governor, Sample, read_sample, threads_for


class Machine:
    """A fake machine: a clock, the cores the other processes keep busy, and the thread count."""

    def __init__(self, others: float = 0.0, threads_now: int = 2):
        self.t, self.others, self.busy, self.own = 100.0, others, 0.0, 0.0
        self.threads, self.calls, self.samples = threads_now, [], 0

    def advance(self, seconds: float, own_cores: float = 1.0) -> None:
        self.t += seconds
        self.busy += (self.others + own_cores) * seconds
        self.own += own_cores * seconds

    def sample(self) -> Sample:
        self.samples += 1
        return Sample(self.t, self.busy, self.own)

    def set_threads(self, n: int) -> None:
        self.calls.append(n)
        self.threads = n

    def governor(self, **kw) -> Governor:
        return Governor(sample=self.sample, set_threads=self.set_threads, get_threads=lambda: self.threads,
                        clock=lambda: self.t, n_cpus=kw.pop("n_cpus", 2), enabled=kw.pop("enabled", True), **kw)


@pytest.mark.parametrize("others, n_cpus, ceiling, expected", [
    (0.0, 2, 2, 2), (0.2, 2, 2, 2), (0.3, 2, 2, 1), (1.0, 2, 2, 1), (3.0, 2, 2, 1),
    (0.0, 2, 1, 1), (3.0, 16, 8, 8), (9.0, 16, 8, 7), (15.9, 16, 8, 1)])
def test_threads_for(others, n_cpus, ceiling, expected):
    assert threads_for(others, n_cpus, ceiling) == expected


def test_busy_core_gives_up_a_thread_and_restores_it():
    m = Machine(others=1.0)
    g = m.governor()
    with g.adaptive():
        g.tick()                                # not due yet: nothing measured
        assert m.calls == [] and m.samples == 1
        m.advance(FIRST_PERIOD_S)
        g.tick()
        assert m.calls == [1] and m.threads == 1
        m.others = 0.0                          # the other process ends
        m.advance(PERIOD_S / 2)
        g.tick()
        assert m.calls == [1]                   # within the period: no new measure
        m.advance(PERIOD_S)
        g.tick()
        assert m.calls == [1, 2]
        m.others = 1.0
        m.advance(PERIOD_S)
        g.tick()
    assert m.calls == [1, 2, 1, 2] and m.threads == 2     # restored at the end


def test_idle_machine_costs_one_sample_per_period():
    m = Machine(others=0.02)
    g = m.governor()
    with g.adaptive():
        for _ in range(1000):                   # 10 s of 10 ms batches
            m.advance(0.01)
            g.tick()
    assert m.calls == [] and g.changes == 0
    assert m.samples <= 1 + 10 / PERIOD_S + 1


def test_nested_and_recent_decision():
    m = Machine(others=1.0)
    g = m.governor()
    with g.adaptive():
        with g.adaptive():
            m.advance(1.0)
            g.tick()
        assert m.threads == 1                   # the inner end does not restore
    assert m.threads == 2
    m.advance(1.0)
    with g.adaptive():                          # a decision 1 s old is used at once
        assert m.threads == 1
    m.advance(10 * PERIOD_S)
    calls = len(m.calls)
    with g.adaptive():                          # an old one is not
        assert m.threads == 2 and len(m.calls) == calls


def test_program_sets_its_own_count():
    m = Machine(others=1.0, threads_now=4)
    g = m.governor(n_cpus=4)
    with g.adaptive():
        m.advance(1.0)
        g.tick()
        assert m.threads == 3
        m.threads = 2                           # torch.set_num_threads(2) by the program
        m.advance(1.0)
        g.tick()
        assert m.threads == 2 and g.ceiling == 2
    assert m.threads == 2


@pytest.mark.parametrize("kw", [{"enabled": False}, {"threads_now": 1}])
def test_off_or_one_thread_does_nothing(kw):
    m = Machine(others=1.5, threads_now=kw.get("threads_now", 2))
    g = m.governor(enabled=kw.get("enabled", True))
    with g.adaptive():
        for _ in range(5):
            m.advance(1.0)
            g.tick()
    assert m.calls == [] and m.samples == 0


def test_read_sample_parses_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  900 0 900 900 0 0 0 0 0 0\n"
                    "cpu0 100 10 20 500 7 1 2 3 0 0\n"
                    "cpu1 200 0 30 400 0 0 0 0 0 0\n"
                    "cpu2 999 0 999 0 0 0 0 0 0 0\n"
                    "intr 12345\n")
    import os
    tick = os.sysconf("SC_CLK_TCK")
    s = read_sample({0, 1}, str(stat))
    assert s.busy_s == pytest.approx((100 + 10 + 20 + 1 + 2 + 200 + 30) / tick)     # steal (3) left out
    assert read_sample({0}, str(tmp_path / "missing")) is None


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs /proc/stat (Linux)")
def test_real_machine_sees_a_busy_process():
    base = read_sample()
    time.sleep(0.5)
    idle = read_sample()
    assert idle.busy_s >= base.busy_s and idle.own_s >= base.own_s
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        a = read_sample()
        time.sleep(1.0)
        b = read_sample()
    finally:
        busy.kill()
        busy.wait()
    others = ((b.busy_s - a.busy_s) - (b.own_s - a.own_s)) / (b.wall_s - a.wall_s)
    assert others >= 0.5


@pytest.fixture
def busy_governor(monkeypatch):
    """The process's governor replaced by one on a fake machine with one core busy elsewhere, and
    a clock that moves one second per look, with torch at 2 threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    m = Machine(others=1.0)
    clock = iter(range(10**6))
    g = Governor(sample=lambda: Sample(float(m.t), float(m.t), 0.0), set_threads=m.set_threads,
                 get_threads=lambda: m.threads, n_cpus=2, enabled=True)
    g.clock = lambda: setattr(m, "t", next(clock)) or float(m.t)
    monkeypatch.setattr(threads, "GOVERNOR", g)
    yield m
    torch.set_num_threads(old)


def test_encoding_and_training_adapt(busy_governor):
    m = busy_governor
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 8)).astype(np.float32)
    codec = QincoCodec.from_preset("qinco2-S", M=2, K=8, L=1, de=8, dh=8, A=4, B=2, batch=64, max_epochs=1,
                                   seed=0, small_data="keep")
    codec.train(x[:500], x[500:], progress=False)
    assert 1 in m.calls and m.threads == 2          # lowered during training, restored after
    m.calls.clear()
    codes = codec.encode(x[:50])
    assert m.calls[0] == 1 and m.threads == 2
    threads.GOVERNOR.enabled = False
    assert np.array_equal(codec.encode(x[:50]), codes)
