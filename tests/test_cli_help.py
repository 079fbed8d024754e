"""A CLI that explains itself: ``qinco2 --help`` lists the tasks, ``qinco2 task=X help`` the keys
task X reads (with default and description), and a key the task does not read is an error."""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qinco2.cli.config import leaf_keys, parse_args
from qinco2.cli.keys import COMMON_KEYS, TASK_KEYS, TASKS_HELP, check_task_keys

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_readme import _readme_cli_commands  # noqa: E402

cli_main = importlib.import_module("qinco2.cli.main")


def _run(capsys, *argv):
    rc = cli_main.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("task, words", [
    ("ivfpq_search", ["n_probes=null", "k=10", "refine_ratio=1", "ds.db=null", "IVF lists scanned"]),
    ("ivf_centroids", ["ivf_K=null", "niter=100", "k-means iterations", "seed=0", "output=null"]),
    ("train", ["lr=0.0008", "epochs=60", "small_data=adapt", "ds.loop=10000000", "overwrite=false",
               "learning rate"]),
    ("search", ["nprobe=null", "nshort=null", "metric=null", "index=null"]),
])
def test_task_help_lists_its_keys_with_defaults(capsys, task, words):
    rc, out, _ = _run(capsys, f"task={task}", "help")
    assert rc == 0
    assert f"task={task}" in out and TASKS_HELP[task][0] in out
    for word in words:
        assert word in out, (word, out)
    listed = [line.split()[0].partition("=")[0] for line in out.splitlines() if line.startswith("  ") and "=" in
              line.split()[0]]
    assert listed == [k for k in TASK_KEYS[task] if k != "task"]


def test_task_help_leaves_out_keys_the_task_does_not_read(capsys):
    _, out, _ = _run(capsys, "task=ivfpq_search", "--help")
    assert "nprobe=" not in out and "lr=" not in out and "n_probes=" in out


def test_help_of_an_unknown_task_is_an_error(capsys):
    rc, _, err = _run(capsys, "task=ivfpq_serch", "help")
    assert rc == 2 and "ivfpq_search" in err


def test_a_key_the_task_does_not_read_is_an_error(capsys):
    rc, out, err = _run(capsys, "task=ivfpq_search", "index=x.ivfpq", "nprobe=[5,20]")
    assert rc == 2 and "RESULT" not in out
    assert err.startswith("error: ivfpq_search does not read nprobe")
    assert "n_probes" in err and "search" in err and "qinco2 task=ivfpq_search help" in err


def test_an_unknown_key_keeps_its_error(capsys):
    rc, _, err = _run(capsys, "task=ivfpq_search", "n_probe=5")
    assert rc == 2 and "unknown argument 'n_probe'" in err and "did you mean 'n_probes'" in err


@pytest.mark.parametrize("argv", [["--help"], ["help"], ["-h"], []])
def test_help_lists_every_task(capsys, argv):
    rc, out, err = _run(capsys, *argv)
    text = out if argv else err
    assert rc == (0 if argv else 2)
    for task, (doc, _) in TASKS_HELP.items():
        assert any(line.split()[:1] == [task] and doc in line for line in text.splitlines()), task
    assert "task=<task> help" in text


def test_every_key_is_described_and_read_by_some_task():
    from qinco2.cli.config import key_doc

    for key in leaf_keys():
        assert key_doc(key), key
        assert any(key in keys for keys in TASK_KEYS.values()), key
    for task, keys in TASK_KEYS.items():
        assert set(keys) <= set(leaf_keys()), task
        assert set(COMMON_KEYS) <= set(keys)
    assert set(TASK_KEYS) == set(cli_main.TASKS)


def test_readme_commands_pass_the_key_check():
    for argv in _readme_cli_commands():
        args, given = parse_args(argv)
        check_task_keys(args.task, given)


# ------------------------------------------------------- the table against the task functions

def _key_tuples(fn) -> dict[str, tuple]:
    """Module-level tuples of key names the function's module can see (ARCH_KEYS, GRID_KEYS, ...)."""
    keys = set(leaf_keys())
    return {name: v for name, v in fn.__globals__.items()
            if isinstance(v, tuple) and v and all(isinstance(k, str) and k in keys for k in v)}


def _reads(fn, seen: set) -> set[str]:
    """The keys ``fn`` reads from ``args`` (``args.x``, ``args.ds.x``, ``require(args, "x")``,
    ``getattr(args, k) for k in X_KEYS``), and those of the qinco2.cli functions it calls."""
    if fn in seen:
        return set()
    seen.add(fn)
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    tuples, out = _key_tuples(fn), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args":
            if node.attr != "ds":
                out.add(node.attr)
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
              and isinstance(node.value.value, ast.Name) and node.value.value.id == "args"
              and node.value.attr == "ds"):
            out.add(f"ds.{node.attr}")
        elif isinstance(node, ast.Name) and node.id in tuples:
            out.update(tuples[node.id])
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "require" and len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
                out.add(node.args[1].value)
            callee = fn.__globals__.get(node.func.id)
            if inspect.isfunction(callee) and callee.__module__.startswith("qinco2.cli"):
                out |= _reads(callee, seen)
    return out


def _task_functions(task: str) -> list:
    from qinco2.cli import codec_tasks, ivfsearch_tasks

    if task == "search":
        return [codec_tasks.task_search_exhaustive, ivfsearch_tasks.task_search_index]
    return [cli_main.TASKS[task]]


# keys in the table that the task functions do not name: read by the checks before the task
NOT_IN_TASK_BODY = {"train": {"overwrite"}}                # task_files._check_train_output
# keys the functions name but the task does not read: ivfpq_search's refine=codec calls
# load_codec(args, set(), ...), so no architecture key given on the command line applies
NOT_READ = {"ivfpq_search": {"L", "dh", "M", "K", "A", "B", "de"}}


@pytest.mark.parametrize("task", list(TASKS_HELP))
def test_key_table_matches_what_the_task_reads(task):
    reads = set()
    for fn in _task_functions(task):
        reads |= _reads(fn, set())
    # data_limits reads every ds.* key; the table keeps those of the splits the task uses
    table = set(TASK_KEYS[task]) - set(COMMON_KEYS)
    reads -= NOT_READ.get(task, set())
    assert reads - set(TASK_KEYS[task]) <= {"ds.valset", "ds.trainset", "ds.db", "ds.loop"}, \
        sorted(reads - set(TASK_KEYS[task]))
    assert table - reads == NOT_IN_TASK_BODY.get(task, set()), sorted(table - reads)


@pytest.mark.parametrize("argv", [["--help"], ["task=train", "help"]])
def test_help_into_a_closed_pipe_is_no_error(argv):
    """`qinco2 --help | head -1`: the reader leaves early; no traceback, status 0."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "qinco2", *argv], stdout=write_end, stderr=subprocess.PIPE,
                              timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr.decode()
