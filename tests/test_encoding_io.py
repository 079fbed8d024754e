"""Streaming encoding to .npy codes files (packed, with a JSON sidecar), loading them back
(memory-mapped; old .npy files too), and the encode CLI task."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from qinco2 import (
    DatasetError,
    InputError,
    QincoCodec,
    convert_codes,
    encode_to_file,
    load_encoded,
    open_vectors,
    write_vectors,
)
from qinco2.cli.main import main
from qinco2.codec.codes_io import model_sha
from qinco2.ivf import assign_to_centroids

D = 8


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).normal(0, 1, (2000, D)).astype(np.float32)


@pytest.fixture
def x_memmap(x, tmp_path):
    write_vectors(tmp_path / "x.npy", x)
    return open_vectors(tmp_path / "x.npy")


def _files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_chunked_encoding_of_a_memmap_equals_encode(make_codec, x, x_memmap, tmp_path):
    codec = make_codec()
    out = tmp_path / "out" / "codes.npy"
    r = encode_to_file(codec, x_memmap, out, batch=300, progress=False)  # 7 chunks, last short
    assert r["shape"] == [2000, 3] and r["model_sha"] == model_sha(codec)
    assert _files(out.parent) == ["codes.npy", "codes.npy.json"]  # no temporary file left
    z = load_encoded(out)
    assert z["codes"].dtype == np.int32 and z["codes"].shape == (2000, 3)
    assert isinstance(z["codes"].packed, np.memmap)      # read on access, never whole
    np.testing.assert_array_equal(z["codes"], codec.encode(x))
    assert (z["K"], z["M"], z["D"], z["ivf_K"]) == (16, 3, D, 0)
    assert z["model_sha"] == model_sha(codec) and len(z["model_sha"]) == 16
    raw = np.load(out)                                   # a plain .npy: 1 byte per step code
    assert raw.dtype == np.uint8 and raw.shape == (2000, 3)
    np.testing.assert_array_equal(raw, codec.encode(x, packed=True))
    sidecar = json.loads((out.parent / "codes.npy.json").read_text())
    assert {k: sidecar[k] for k in ("rows", "D", "M", "K", "ivf_K", "code_size", "model_sha")} == {
        "rows": 2000, "D": D, "M": 3, "K": 16, "ivf_K": 0, "code_size": 3, "model_sha": model_sha(codec)}


def test_a_list_of_parts_is_encoded_in_order_with_beam_overrides(make_codec, x, tmp_path):
    codec = make_codec()
    out = tmp_path / "codes.npy"
    encode_to_file(codec, [x[:700], x[700:]], out, batch=512, progress=False, A=2, B=1)
    np.testing.assert_array_equal(load_encoded(out)["codes"], codec.encode(x, A=2, B=1))


def test_ivf_codes_start_with_the_nearest_centroid(make_codec, x, tmp_path):
    centroids = x[::125][:16].copy()
    codec = make_codec(ivf_K=16, ivf_centroids=torch.from_numpy(centroids))
    out = tmp_path / "codes.npy"
    encode_to_file(codec, x, out, batch=500, progress=False)
    z = load_encoded(out, require_ivf=True)
    assert z["codes"].shape == (2000, 4) and z["ivf_K"] == 16
    assert np.load(out).shape == (2000, 4)               # a 1-byte IVF id (16 lists), then 3 bytes
    # the model's normalisation is the identity, so its IVF step is the raw nearest centroid
    # (allow float32 near-ties between faiss and torch distances)
    assert (z["codes"][:, 0] == assign_to_centroids(x, centroids)).mean() > 0.99


def test_model_sha_follows_the_weights(make_codec, tmp_path):
    codec = make_codec()
    codec.save(tmp_path / "m.pt")
    assert model_sha(QincoCodec.load(tmp_path / "m.pt", B=1)) == model_sha(codec)
    assert model_sha(make_codec(seed=1)) != model_sha(codec)


def test_load_errors(make_codec, x, tmp_path):
    with pytest.raises(DatasetError, match="task=encode model="):
        load_encoded(tmp_path / "missing.npy")
    encode_to_file(make_codec(), x[:10], tmp_path / "flat.npy", progress=False)
    with pytest.raises(InputError, match="without IVF.*ivf_centroids="):
        load_encoded(tmp_path / "flat.npy", require_ivf=True)
    np.save(tmp_path / "short.npy", np.load(tmp_path / "flat.npy")[:9])
    shutil.copy(tmp_path / "flat.npy.json", tmp_path / "short.npy.json")
    with pytest.raises(DatasetError, match="do not match its sidecar"):
        load_encoded(tmp_path / "short.npy")
    (tmp_path / "short.npy.json").unlink()
    with pytest.raises(DatasetError, match="no sidecar short.npy.json"):
        load_encoded(tmp_path / "short.npy")
    (tmp_path / "short.npy.json").write_text("{}")
    with pytest.raises(DatasetError, match="not a qinco2 codes sidecar"):
        load_encoded(tmp_path / "short.npy")


def test_old_npz_files_load_and_convert(make_codec, x, tmp_path):
    codec = make_codec(ivf_K=16, ivf_centroids=torch.from_numpy(x[:16].copy()))
    codes = codec.encode(x[:300])
    np.savez(tmp_path / "old.npz", codes=codes, K=16, M=3, D=D, ivf_K=16, model_sha=model_sha(codec))
    old = load_encoded(tmp_path / "old.npz", require_ivf=True)
    np.testing.assert_array_equal(old["codes"], codes)
    r = convert_codes(tmp_path / "old.npz", tmp_path / "new.npy", batch=64)
    assert r["rows"] == 300 and r["code_size"] == 4
    new = load_encoded(tmp_path / "new.npy", require_ivf=True)
    np.testing.assert_array_equal(new["codes"], codes)
    assert {k: new[k] for k in ("K", "M", "D", "ivf_K", "model_sha")} == {
        k: old[k] for k in ("K", "M", "D", "ivf_K", "model_sha")}
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(DatasetError, match="not a qinco2 codes file"):
        load_encoded(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="cannot read"):
        load_encoded(tmp_path / "junk.npz")


def test_encode_errors_leave_no_file(make_codec, x, tmp_path):
    codec = make_codec()
    bad = x[:1000].copy()
    bad[700, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        encode_to_file(codec, bad, tmp_path / "codes.npy", batch=300, progress=False)
    assert _files(tmp_path) == [".codes.npy.parts"]         # shards kept for a resumed run
    shutil.rmtree(tmp_path / ".codes.npy.parts")
    with pytest.raises(InputError, match="dimension 5"):
        encode_to_file(codec, x[:, :5], tmp_path / "codes.npy", progress=False)
    for name in ("codes.bin", "codes.npz"):
        with pytest.raises(InputError, match="must end in .npy"):
            encode_to_file(codec, x, tmp_path / name, progress=False)
    assert _files(tmp_path) == []


def test_cli_encode_writes_the_model_sha(make_codec, x, tmp_path, capsys):
    codec = make_codec(ivf_K=16, ivf_centroids=torch.from_numpy(x[:16].copy()))
    codec.save(tmp_path / "m.pt")
    write_vectors(tmp_path / "base.fvecs", x[:500])
    out = tmp_path / "db.npy"
    assert main(["task=encode", f"model={tmp_path / 'm.pt'}", f"db={tmp_path / 'base.fvecs'}",
                 f"output={out}", "cpu=true", "verbose=false"]) == 0
    assert '"model_sha"' in capsys.readouterr().out
    z = load_encoded(out, require_ivf=True)
    assert z["model_sha"] == model_sha(codec)
    np.testing.assert_array_equal(z["codes"], codec.encode(x[:500]))


def test_a_killed_encoding_resumes_to_the_same_file(dies_after, make_codec, x, tmp_path, monkeypatch):
    codec = make_codec()
    data, encode = x[:1000], codec.encode
    encode_to_file(codec, data, tmp_path / "ref.npy", batch=100, shard_rows=100, progress=False)
    monkeypatch.setattr(codec, "encode", dies_after(codec, 3))     # killed while encoding shard 3
    with pytest.raises(KeyboardInterrupt):
        encode_to_file(codec, data, tmp_path / "out.npy", batch=100, shard_rows=100, progress=False)
    parts = tmp_path / ".out.npy.parts"
    assert sorted(p.name for p in parts.glob("shard-*.npy")) == [f"shard-{i:07d}.npy" for i in range(3)]
    (parts / "shard-0000002.npy").write_bytes(b"cut short")      # a shard whose checksum fails
    calls = []
    monkeypatch.setattr(codec, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    encode_to_file(codec, data, tmp_path / "out.npy", batch=100, shard_rows=100, progress=False)
    assert len(calls) == 8                       # shards 0 and 1 were kept, 2..9 encoded
    assert not parts.exists()
    ref, out = load_encoded(tmp_path / "ref.npy"), load_encoded(tmp_path / "out.npy")
    assert np.asarray(out["codes"]).tobytes() == np.asarray(ref["codes"]).tobytes()
    assert out["model_sha"] == ref["model_sha"]
    assert (tmp_path / "out.npy").read_bytes() == (tmp_path / "ref.npy").read_bytes()


def test_shards_of_other_data_are_not_reused(dies_after, make_codec, x, tmp_path, monkeypatch):
    codec = make_codec()
    encode = codec.encode
    monkeypatch.setattr(codec, "encode", dies_after(codec, 2))
    with pytest.raises(KeyboardInterrupt):
        encode_to_file(codec, x[:500], tmp_path / "out.npy", batch=100, shard_rows=100, progress=False)
    monkeypatch.setattr(codec, "encode", encode)
    encode_to_file(codec, x[500:1000], tmp_path / "out.npy", batch=100, shard_rows=100, progress=False)
    np.testing.assert_array_equal(load_encoded(tmp_path / "out.npy")["codes"], codec.encode(x[500:1000]))


def test_encoding_a_read_only_memory_map_gives_torch_writable_rows(make_codec, x, x_memmap, monkeypatch):
    """torch warns (once per process) when it wraps read-only memory: the codec copies such rows."""
    codec = make_codec()
    assert not x_memmap.flags.writeable
    as_tensor, seen = torch.as_tensor, []
    monkeypatch.setattr(torch, "as_tensor", lambda a, *args, **kw: seen.append(
        getattr(a, "flags", None) is None or a.flags.writeable) or as_tensor(a, *args, **kw))
    np.testing.assert_array_equal(codec.encode(x_memmap[:100]), codec.encode(x[:100]))
    assert seen and all(seen)
