"""Data-parallel processes: who am I, and the few collective operations training and
encoding need, over accelerate's process state.

Launch with ``scripts/launch.sh -n 2 task=...`` (``torchrun`` on CPUs, ``accelerate launch``
on GPUs) or any launcher that sets ``RANK``/``WORLD_SIZE``; a plain ``python`` run is one
process and every operation here is then a no-op. Several machines: the same command on each
with ``--nnodes N --node-rank R --master-addr HOST`` (docs/multinode.md); nothing here depends
on where the processes run, but the output and the data paths must be the same for all.

A process that fails must not leave the others waiting at the next collective: the work
between two collectives runs in ``with workers.synced("what"):``, whose end is a barrier that
also shares errors, so that every process stops with the first failure
(:class:`WorkerFailedError` in the processes that did not fail themselves).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .errors import ConfigError, QincoError

log = logging.getLogger(__name__)
_announced = False


class WorkerFailedError(QincoError, RuntimeError):
    """Another process of a launched job failed; this one stops too."""


@dataclass(frozen=True)
class Workers:
    """Rank and number of the cooperating processes (``world_size == 1``: alone)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environment(cls, cpu: bool = False) -> tuple["Workers", torch.device]:
        """The processes started by the launcher and this process's device (one process and
        None when not launched: the caller picks the device)."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls(), None
        from accelerate import PartialState

        state = PartialState(cpu=cpu or not torch.cuda.is_available())
        if not torch.distributed.is_initialized():
            raise ConfigError("WORLD_SIZE > 1 but no process group could be set up; launch with "
                              "scripts/launch.sh, torchrun or accelerate launch")
        workers = cls(state.process_index, state.num_processes)
        workers._announce(state.device)
        return workers, state.device

    def _announce(self, device) -> None:
        """Log, once per process, where this process sits in the job (the machine, its node
        rank as the launcher numbered it, the backend), so that each node's log shows it took
        part."""
        global _announced
        if _announced:
            return
        _announced = True
        log.info("process %d of %d: node %s, local process %s of %s, host %s, device %s, backend %s, "
                 "rendezvous %s:%s", self.rank, self.world_size, os.environ.get("GROUP_RANK", "?"),
                 os.environ.get("LOCAL_RANK", "?"), os.environ.get("LOCAL_WORLD_SIZE", "?"),
                 socket.gethostname(), device, torch.distributed.get_backend(),
                 os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?"))

    # ------------------------------------------------------------------ collectives
    def all_reduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place sum / max / mean of ``t`` over the processes."""
        if self.distributed:
            red = {"sum": torch.distributed.ReduceOp.SUM, "mean": torch.distributed.ReduceOp.SUM,
                   "max": torch.distributed.ReduceOp.MAX}[op]
            torch.distributed.all_reduce(t, red)
            if op == "mean":
                t /= self.world_size
        return t

    def mean_grads_(self, params) -> None:
        """Average the gradients of ``params`` over the processes (one flat all-reduce)."""
        if not self.distributed:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.all_reduce_(flat, "mean")
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast_module_(self, module: torch.nn.Module) -> None:
        """Give every process rank 0's parameters and buffers."""
        if self.distributed:
            for t in module.state_dict().values():
                torch.distributed.broadcast(t, 0)

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def synced(self, what: str) -> contextlib.AbstractContextManager:
        """Run a block of work, then wait for the other processes (a barrier) and share the
        errors: when the block raised in some process, every process raises, the failed ones
        their own error and the others a :class:`WorkerFailedError` naming the first failed
        rank and its message. ``what`` says what the block does, for that message. Every
        process must enter the same blocks in the same order; alone, nothing is added."""
        return self._synced(what) if self.distributed else contextlib.nullcontext()

    @contextlib.contextmanager
    def _synced(self, what: str) -> Iterator[None]:
        error = None
        try:
            yield
        except Exception as exc:        # not KeyboardInterrupt: a Ctrl-C reaches every process
            error = exc
        message = None if error is None else f"{type(error).__name__}: {error}"
        messages = [None] * self.world_size
        torch.distributed.all_gather_object(messages, message)      # also the barrier
        failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
        if error is not None:
            raise error
        if failed:
            rank, first = failed[0]
            others = f" (and {len(failed) - 1} more ranks)" if len(failed) > 1 else ""
            raise WorkerFailedError(f"rank {rank} of {self.world_size}{others} failed while {what}: {first}; "
                                    f"rank {self.rank} stops too. Fix the cause and run the job again")


def abandon(status: int | None = None) -> None:
    """End this process's part of a launched job after an error: tear the process group down
    without waiting for the others (they fail too, or have failed). With ``status``, a process
    of a launched job then ends here with that status (``os._exit`` after flushing the logs and
    stdio): the interpreter's own exit could still abort in the destructors of the group's
    threads (SIGABRT, "terminate called without an active exception": 1 run in 8 of the two-rank
    fault tests on 2 cores). Without a process group it returns, whatever ``status``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()
        if status is not None:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)


def shutdown() -> None:
    """End this process's part of a launched job: wait for the others, then tear the process
    group down (a gloo group left alive at interpreter exit can abort the process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
