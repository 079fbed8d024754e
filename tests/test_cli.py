"""The ``task=... key=value`` command line, end to end on tiny files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli as _run

from qinco2 import QincoCodec, datasets, load_encoded, write_vectors
from qinco2.cli.main import main, parse_args

TINY_MODEL = ["model_args=qinco2-S", "M=2", "K=16", "L=1", "de=8", "dh=16", "A=4", "B=4",
              "ds.loop=2_000", "ds.valset=300", "epochs=2", "batch=256", "lr=3e-3",
              "cpu=true", "verbose=false"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """learn (3000 x 16), base (500), queries (20) and their exact nearest neighbour."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    centres = rng.normal(0.0, 4.0, (10, 16))
    noise = rng.normal(0.0, 1.0, (3520, 16)) * np.linspace(2.0, 0.2, 16)
    x = (centres[rng.integers(0, 10, 3520)] + noise).astype(np.float32)
    learn, base, queries = x[:3000], x[3000:3500], x[3500:]
    d2 = ((queries[:, None, :].astype(np.float64) - base[None]) ** 2).sum(-1)
    paths = {name: root / f"{name}.fvecs" for name in ("learn", "base", "query")}
    for name, arr in zip(paths, (learn, base, queries)):
        write_vectors(paths[name], arr)
    paths["gt"] = root / "gt.ivecs"
    write_vectors(paths["gt"], d2.argmin(1)[:, None].astype(np.int32))
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def model_file(files, tmp_path_factory):
    """A tiny model trained once by ``task=train`` (one epoch), with its result."""
    out = tmp_path_factory.mktemp("model") / "tiny.pt"
    rc = main(["task=train", f"trainset={files['learn']}", f"output={out}", "max_epochs=1",
               *TINY_MODEL])
    assert rc == 0
    return str(out)


def test_training_keys_reach_the_training(files, tmp_path):
    """Regularisation keys given on the command line are the training's settings (the model file's)."""
    from qinco2.checkpoint import load_checkpoint

    out = tmp_path / "m.pt"
    rc = main(["task=train", f"trainset={files['learn']}", f"output={out}", "max_epochs=1",
               "weight_decay=0.5", "train_noise=0.2", *TINY_MODEL])
    assert rc == 0
    config = load_checkpoint(out)["training"]["config"]
    assert (config["weight_decay"], config["train_noise"], config["lr"]) == (0.5, 0.2, 3e-3)


def _data_args(files) -> list[str]:
    return [f"db={files['base']}", f"trainset={files['learn']}", f"queries={files['query']}",
            f"queries_gt={files['gt']}", "cpu=true", "verbose=false"]


# ----------------------------------------------------------------------------- parsing

def test_seed_syntax_values():
    args, given = parse_args(["task=train", "ds.loop=2_000", "ds.valset=100_000", "lr=8e-4",
                              "grad_clip=null", "resume=true", "verbose=false", "de=null"])
    assert (args.ds.loop, args.ds.valset, args.lr) == (2000, 100_000, 8e-4)
    assert args.grad_clip is None and args.de is None
    assert args.resume is True and args.verbose is False
    assert args.batch == 1024 and args.ds.trainset is None  # defaults kept
    assert given == {"task", "ds.loop", "ds.valset", "lr", "grad_clip", "resume", "verbose", "de"}


@pytest.mark.parametrize("arg, suggestion", [("ds.valst=5", "ds.valset"), ("Mm=4", "'M'"),
                                             ("epoch=3", "epochs")])
def test_unknown_key_suggests_the_closest(capsys, arg, suggestion):
    rc, out, err, result = _run(capsys, "task=train", arg)
    assert rc == 2 and result is None
    assert err.startswith("error: unknown argument")
    assert f"did you mean {suggestion}" in err or f"did you mean '{suggestion}'" in err
    assert "Traceback" not in err


def test_unknown_task_lists_tasks(capsys):
    rc, _, err, _ = _run(capsys, "task=trian")
    assert rc == 2
    assert "did you mean 'train'" in err
    for task in ("train", "eval", "eval_valset", "search", "encode", "demo"):
        assert task in err


@pytest.mark.parametrize("argv, words", [(["task=train", "M=abc"], ["M", "abc"]),
                                         (["task=train", "verbose=maybe"], ["verbose"]),
                                         (["train"], ["key=value"]),
                                         (["cpu=true"], ["no task", "train"]),
                                         (["task=train", "cpu=true"], ["output="])])
def test_bad_command_lines(capsys, argv, words):
    rc, _, err, _ = _run(capsys, *argv)
    assert rc == 2 and err.startswith("error: ")
    for word in words:
        assert word in err


def test_help(capsys):
    rc, out, _, _ = _run(capsys, "--help")
    assert rc == 0 and "task=<task>" in out and "ds.valset=10000" in out


def test_missing_model_file_names_the_train_command(capsys, files, tmp_path):
    missing = tmp_path / "nope.pt"
    rc, _, err, _ = _run(capsys, "task=eval", f"model={missing}", *_data_args(files))
    assert rc == 2
    assert str(missing) in err and "task=train" in err


def test_python_dash_m_exit_code_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "qinco2", "task=eval", "ds.valst=5"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert "ds.valset" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- tasks

def test_train_writes_a_model(model_file):
    codec = QincoCodec.load(model_file)
    assert codec.n_codes == 2 and codec.dim == 16
    assert (codec.model_config.K, codec.model_config.de, codec.model_config.A) == (16, 8, 4)


def test_resume_continues_the_run(capsys, files, tmp_path, model_file):
    out = tmp_path / "resumed.pt"
    out.write_bytes(open(model_file, "rb").read())
    rc, _, _, result = _run(capsys, "task=train", f"trainset={files['learn']}", f"output={out}",
                            "resume=true", "max_epochs=2", *TINY_MODEL)
    assert rc == 0
    assert result["epochs_run"] == 2  # epoch 0 came from the file, epoch 1 was run now
    assert result["val_mse"] <= result["init_val_mse"]


def test_train_from_model_file(capsys, files, tmp_path, model_file):
    out = tmp_path / "continued.pt"
    rc, _, _, result = _run(capsys, "task=train", f"trainset={files['learn']}", f"output={out}",
                            f"model={model_file}", "max_epochs=1", "ds.loop=2_000",
                            "ds.valset=300", "cpu=true", "verbose=false")
    assert rc == 0 and out.is_file()
    assert (result["M"], result["K"]) == (2, 16)  # the architecture came from the file


def test_eval(capsys, files, model_file):
    rc, out, _, result = _run(capsys, "task=eval", f"model={model_file}", *_data_args(files))
    assert rc == 0 and "database MSE" in out
    assert result["n"] == 500 and result["mse"] > 0
    assert len(result["code_usage"]) == len(result["entropy_bits"]) == 2
    assert result["prefix_mse"][-1] == pytest.approx(result["mse"])
    rc, _, _, limited = _run(capsys, "task=eval", f"model={model_file}", "ds.db=100", "A=2",
                             "B=1", *_data_args(files))
    assert rc == 0 and limited["n"] == 100


def test_eval_valset(capsys, files, model_file):
    rc, out, _, result = _run(capsys, "task=eval_valset", f"model={model_file}",
                              "ds.valset=300", *_data_args(files))
    assert rc == 0 and "validation MSE" in out
    assert result["n"] == 300 and result["mse"] > 0


def test_search(capsys, files, model_file):
    rc, out, _, result = _run(capsys, "task=search", f"model={model_file}", *_data_args(files))
    assert rc == 0 and "R@10" in out
    assert result["n_db"] == 500 and result["n_queries"] == 20
    assert 0 <= result["R@1"] <= result["R@10"] <= result["R@100"] <= 1


def test_eval_and_search_report_the_metric(capsys, files, model_file, monkeypatch):
    rc, out, _, result = _run(capsys, "task=eval", f"model={model_file}", *_data_args(files))
    assert rc == 0 and result["metric"] == "l2" and "metric" in out  # a path: L2 by default
    assert 0 <= result["R@1"] <= result["R@10"] <= result["R@100"] <= 1
    rc, out, _, result = _run(capsys, "task=eval", f"model={model_file}", "metric=ip",
                              *_data_args(files))
    assert rc == 0 and result["metric"] == "ip" and "ip" in out.split()
    # a named inner-product set: its metric is used when metric= is not given
    root = Path(files["base"]).parent
    entry = datasets.DatasetEntry(root.name, "learn.fvecs", "base.fvecs", "query.fvecs",
                                  "gt.ivecs", metric="ip")
    monkeypatch.setitem(datasets.DATASETS, "tiny-ip", entry)
    named = ["db=tiny-ip", f"data_root={root.parent}", "cpu=true", "verbose=false"]
    rc, out, _, result = _run(capsys, "task=search", f"model={model_file}", *named)
    assert rc == 0 and result["metric"] == "ip" and result["n_db"] == 500
    assert any(line.split() == ["metric", "ip"] for line in out.splitlines())
    rc, _, _, result = _run(capsys, "task=search", f"model={model_file}", "metric=l2", *named)
    assert rc == 0 and result["metric"] == "l2"
    rc, _, err, _ = _run(capsys, "task=search", f"model={model_file}", "metric=cosine", *named)
    assert rc == 2 and "metric=cosine" in err and "ivfpq" in err


@pytest.mark.parametrize("extra, rows", [
    ([], 500),
    (["encode_trainset=true", "ds.valset=300"], 3000),  # training rows, then validation rows
    (["encode_trainset=true", "ds.valset=300", "ds.trainset=1_000"], 1300),
])
def test_encode(capsys, files, model_file, tmp_path, extra, rows):
    out = tmp_path / "codes.npy"
    rc, _, err, result = _run(capsys, "task=encode", f"model={model_file}", f"output={out}",
                            *extra, *_data_args(files))
    assert rc == 0, err
    assert result["shape"] == [rows, 2]
    z = load_encoded(out)
    assert z["codes"].shape == (rows, 2) and np.load(out).shape == (rows, 2)   # K=16: 1 byte per code
    assert (z["K"], z["M"], z["D"]) == (16, 2, 16)
    assert 0 <= np.asarray(z["codes"]).min() and np.asarray(z["codes"]).max() < 16
    if not extra:  # the database codes are the codec's codes of the base file
        from qinco2 import read_vectors
        codec = QincoCodec.load(model_file)
        np.testing.assert_array_equal(z["codes"], codec.encode(read_vectors(files["base"])))
