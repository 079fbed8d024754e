"""Scale-out: training and encoding on two CPU processes (gloo) through scripts/launch.sh,
and training killed part-way then resumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import qinco2.codec.train as train_module
from qinco2 import QincoCodec, load_encoded

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "scripts" / "launch.sh"
TRAIN = ["task=train", "db=synthetic", "model_args=qinco2-S", "M=2", "K=16", "L=1", "de=16", "dh=32", "A=4",
         "B=4", "ds.loop=4000", "ds.trainset=8000", "ds.valset=1000", "max_epochs=3", "lr=3e-3", "cpu=true",
         "verbose=false", "threads=1"]


def _run(argv: list[str], n_proc: int | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable}
    cmd = ["bash", str(LAUNCH), "-n", str(n_proc), *argv] if n_proc else [sys.executable, "-m", "qinco2", *argv]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == 1, done.stdout            # one report per job, not one per process
    return results[0]


@pytest.fixture(scope="module")
def two_process_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist") / "two.pt"
    # 64 rows per process and step: the same 128 rows per update as one process with batch=128
    return _run([*TRAIN, "batch=64", f"output={path}"], n_proc=2), path


def test_two_gloo_processes_train_as_well_as_one(two_process_model, tmp_path):
    two, path = two_process_model
    one = _run([*TRAIN, "batch=128", f"output={tmp_path / 'one.pt'}"])
    assert two["epochs_run"] == one["epochs_run"] == 3
    assert two["init_val_mse"] == pytest.approx(one["init_val_mse"], rel=1e-6)   # same initialisation
    assert two["val_mse"] == pytest.approx(one["val_mse"], rel=0.02)            # stated tolerance: 2%
    assert QincoCodec.load(path).n_codes == 2


def test_two_processes_encode_the_same_codes_as_one(two_process_model, tmp_path):
    _, model = two_process_model
    argv = ["task=encode", f"model={model}", "db=synthetic", "ds.db=2000", "shard_rows=300", "cpu=true",
            "verbose=false"]
    _run([*argv, f"output={tmp_path / 'two.npz'}"], n_proc=2)
    _run([*argv, f"output={tmp_path / 'one.npz'}"])
    two, one = load_encoded(tmp_path / "two.npz"), load_encoded(tmp_path / "one.npz")
    assert two["codes"].shape == (2000, 2)
    np.testing.assert_array_equal(two["codes"], one["codes"])
    assert not (tmp_path / ".two.npz.parts").exists()


def test_launcher_needs_a_task():
    done = subprocess.run(["bash", str(LAUNCH)], capture_output=True, text=True)
    assert done.returncode == 2 and "usage" in done.stderr


def test_killed_training_resumes_to_the_same_model(codec_data, tiny_codec_fields, tmp_path, monkeypatch):
    x_train, x_val = codec_data
    fields = {**tiny_codec_fields, "max_epochs": 4, "epochs": 4}
    full = QincoCodec.from_preset("qinco2-S", **fields).train(x_train, x_val, output=tmp_path / "full.pt",
                                                               progress=False)
    save, saves = train_module.save_checkpoint, []

    def killed_after_epoch_1(*args, **kwargs):
        save(*args, **kwargs)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt                   # the job dies right after epoch 1 was saved

    monkeypatch.setattr(train_module, "save_checkpoint", killed_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        QincoCodec.from_preset("qinco2-S", **fields).train(x_train, x_val, output=tmp_path / "cut.pt",
                                                            progress=False)
    monkeypatch.setattr(train_module, "save_checkpoint", save)
    resumed = QincoCodec.from_preset("qinco2-S", **fields).train(x_train, x_val, output=tmp_path / "cut.pt",
                                                                  resume=True, progress=False)
    assert [h["val_mse"] for h in resumed.train_state_.history] == [h["val_mse"] for h in full.train_state_.history]
    for (name, a), b in zip(full.model_.state_dict().items(), resumed.model_.state_dict().values()):
        assert torch.equal(a, b), name                # bit for bit
