"""The ``qinco2 task=... key=value ...`` command line: the entry point, the task table and the
CLI's global state (logging, threads, device).

The keys are those of :class:`qinco2.cli.config.CliArgs`. Each task (in
:mod:`~qinco2.cli.codec_tasks`, :mod:`~qinco2.cli.ivfsearch_tasks`,
:mod:`~qinco2.cli.ivfpq_tasks`) parses, calls the library and prints an aligned table;
:func:`main` then prints one ``RESULT {json}`` line for scripts (strict JSON: a NaN or an
infinity is written ``null``). Before a task starts, :func:`~qinco2.cli.keys.check_task_keys`
refuses keys it does not read and :func:`~qinco2.cli.task_files.check_task_files` checks the files
it will write. ``qinco2 --help`` lists the tasks, ``qinco2 task=X help`` the keys task X reads.
"""

from __future__ import annotations

import logging
import os
import sys

from ..errors import ConfigError, QincoError
from . import codec_tasks, ivfpq_tasks, ivfsearch_tasks
from .common import format_value, launched_rank, print_result
from .config import CliArgs, default_value, did_you_mean, leaf_keys, parse_args
from .keys import TASKS_HELP, check_task_keys, task_help, tasks_overview
from .task_files import check_task_files

__all__ = ["TASKS", "help_text", "main", "parse_args", "run", "usage"]
HELP_WORDS = ("-h", "--help", "help")


def task_search(args: CliArgs, given: set[str], device: str) -> dict:
    """``task=search``: the IVF-QINCo2 pipeline with ``index=``, else exhaustive search."""
    if args.index is not None:
        return ivfsearch_tasks.task_search_index(args, given, device)
    return codec_tasks.task_search_exhaustive(args, given, device)


TASKS = {"train": codec_tasks.task_train, "eval": codec_tasks.task_eval,
         "eval_valset": codec_tasks.task_eval_valset, "search": task_search,
         "ivf_centroids": ivfsearch_tasks.task_ivf_centroids, "encode": codec_tasks.task_encode,
         "train_pairwise_decoder": ivfsearch_tasks.task_train_pairwise_decoder,
         "build_index": ivfsearch_tasks.task_build_index,
         "ivfpq_build": ivfpq_tasks.task_ivfpq_build, "ivfpq_search": ivfpq_tasks.task_ivfpq_search,
         "demo": codec_tasks.task_demo, "convert": codec_tasks.task_convert}
assert set(TASKS) == set(TASKS_HELP), "every task has its keys in qinco2.cli.keys"


def usage() -> str:
    """``qinco2 --help``: the tasks, one line each, then every key with its default."""
    defaults = CliArgs()
    keys = ", ".join(f"{k}={format_value(default_value(defaults, k))}"
                     for k in leaf_keys() if k != "task")
    return (f"usage: qinco2 task=<task> [key=value ...]\n{tasks_overview()}\n"
            f"all keys and defaults: {keys}")


def help_text(argv: list[str]) -> str:
    """The help ``argv`` asks for: ``task=X help`` for task X, else :func:`usage`."""
    tasks = [a.partition("=")[2].strip() for a in argv if a.partition("=")[0].strip() == "task"]
    if not tasks:
        return usage()
    task = tasks[-1]
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}{did_you_mean(task, TASKS)} (tasks: {', '.join(TASKS)})")
    return task_help(task)


def _setup(args: CliArgs) -> str:
    """Logging, threads and device: the CLI's global state. Returns the device name."""
    import torch

    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(level)  # also when a handler existed (main called twice)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"threads={args.threads}: expected a positive number of threads")
        import faiss

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    if not args.adaptive_threads:
        from .. import threads

        threads.set_enabled(False)
    from ..distributed import Workers

    _, launched_device = Workers.from_environment(cpu=args.cpu)  # launched: this rank's device
    if launched_device is not None:
        return str(launched_device)
    return "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"


def run(argv: list[str]) -> dict:
    """Parse ``argv``, run the task and return its result dict (errors are raised)."""
    args, given = parse_args(argv)
    if args.task is None:
        raise ConfigError(f"no task given: add task=<one of {', '.join(TASKS)}>")
    if args.task not in TASKS:
        raise ConfigError(f"unknown task {args.task!r}{did_you_mean(args.task, TASKS)} "
                          f"(tasks: {', '.join(TASKS)})")
    check_task_keys(args.task, given)   # a key the task does not read is an error, not ignored
    device = _setup(args)
    check_task_files(args)      # outputs writable and not inputs, before any work
    return TASKS[args.task](args, given, device)


def _print_help(text: str) -> int:
    """Print ``text``; a reader that stops early (``qinco2 --help | head``) is no error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``qinco2`` and ``python -m qinco2``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    from ..distributed import abandon, shutdown

    try:
        if any(a.strip() in HELP_WORDS for a in argv):
            return _print_help(help_text(argv))
        result = run(argv)
    except QincoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        abandon(2)                            # a launched job's process ends here
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        abandon(130)
        return 130
    shutdown()
    if launched_rank() == 0:                  # one report per launched job
        print_result(result)
    return 0
