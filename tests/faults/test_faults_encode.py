"""Fault injection on encoding to a codes file: two jobs writing the same output, shards
reused after their input rows changed, and a process of a launched job that fails."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qinco2 import QincoCodec, encode_to_file, load_encoded
from qinco2.codec.codes_io import model_sha
from qinco2.locks import LockedError, exclusive_lock, lock_path

ROOT = Path(__file__).resolve().parents[2]
D = 8


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).normal(0, 1, (1000, D)).astype(np.float32)


# ---------------------------------------------------------------- item 1: one writer per output
def test_a_second_job_writing_the_same_output_is_refused(make_codec, x, tmp_path, monkeypatch):
    one, other = make_codec(), make_codec(seed=1)
    out = tmp_path / "codes.npy"
    encode, refusals = one.encode, []

    def encode_while_another_job_starts(*args, **kwargs):
        if not refusals:                # a second job, with another model, starts meanwhile
            with pytest.raises(LockedError) as refused:
                encode_to_file(other, x, out, batch=100, shard_rows=100, progress=False)
            refusals.append(str(refused.value))
        return encode(*args, **kwargs)

    monkeypatch.setattr(one, "encode", encode_while_another_job_starts)
    encode_to_file(one, x, out, batch=100, shard_rows=100, progress=False)
    assert f"process {os.getpid()} on host {socket.gethostname()}" in refusals[0]   # names the owner
    assert str(lock_path(out)) in refusals[0]
    z = load_encoded(out)
    assert z["model_sha"] == model_sha(one)
    np.testing.assert_array_equal(z["codes"], encode(x))     # every row from the first job's model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.npy", "codes.npy.json"]   # lock released


@pytest.fixture
def live_pid():
    sleeper = subprocess.Popen(["sleep", "60"])
    yield sleeper.pid
    sleeper.kill()
    sleeper.wait()


@pytest.mark.parametrize("where", ["live process", "other host"])
def test_a_lock_held_elsewhere_refuses_the_writer(make_codec, x, tmp_path, live_pid, where):
    out = tmp_path / "codes.npy"
    host = socket.gethostname() if where == "live process" else "other-machine"
    lock_path(out).write_text(json.dumps({"pid": live_pid, "host": host, "since": time.time()}))
    with pytest.raises(LockedError, match=f"process {live_pid} on host {host}.*delete .*codes.npy.lock"):
        encode_to_file(make_codec(), x, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".codes.npy.lock"]   # nothing touched, lock kept


def test_a_lock_left_by_a_dead_process_is_taken_over(make_codec, x, tmp_path, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()                                          # reaped: its pid no longer runs
    out = tmp_path / "codes.npy"
    lock_path(out).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": 0}))
    codec = make_codec()
    with caplog.at_level(logging.WARNING, logger="qinco2.locks"):
        encode_to_file(codec, x, out, progress=False)
    assert f"taking over the lock {lock_path(out)} of process {dead.pid}" in caplog.text
    np.testing.assert_array_equal(load_encoded(out)["codes"], codec.encode(x))
    assert not lock_path(out).exists()


def test_the_lock_is_exclusive_and_released_on_errors(tmp_path):
    target = tmp_path / "model.pt"
    with pytest.raises(RuntimeError, match="boom"), exclusive_lock(target) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(LockedError), exclusive_lock(target):
            pass
        raise RuntimeError("boom")
    assert not lock.exists()
    with exclusive_lock(target):                         # free again
        pass


# ---------------------------------------------------------------- item 3: stale shards
def test_a_shard_whose_input_rows_changed_is_encoded_again(dies_after, make_codec, x, tmp_path, monkeypatch):
    codec = make_codec()
    encode = codec.encode
    monkeypatch.setattr(codec, "encode", dies_after(codec, 3))     # killed while encoding shard 3
    with pytest.raises(KeyboardInterrupt):
        encode_to_file(codec, x, tmp_path / "out.npy", batch=100, shard_rows=100, progress=False)
    assert (tmp_path / ".out.npy.parts" / "shard-0000000.npy").is_file()
    changed = x.copy()
    changed[10] = -3 * x[10]             # row 10 (shard 0, not among the fingerprint's samples)
    assert not np.array_equal(encode(changed[10:11]), encode(x[10:11]))
    calls = []
    monkeypatch.setattr(codec, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    encode_to_file(codec, changed, tmp_path / "out.npy", batch=100, shard_rows=100, progress=False)
    np.testing.assert_array_equal(load_encoded(tmp_path / "out.npy")["codes"], encode(changed))
    assert len(calls) == 8               # shard 0 encoded again, 1 and 2 reused, 3..9 encoded


# ---------------------------------------------------------------- item 13: a failing process
TWO_RANKS = """\
import sys
import numpy as np
from qinco2 import QincoCodec, QincoError, encode_to_file
from qinco2.distributed import Workers, abandon, shutdown

workers, _ = Workers.from_environment(cpu=True)
codec = QincoCodec.load(sys.argv[1])
x = np.load(sys.argv[2])
try:
    encode_to_file(codec, x, sys.argv[3], batch=100, shard_rows=100, progress=False, workers=workers)
    print("good encoding done", flush=True)
    x[150] = np.nan                      # a row of shard 1, which rank 1 encodes
    encode_to_file(codec, x, sys.argv[4], batch=100, shard_rows=100, progress=False, workers=workers)
except QincoError as exc:
    print(f"error: {exc}", file=sys.stderr, flush=True)
    abandon(2)                           # as the CLI does after an error
    sys.exit(2)
shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(argv: list[str], timeout: float = 120) -> list[tuple[int, str, str]]:
    """Run ``python argv`` as the two processes of a gloo job (the variables a launcher
    sets); returns each rank's exit status, stdout and stderr."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = []
    try:
        for p in procs:
            try:
                outs.append((*p.communicate(timeout=timeout),))
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {len(outs)} still waits {timeout} s later: a failed rank left it hanging")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def test_a_rank_that_fails_stops_the_other_with_its_error(make_codec, x, tmp_path):
    codec = make_codec()
    codec.save(tmp_path / "m.pt")
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "job.py").write_text(TWO_RANKS)
    good, bad = tmp_path / "good.npy", tmp_path / "bad.npy"
    ranks = _run_two_ranks([str(tmp_path / "job.py"), str(tmp_path / "m.pt"), str(tmp_path / "x.npy"),
                            str(good), str(bad)])
    for rank, (code, out, err) in enumerate(ranks):
        assert "good encoding done" in out, f"rank {rank}: {err[-3000:]}"   # rank 0's lock let rank 1 in
        assert code != 0, f"rank {rank} exited 0"
    assert "NaN" in ranks[1][2], ranks[1][2][-3000:]
    assert "error: rank 1 of 2 failed while encoding its shards: InputError:" in ranks[0][2], ranks[0][2][-3000:]
    assert "input rows 100..200" in ranks[0][2].split("rank 1 of 2 failed", 1)[1]   # with rank 1's message
    np.testing.assert_array_equal(load_encoded(good)["codes"], QincoCodec.load(tmp_path / "m.pt").encode(x))
    assert not lock_path(good).exists() and not lock_path(bad).exists()
    assert not bad.exists()


TRAIN_TWO_RANKS = """\
import sys
import numpy as np
import qinco2.codec.train as train
from qinco2 import QincoCodec, QincoError
from qinco2.distributed import Workers, abandon, shutdown

workers, _ = Workers.from_environment(cpu=True)
encode, calls = train.encode, []

def encode_or_fail(*args, **kwargs):           # rank 1 fails at its 3rd training step
    calls.append(1)
    if workers.rank == 1 and len(calls) == 3:
        raise MemoryError("injected failure in rank 1")
    return encode(*args, **kwargs)

train.encode = encode_or_fail
x = np.load(sys.argv[1])
codec = QincoCodec.from_preset("qinco2-S", M=2, K=16, L=1, de=None, dh=16, A=4, B=2, batch=64, loop=640,
                               epochs=2, max_epochs=2, small_data="keep")
try:
    codec.train(x[:1200], x[1200:], progress=False, workers=workers)
except (QincoError, MemoryError) as exc:
    print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    abandon(2)                                 # as the CLI does after an error
    sys.exit(2)
shutdown()
"""


def test_a_rank_that_fails_in_training_stops_the_other_with_its_error(tmp_path):
    x = np.random.default_rng(0).normal(size=(1400, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "job.py").write_text(TRAIN_TWO_RANKS)
    ranks = _run_two_ranks([str(tmp_path / "job.py"), str(tmp_path / "x.npy")])
    assert [code for code, _, _ in ranks] == [2, 2], [err[-2000:] for _, _, err in ranks]
    assert "error: MemoryError: injected failure in rank 1" in ranks[1][2]
    assert "error: WorkerFailedError: rank 1 of 2 failed while training on batch 3 of epoch 0: MemoryError: " \
           "injected failure in rank 1" in ranks[0][2], ranks[0][2][-2000:]
