"""Scale-out: training and encoding on two CPU processes (gloo) through scripts/launch.sh, on
two "nodes" (two launcher invocations on this machine, docs/multinode.md), and training killed
part-way then resumed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
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
CODES = ".npy"


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable}


def _run(argv: list[str], n_proc: int | None = None) -> dict:
    env = _env()
    cmd = ["bash", str(LAUNCH), "-n", str(n_proc), *argv] if n_proc else [sys.executable, "-m", "qinco2", *argv]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
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
    _run([*argv, f"output={tmp_path / ('two' + CODES)}"], n_proc=2)
    _run([*argv, f"output={tmp_path / ('one' + CODES)}"])
    two, one = load_encoded(tmp_path / f"two{CODES}"), load_encoded(tmp_path / f"one{CODES}")
    assert np.asarray(two["codes"][:]).shape == (2000, 2)
    np.testing.assert_array_equal(np.asarray(two["codes"][:]), np.asarray(one["codes"][:]))
    assert not (tmp_path / f".two{CODES}.parts").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ACCELERATE_NODE = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: {nnodes}
machine_rank: {rank}
main_process_ip: 127.0.0.1
main_process_port: {port}
num_processes: {nnodes}
rdzv_backend: static
same_network: true
gpu_ids: all
mixed_precision: 'no'
"""


def _node_command(launcher: str, rank: int, nnodes: int, port: int, argv: list[str], tmp: Path) -> list[str]:
    """The command of node ``rank``: scripts/launch.sh (torchrun), or ``accelerate launch`` with
    a multi-node config file as in docs/multinode.md (on a CPU machine it starts torchrun too)."""
    if launcher == "launch.sh":
        return ["bash", str(LAUNCH), "--nnodes", str(nnodes), "--node-rank", str(rank), "--master-addr",
                "127.0.0.1", "--master-port", str(port), "--nproc-per-node", "1", *argv]
    config = tmp / f"node{rank}.yaml"
    config.write_text(ACCELERATE_NODE.format(nnodes=nnodes, rank=rank, port=port))
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--module", "qinco2",
            *argv]


def _stop(node: subprocess.Popen) -> None:
    """End a node left waiting for a dead peer: SIGTERM, which torchrun passes on to its workers
    (they run in sessions of their own and would outlive a SIGKILL of the launcher), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if node.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.wait(timeout=30)


def _run_nodes(argv: list[str], tmp: Path, launcher: str = "launch.sh", nnodes: int = 2,
               timeout: float = 300) -> dict:
    """Run ``argv`` as a job of ``nnodes`` machines of one process each: one launcher per node
    rank, all on this machine (master 127.0.0.1). Checks in each node's log that it ran its own
    process of the job, and returns the job's RESULT (printed by node 0 alone)."""
    for attempt in range(2):                   # once more if another job took the port meanwhile
        port = _free_port()
        nodes = [subprocess.Popen(_node_command(launcher, rank, nnodes, port, argv, tmp), env=_env(), cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
                 for rank in range(nnodes)]
        outs = []
        try:
            for node in nodes:
                outs.append(node.communicate(timeout=timeout))
        finally:
            for node in nodes:
                _stop(node)
        if attempt == 0 and any(node.returncode and ("address already in use" in err.lower() or "utilizing" in err)
                                for node, (_, err) in zip(nodes, outs)):
            continue
        break
    for rank, (node, (_, err)) in enumerate(zip(nodes, outs)):
        assert node.returncode == 0, f"node {rank}:\n{err[-3000:]}"
    results = [[json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")] for out, _ in outs]
    assert len(results[0]) == 1 and not any(results[1:]), results   # one report, from node 0
    for rank, (_, err) in enumerate(outs):     # each node's log: its own process of the 2-process job
        assert f"process {rank} of {nnodes}: node {rank}," in err, err[-3000:]
        assert "backend gloo" in err
    return results[0][0]


needs_torchrun = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is missing")


@pytest.fixture(scope="module")
def two_node_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nodes")
    return _run_nodes([*TRAIN, "verbose=true", "batch=64", f"output={tmp / 'nodes.pt'}"], tmp), tmp / "nodes.pt"


@needs_torchrun
def test_two_nodes_train_as_two_processes_on_one(two_node_model, two_process_model):
    (nodes, path), (two, _) = two_node_model, two_process_model
    assert nodes["epochs_run"] == two["epochs_run"] == 3
    assert nodes["init_val_mse"] == pytest.approx(two["init_val_mse"], rel=1e-6)
    assert nodes["val_mse"] == pytest.approx(two["val_mse"], rel=1e-6)     # the same job, spread otherwise
    assert QincoCodec.load(path).n_codes == 2


ENCODE = ["task=encode", "db=synthetic", "ds.db=2000", "shard_rows=300", "cpu=true"]


@pytest.fixture(scope="module")
def one_process_codes(two_node_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("one") / f"one{CODES}"
    _run([*ENCODE, f"model={two_node_model[1]}", "verbose=false", f"output={path}"])
    return np.asarray(load_encoded(path)["codes"][:])


@needs_torchrun
@pytest.mark.parametrize("launcher", ["launch.sh", "accelerate-config"])
def test_two_nodes_encode_the_same_codes_as_one_process(launcher, two_node_model, one_process_codes, tmp_path):
    out = tmp_path / f"nodes{CODES}"
    result = _run_nodes([*ENCODE, f"model={two_node_model[1]}", "verbose=true", f"output={out}"], tmp_path, launcher)
    assert result["shape"] == [2000, 2]
    codes = np.asarray(load_encoded(out)["codes"][:])
    assert codes.shape == (2000, 2)             # 7 shards: 0, 2, 4, 6 from node 0, 1, 3, 5 from node 1
    np.testing.assert_array_equal(codes, one_process_codes)
    assert not (tmp_path / f".nodes{CODES}.parts").exists()


def test_launcher_maps_node_options():
    def dry(*args: str) -> str:
        done = subprocess.run(["bash", str(LAUNCH), "--dry-run", *args, "task=train", "cpu=true"], env=_env(),
                              capture_output=True, text=True, cwd=ROOT, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    node = ["--nnodes", "3", "--node-rank", "2", "--master-addr", "10.1.2.3", "--master-port", "29511", "-n", "4"]
    torchrun = dry("--launcher", "torchrun", *node)
    for part in ["--nnodes 3", "--node_rank 2", "--master_addr 10.1.2.3", "--master_port 29511",
                 "--nproc_per_node 4", "-m qinco2 task=train cpu=true"]:
        assert part in torchrun, torchrun
    accelerate = dry("--launcher", "accelerate", *node)
    for part in ["--multi_gpu", "--num_machines 3", "--machine_rank 2", "--main_process_ip 10.1.2.3",
                 "--main_process_port 29511", "--num_processes 12", "--module qinco2"]:  # 12: all machines
        assert part in accelerate, accelerate
    for bad in (["--nnodes", "2"], ["--nnodes", "2", "--node-rank", "2", "--master-addr", "h"],
                ["--node-rank", "1"], ["--bogus", "1"]):
        done = subprocess.run(["bash", str(LAUNCH), *bad, "task=train"], env=_env(), capture_output=True,
                              text=True, check=False)
        assert done.returncode == 2 and "launch.sh" in done.stderr, (bad, done.stderr)


def test_launcher_needs_a_task():
    done = subprocess.run(["bash", str(LAUNCH)], capture_output=True, text=True, check=False)
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
