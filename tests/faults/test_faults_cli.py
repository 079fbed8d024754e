"""Fault injection on the command line's files and report: a model trained over without
``resume=``/``overwrite=``, an output that is one of the task's inputs, an output that cannot
be written (a folder, a path under a regular file), and a ``RESULT`` line holding NaN or inf.

"Before any work" is checked with spies: opening a data set, loading a model or an index, and
the demo raise :class:`WorkStarted`, an error the CLI does not catch, so a check that comes
too late fails the test with that exception instead of a clean exit status 2.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from qinco2 import datasets, write_vectors

cli_main = importlib.import_module("qinco2.cli.main")   # the module (qinco2.cli.main is also the function)
COMMON = ["cpu=true", "verbose=false"]


class WorkStarted(Exception):
    """Raised by the spies: the task got past the checks and started reading or computing."""


@pytest.fixture
def no_work(monkeypatch):
    """Every task's first piece of work raises :class:`WorkStarted`."""
    import qinco2.codec.evaluate
    import qinco2.ivfpq
    from qinco2.codec.codec import QincoCodec

    def spy(*args, **kwargs):
        raise WorkStarted

    monkeypatch.setattr(datasets, "resolve_dataset", spy)
    monkeypatch.setattr(QincoCodec, "load", spy)
    monkeypatch.setattr(QincoCodec, "train", spy)
    monkeypatch.setattr(qinco2.ivfpq, "load", spy)
    monkeypatch.setattr(qinco2.codec.evaluate, "run_demo", spy)


def _inputs(root: Path) -> dict[str, str]:
    """Input files of every task; each holds distinct bytes (the spies never read them)."""
    names = {"learn": "learn.fvecs", "base": "base.npy", "query": "query.fvecs", "gt": "gt.ivecs",
             "model": "model.pt", "centroids": "centroids.npy", "enc_train": "train_codes.npy",
             "enc_db": "db_codes.npy", "index": "ivf.faissindex", "pairwise": "pairwise.pt",
             "ivfpq": "a.ivfpq"}
    paths = {}
    for key, name in names.items():
        (root / name).write_bytes(f"input {key}".encode())
        paths[key] = str(root / name)
    return paths


def _task_argv(p: dict[str, str]) -> dict[str, list[str]]:
    """The arguments of every task that writes files, without output=."""
    return {
        "train": ["task=train", f"trainset={p['learn']}"],
        "ivf_centroids": ["task=ivf_centroids", "ivf_K=4", f"trainset={p['learn']}"],
        "encode": ["task=encode", f"model={p['model']}", f"db={p['base']}"],
        "train_pairwise_decoder": ["task=train_pairwise_decoder", f"ivf_centroids={p['centroids']}",
                                   f"encoded_trainset={p['enc_train']}", f"trainset={p['learn']}"],
        "build_index": ["task=build_index", f"ivf_centroids={p['centroids']}", f"trainset={p['learn']}",
                        f"encoded_trainset={p['enc_train']}", f"encoded_db={p['enc_db']}"],
        "search": ["task=search", f"model={p['model']}", f"index={p['index']}", f"encoded_db={p['enc_db']}",
                   f"pairwise_decoder={p['pairwise']}", f"queries={p['query']}", f"queries_gt={p['gt']}"],
        "ivfpq_build": ["task=ivfpq_build", f"db={p['base']}"],
        "ivfpq_search": ["task=ivfpq_search", f"index={p['ivfpq']}", f"db={p['base']}", f"queries={p['query']}",
                         f"queries_gt={p['gt']}"],
        "demo": ["task=demo"],
    }


OUTPUT_NAMES = {"train": "m.pt", "ivf_centroids": "c.npy", "encode": "codes.npy", "train_pairwise_decoder": "pw.pt",
                "build_index": "x.faissindex", "search": "log.json", "ivfpq_build": "x.ivfpq",
                "ivfpq_search": "log.json", "demo": "demo.pt"}


def _contents(paths: dict[str, str]) -> dict[str, bytes]:
    return {k: Path(v).read_bytes() for k, v in paths.items()}


# ------------------------------------------------------------------ item 8: unwritable outputs

@pytest.mark.parametrize("task", list(OUTPUT_NAMES))
@pytest.mark.parametrize("kind", ["a_folder", "under_a_file"])
def test_an_unwritable_output_fails_before_any_work(capsys, tmp_path, no_work, task, kind):
    p = _inputs(tmp_path)
    if kind == "a_folder":
        output = tmp_path / "out" / OUTPUT_NAMES[task]
        output.mkdir(parents=True)
        reason = "it is a folder"
    else:
        (tmp_path / "notes.txt").write_text("a regular file")
        output = tmp_path / "notes.txt" / OUTPUT_NAMES[task]
        reason = "notes.txt is a file, not a folder"
    rc, _, err, result = run_cli(capsys, *_task_argv(p)[task], f"output={output}", *COMMON)
    assert rc == 2 and result is None and "Traceback" not in err
    assert str(output) in err and reason in err, err
    assert _contents(p) == {k: f"input {k}".encode() for k in p}


@pytest.mark.parametrize("task, output, blocked", [
    ("encode", "codes.npy", "codes.npy.json"),            # the sidecar, written after all the encoding
    ("build_index", "x.faissindex", "x.faissindex.json"),  # the index's sidecar
    ("search", "log.json", "log.png"),                    # the Pareto plot, drawn after the sweep
])
def test_an_unwritable_companion_file_fails_before_any_work(capsys, tmp_path, no_work, task, output, blocked):
    p = _inputs(tmp_path)
    (tmp_path / "out" / blocked).mkdir(parents=True)
    rc, _, err, _ = run_cli(capsys, *_task_argv(p)[task], f"output={tmp_path / 'out' / output}", *COMMON)
    assert rc == 2 and "Traceback" not in err
    assert str(tmp_path / "out" / blocked) in err and "it is a folder" in err, err


def test_the_demo_output_is_checked_without_output_given(capsys, tmp_path, no_work, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "qinco2-demo.pt").mkdir()
    rc, _, err, _ = run_cli(capsys, "task=demo", *COMMON)
    assert rc == 2 and "qinco2-demo.pt" in err and "it is a folder" in err


def test_check_writable_creates_nothing_and_names_the_reason(tmp_path):
    from qinco2.atomic import check_writable
    from qinco2.errors import InputError

    check_writable(tmp_path / "new" / "deeper" / "model.pt", "the model")   # folders made by the writer
    (tmp_path / "old.pt").write_bytes(b"old")
    check_writable(tmp_path / "old.pt", "the model")                        # replaced atomically
    assert sorted(os.listdir(tmp_path)) == ["old.pt"] and (tmp_path / "old.pt").read_bytes() == b"old"
    with pytest.raises(InputError, match="the model .* it is a folder"):
        check_writable(tmp_path, "the model")
    with pytest.raises(InputError, match="old.pt is a file, not a folder"):
        check_writable(tmp_path / "old.pt" / "sub" / "model.pt", "the model")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_writable_refuses_a_read_only_folder(tmp_path):
    from qinco2.atomic import check_writable
    from qinco2.errors import InputError

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(InputError, match="choose a folder you can write to"):
            check_writable(folder / "model.pt", "the model")
    finally:
        folder.chmod(0o700)


# ------------------------------------------------------------ item 2: outputs that are inputs

def _collisions(p: dict[str, str], tmp_path: Path) -> dict[str, tuple[list[str], str, str]]:
    """case -> (argv, output=, the key named in the error)."""
    argv = _task_argv(p)
    other_spelling = str(tmp_path / "sub" / ".." / Path(p["model"]).name)
    return {
        "train_over_its_trainset": (argv["train"], p["learn"], "trainset="),
        "train_over_its_init_model": (argv["train"] + [f"model={p['model']}"], other_spelling, "model="),
        "train_over_its_ivf_centroids": (argv["train"] + [f"ivf_centroids={p['centroids']}"], p["centroids"],
                                         "ivf_centroids="),
        "ivf_centroids_over_its_trainset": (argv["ivf_centroids"], p["learn"], "trainset="),
        "encode_over_its_db": (argv["encode"], p["base"], "db="),
        "encode_sidecar_over_its_model": (["task=encode", f"model={p['enc_db']}.json", f"db={p['base']}"],
                                          p["enc_db"], "model="),
        "pairwise_over_its_codes": (argv["train_pairwise_decoder"], p["enc_train"], "encoded_trainset="),
        "build_index_over_its_db_codes": (argv["build_index"], p["enc_db"], "encoded_db="),
        "build_index_over_a_codes_sidecar": (argv["build_index"], p["enc_db"] + ".json",
                                             "the sidecar of encoded_db="),
        "search_log_over_its_index": (argv["search"], p["index"], "index="),
        "search_log_over_its_decoder": (argv["search"], p["pairwise"], "pairwise_decoder="),
        "ivfpq_build_over_its_db": (argv["ivfpq_build"], p["base"], "db="),
        "ivfpq_search_log_over_its_ground_truth": (argv["ivfpq_search"], p["gt"], "queries_gt="),
    }


CASES = list(_collisions({k: k for k in ("learn", "base", "query", "gt", "model", "centroids", "enc_train",
                                         "enc_db", "index", "pairwise", "ivfpq")}, Path(".")))


@pytest.mark.parametrize("case", CASES)
def test_an_output_that_is_an_input_is_refused(capsys, tmp_path, no_work, case):
    p = _inputs(tmp_path)
    (tmp_path / f"{p['enc_db']}.json").write_bytes(b"input sidecar")
    argv, output, key = _collisions(p, tmp_path)[case]
    before = _contents(p)
    rc, _, err, _ = run_cli(capsys, *argv, f"output={output}", *COMMON)
    assert rc == 2 and "Traceback" not in err
    assert key in err and "destroy" in err, err
    assert _contents(p) == before


def test_an_output_linked_to_an_input_is_refused(capsys, tmp_path, no_work):
    p = _inputs(tmp_path)
    link = tmp_path / "link.fvecs"
    link.symlink_to(p["learn"])
    rc, _, err, _ = run_cli(capsys, "task=ivf_centroids", "ivf_K=4", f"trainset={p['learn']}",
                            f"output={link}", *COMMON)
    assert rc == 2 and "trainset=" in err
    assert Path(p["learn"]).read_bytes() == b"input learn"


def test_an_output_that_is_a_file_of_a_named_data_set_is_refused(capsys, tmp_path, monkeypatch):
    """db=<name>: the set's files are inputs too, found under data_root=."""
    import qinco2.ivf

    def kmeans_spy(*args, **kwargs):
        raise WorkStarted

    monkeypatch.setattr(qinco2.ivf, "train_ivf_centroids", kmeans_spy)
    folder = tmp_path / "tiny"
    folder.mkdir()
    x = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    for name in ("learn.fvecs", "base.fvecs", "query.fvecs"):
        write_vectors(folder / name, x)
    write_vectors(folder / "gt.ivecs", np.zeros((60, 1), np.int32))
    entry = datasets.DatasetEntry("tiny", "learn.fvecs", "base.fvecs", "query.fvecs", "gt.ivecs")
    monkeypatch.setitem(datasets.DATASETS, "tiny-set", entry)
    before = (folder / "learn.fvecs").read_bytes()
    rc, _, err, _ = run_cli(capsys, "task=ivf_centroids", "ivf_K=4", "db=tiny-set", f"data_root={tmp_path}",
                            "ds.valset=10", f"output={folder / 'learn.fvecs'}", *COMMON)
    assert rc == 2 and "db=tiny-set" in err and "destroy" in err, err
    assert (folder / "learn.fvecs").read_bytes() == before


# ------------------------------------------------------- item 2: train over an existing model

def test_train_refuses_to_replace_an_existing_model(capsys, tmp_path, no_work):
    p = _inputs(tmp_path)
    model = tmp_path / "trained.pt"
    model.write_bytes(b"a trained model")
    argv = ["task=train", f"trainset={p['learn']}", f"output={model}", *COMMON]
    rc, _, err, _ = run_cli(capsys, *argv)
    assert rc == 2 and "already exists" in err and "resume=true" in err and "overwrite=true" in err, err
    assert model.read_bytes() == b"a trained model"
    rc, _, err, _ = run_cli(capsys, *argv, f"model={p['model']}")          # an init model changes nothing
    assert rc == 2 and "already exists" in err
    rc, _, err, _ = run_cli(capsys, *argv, "resume=true", "overwrite=true")
    assert rc == 2 and "only one" in err
    for allowed in ("resume=true", "overwrite=true"):                       # both get to the training
        with pytest.raises(WorkStarted):
            cli_main.main([*argv, allowed])
    with pytest.raises(WorkStarted):                                        # a new output needs neither
        cli_main.main(["task=train", f"trainset={p['learn']}", f"output={tmp_path / 'new.pt'}", *COMMON])


def test_overwrite_is_a_documented_key():
    from qinco2.cli.config import parse_args

    args, given = parse_args(["task=train", "overwrite=true"])
    assert args.overwrite is True and "overwrite" in given
    assert "overwrite=false" in cli_main.usage()


# ------------------------------------------------------------------- item 7: strict RESULT JSON

def _strict(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_the_result_line_is_strict_json_with_nan_and_inf(capsys, monkeypatch):
    weird = {"task": "eval", "mse": float("nan"), "R@1": float("inf"), "low": -math.inf,
             "f32": np.float32("nan"), "half": np.float64(0.5), "n": np.int64(3), "ok": np.bool_(True),
             "per_step": np.array([1.5, np.nan]), "pair": (np.float32(2.0), float("-inf")),
             "nested": {"runs": [{"qps": np.inf, "path": Path("a/b.json")}]}}
    monkeypatch.setitem(cli_main.TASKS, "eval", lambda args, given, device: weird)
    rc, out, _, _ = run_cli(capsys, "task=eval", *COMMON)
    assert rc == 0
    lines = [line[len("RESULT "):] for line in out.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1
    assert _strict(lines[0]) == {
        "task": "eval", "mse": None, "R@1": None, "low": None, "f32": None, "half": 0.5, "n": 3, "ok": True,
        "per_step": [1.5, None], "pair": [2.0, None], "nested": {"runs": [{"qps": None, "path": "a/b.json"}]}}
