"""Fewer CPU threads while other processes keep cores busy.

torch and faiss run their CPU work on a pool of OpenMP threads, one per core by default, whose
threads spin for a while at every barrier, waiting for each other. When another process keeps
one of those cores busy, the thread that shares it gets a fraction of its time slices, and every
barrier waits for it: on 2 cores, training fell from about 30 to about 8 steps/s while a second
process looped on one core, where one thread alone would have had a whole free core.

While :func:`adaptive` is active (training and encoding enter it), :func:`tick`, called between
batches, measures once a second how many cores the other processes of the machine used
(``/proc/stat`` minus this process's own CPU time, over the cores this process may run on) and
sets the thread count of torch and faiss to the cores left free, at most the count the program
had set (its ceiling), at least 1. The count is restored when the outermost :func:`adaptive`
ends. On an idle machine nothing changes: the cost is one read of ``/proc/stat`` per second.

Off with ``QINCO2_ADAPTIVE_THREADS=0`` in the environment, :func:`set_enabled` or the CLI key
``adaptive_threads=false``; where ``/proc/stat`` cannot be read (not Linux) it does nothing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

import faiss  # isort: skip  (after torch: see qinco2.openmp)

log = logging.getLogger(__name__)
ENV_VARIABLE = "QINCO2_ADAPTIVE_THREADS"
FIRST_PERIOD_S = 0.25    # the first decision, soon after work starts
PERIOD_S = 1.0           # then once a second
TOLERANCE = 0.25         # cores the other processes may use before a thread is given up


@dataclass
class Sample:
    """Counters at one moment: wall clock (s), CPU time of all processes on our cores and of
    this process (core-seconds)."""
    wall_s: float
    busy_s: float
    own_s: float


def _allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def read_sample(cpus: Optional[set[int]] = None, stat_path: str = "/proc/stat") -> Optional[Sample]:
    """The counters now, or None where ``/proc/stat`` cannot be read. Busy time is user, nice,
    system, irq and softirq time of ``cpus`` (default: the cores this process may run on). Steal
    time is left out: a virtual machine whose threads sleep and wake often (``OMP_WAIT_POLICY=PASSIVE``)
    shows a quarter of a core of steal with nothing else running."""
    cpus = _allowed_cpus() if cpus is None else cpus
    try:
        with open(stat_path, "rb") as f:
            lines = f.read().decode("ascii", "replace").splitlines()
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    busy = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        values = [int(v) for v in rest.split()]
        user, nice, system, _idle, _iowait, irq, softirq = (values + [0] * 7)[:7]
        busy += user + nice + system + irq + softirq
    return Sample(time.monotonic(), busy / tick, time.process_time())


def threads_for(others: float, n_cpus: int, ceiling: int, tolerance: float = TOLERANCE) -> int:
    """Threads to run when the other processes used ``others`` cores of ``n_cpus``: the cores
    left once ``others`` (less ``tolerance``) is rounded up, within [1, ceiling]."""
    taken = max(0, math.ceil(others - tolerance))
    return max(1, min(ceiling, n_cpus - taken))


def _set_threads(n: int) -> None:
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


@dataclass
class Governor:
    """The state behind :func:`adaptive` and :func:`tick` (one per process; tests make their own,
    with a fake ``sample`` and ``set_threads``)."""
    sample: Callable[[], Optional[Sample]] = read_sample
    set_threads: Callable[[int], None] = _set_threads
    get_threads: Callable[[], int] = torch.get_num_threads
    clock: Callable[[], float] = time.monotonic
    n_cpus: int = field(default_factory=lambda: len(_allowed_cpus()))
    enabled: bool = field(default_factory=lambda: os.environ.get(ENV_VARIABLE, "1").strip().lower()
                          not in ("0", "false", "no", "off"))
    depth: int = 0
    ceiling: int = 0          # the program's own count, restored at the end
    current: int = 0          # the count set now
    last: Optional[Sample] = None
    next_s: float = 0.0       # when the next decision is due
    decision: Optional[int] = None      # the last count chosen, and when (reused if recent)
    decided_s: float = -math.inf
    changes: int = 0          # how many times the count was changed (tests, benchmarks)

    @contextlib.contextmanager
    def adaptive(self) -> Iterator[None]:
        self.depth += 1
        try:
            if self.depth == 1:
                self._start()
            yield
        finally:
            self.depth -= 1
            if self.depth == 0 and self.current != self.ceiling:
                self.set_threads(self.ceiling)

    def _start(self) -> None:
        self.ceiling = self.current = self.get_threads()
        if not self.enabled or self.ceiling <= 1:
            return
        now = self.clock()
        if self.decision is not None and now - self.decided_s < 5 * PERIOD_S:   # recent: start from it
            self._apply(min(self.decision, self.ceiling))
        if self.last is None or now - self.last.wall_s > 5 * PERIOD_S:
            self.last = self.sample()
            self.next_s = now + FIRST_PERIOD_S

    def tick(self) -> None:
        """Between batches: every second, fit the thread count to the free cores."""
        if self.depth == 0 or not self.enabled or self.ceiling <= 1 or self.last is None:
            return
        if self.get_threads() != self.current:       # the program set a count itself: its new ceiling
            self.ceiling = self.current = self.get_threads()
        now = self.clock()
        if now < self.next_s:
            return
        new = self.sample()
        if new is None:
            self.last = None
            return
        wall = new.wall_s - self.last.wall_s
        if wall <= 0:
            return
        others = max(0.0, (new.busy_s - self.last.busy_s) - (new.own_s - self.last.own_s)) / wall
        self.last, self.next_s = new, now + PERIOD_S
        self.decision, self.decided_s = threads_for(others, self.n_cpus, self.ceiling), now
        if self.decision != self.current:
            log.info("other processes used %.1f of %d cores: %d CPU threads now (of %d)", others, self.n_cpus,
                     self.decision, self.ceiling)
            self._apply(self.decision)

    def _apply(self, n: int) -> None:
        if n != self.current:
            self.set_threads(n)
            self.current = n
            self.changes += 1


GOVERNOR = Governor()


def adaptive() -> contextlib.AbstractContextManager:
    """While active, :func:`tick` fits the CPU thread count to the free cores; the count the program
    had is restored when the outermost one ends. Nested uses are one."""
    return GOVERNOR.adaptive()


def adapting(fn: Callable) -> Callable:
    """``fn`` run inside :func:`adaptive` (a decorator)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with adaptive():
            return fn(*args, **kwargs)
    return run


def tick() -> None:
    """Call between batches of CPU work inside :func:`adaptive` (costs a clock read, and a read of
    ``/proc/stat`` once a second)."""
    GOVERNOR.tick()


def set_enabled(enabled: bool) -> None:
    """Turn the adaptation on or off for this process (default: on, unless ``QINCO2_ADAPTIVE_THREADS=0``)."""
    GOVERNOR.enabled = bool(enabled)
