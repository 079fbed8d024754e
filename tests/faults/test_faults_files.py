"""Fault injection on files and ids (issue 12, "Nothing lost, nothing silently wrong"):
damaged or foreign model and index files, refinement against another database than the
index's, ids the index cannot represent, and vector files of another format than their
suffix says. Each fault must raise a typed error naming the file and the problem."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from qinco2 import ivfpq
from qinco2.checkpoint import FORMAT_TAG, FORMAT_VERSION, WEIGHTS_SHA_KEY, atomic_torch_save, save_checkpoint
from qinco2.codec.codec import QincoCodec
from qinco2.errors import InputError, ModelFileError, VectorFileError
from qinco2.formats import count_vectors, open_vectors, write_vectors
from qinco2.ivfpq import IndexParams, SearchParams

D = 8
PARAMS = IndexParams(n_lists=4, pq_dim=4, pq_bits=4, kmeans_n_iters=2)
SEARCH = SearchParams(n_probes=4)


def _flip_byte_of(path, tensor: torch.Tensor, offset: int = 5) -> None:
    """Flip one bit of the stored bytes of ``tensor`` inside the file ``path``."""
    data = bytearray(path.read_bytes())
    pos = data.find(tensor.detach().cpu().contiguous().numpy().tobytes())
    assert pos >= 0, "the tensor's bytes are stored as they are"
    data[pos + offset] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def db():
    rng = np.random.default_rng(0)
    return rng.normal(size=(600, D)).astype(np.float32), rng.normal(size=(20, D)).astype(np.float32)


@pytest.fixture(scope="module")
def index(db):
    return ivfpq.build(PARAMS, db[0])


# ---------------------------------------------------------------------------- item 4: refine=raw
def test_refine_refuses_a_dataset_with_another_row_count(db, index):
    x, q = db
    with pytest.raises(InputError, match="built from 600 rows with fingerprint [0-9a-f]{16}, but the dataset "
                                         "given has 599 rows"):
        ivfpq.search_and_refine(SEARCH, index, q, 5, dataset=x[:599])


def test_refine_refuses_another_dataset_of_the_same_size(db, index):
    x, q = db
    other = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    with pytest.raises(InputError, match="600 rows with fingerprint .* the dataset given has 600 rows with "
                                         "fingerprint .*row 0 differs"):
        ivfpq.search_and_refine(SEARCH, index, q, 5, dataset=other)
    shifted = x.copy()
    shifted[-1] += 1                            # only the last row differs: it is sampled too
    with pytest.raises(InputError, match="row 599 differs"):
        ivfpq.search_and_refine(SEARCH, index, q, 5, dataset=shifted)
    ids = ivfpq.search_and_refine(SEARCH, index, q, 5, dataset=x)[1]      # the right data still refines
    assert ids.shape == (20, 5) and (ids >= 0).all()


def test_fingerprint_follows_extend_and_survives_save_load(db, tmp_path):
    x, q = db
    idx = ivfpq.build(PARAMS, x[:400])
    ivfpq.extend(idx, x[400:])                                  # ids 400..599
    path = tmp_path / "grown.ivfpq"
    ivfpq.save(path, idx)
    again = ivfpq.load(path)
    assert again.fingerprint.rows == 600 and again.fingerprint.digest() == idx.fingerprint.digest()
    assert again.fingerprint.digest() == ivfpq.build(PARAMS, x).fingerprint.digest()   # same data, same print
    ivfpq.search_and_refine(SEARCH, again, q, 5, dataset=x)
    with pytest.raises(InputError, match="built from 600 rows .* has 400 rows"):
        ivfpq.search_and_refine(SEARCH, again, q, 5, dataset=x[:400])
    changed = x.copy()
    changed[512] = 0                                            # a power of two among the added rows
    with pytest.raises(InputError, match="row 512 differs"):
        ivfpq.search_and_refine(SEARCH, again, q, 5, dataset=changed)


def test_cli_refine_raw_with_another_database_exits_with_an_error(db, tmp_path, capsys):
    from conftest import run_cli

    x, q = db
    paths = {name: tmp_path / f"{name}.fvecs" for name in ("base", "other", "query")}
    write_vectors(paths["base"], x)
    write_vectors(paths["other"], np.random.default_rng(2).normal(size=x.shape).astype(np.float32))
    write_vectors(paths["query"], q)
    write_vectors(tmp_path / "gt.ivecs", np.zeros((len(q), 5), np.int32))
    common = [f"queries={paths['query']}", f"queries_gt={tmp_path / 'gt.ivecs'}", "cpu=true", "verbose=false"]
    index = tmp_path / "a.ivfpq"
    rc, _, err, _ = run_cli(capsys, "task=ivfpq_build", f"db={paths['base']}", "n_lists=4", "pq_dim=4", "pq_bits=4",
                            "kmeans_n_iters=2", f"output={index}", *common)
    assert rc == 0, err
    search = ["task=ivfpq_search", f"index={index}", "n_probes=4", "k=5", "refine=raw", "refine_ratio=2", *common]
    assert run_cli(capsys, *search, f"db={paths['base']}")[0] == 0
    rc, _, err, _ = run_cli(capsys, *search, f"db={paths['other']}")
    assert rc == 2 and "built from 600 rows with fingerprint" in err


def test_refine_with_codes_of_another_row_count_is_refused(db, index, make_codec):
    x, q = db
    codec = make_codec()
    codes = codec.encode(x)
    ivfpq.search_and_refine(SEARCH, index, q, 5, codec=codec, codes=codes)
    with pytest.raises(InputError, match="built from 600 rows .* codes= holds 300 rows"):
        ivfpq.search_and_refine(SEARCH, index, q, 5, codec=codec, codes=codes[:300])


def test_index_file_without_fingerprint_loads_and_skips_the_check_with_a_warning(db, index, tmp_path, caplog):
    x, q = db
    path = tmp_path / "old.ivfpq"
    ivfpq.save(path, index)
    payload = torch.load(path, weights_only=True)
    del payload["data"], payload["sha256"]                       # as written before issue 12
    torch.save(payload, path)
    old = ivfpq.load(path)
    assert old.fingerprint is None
    with caplog.at_level(logging.WARNING, logger="qinco2.ivfpq.scan"):
        ids = ivfpq.search_and_refine(SEARCH, old, q, 5, dataset=x[::-1].copy())
    assert ids[1].shape == (20, 5)
    assert any("without the row count and fingerprint" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------- item 9: model files
def _model_payload(codec) -> tuple[dict, dict]:
    model = codec.model_
    return model.cfg.to_dict(), {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("text", ["hello, this is a text file\n", "a text file\n", "some,csv\n1,2\n"])
def test_a_text_file_as_model_is_a_model_file_error(tmp_path, text):
    path = tmp_path / "model.pt"
    path.write_text(text)
    with pytest.raises(ModelFileError, match="model.pt"):
        QincoCodec.load(path)


def test_a_directory_as_model_is_named(tmp_path):
    with pytest.raises(ModelFileError, match="is a directory"):
        QincoCodec.load(tmp_path)


@pytest.mark.parametrize("payload, words", [
    ({"format": FORMAT_TAG, "version": FORMAT_VERSION}, r"lacks \['model_config', 'state_dict'\]"),
    ({"format": FORMAT_TAG, "version": FORMAT_VERSION, "model_config": {"D": 8}}, r"lacks \['state_dict'\]"),
    ({"format": FORMAT_TAG, "version": FORMAT_VERSION, "model_config": [1], "state_dict": {}}, "must be dicts"),
    ({"format": FORMAT_TAG, "version": FORMAT_VERSION, "model_config": {"D": 8}, "state_dict": {"w": 1}},
     "not named tensors"),
])
def test_tagged_model_files_with_missing_or_wrong_keys(tmp_path, payload, words):
    path = tmp_path / "broken.pt"
    atomic_torch_save(payload, path)
    with pytest.raises(ModelFileError, match=words) as err:
        QincoCodec.load(path)
    assert "broken.pt" in str(err.value)


def test_missing_weight_and_wrong_shape_are_named(tmp_path, make_codec):
    cfg, state = _model_payload(make_codec())
    path = tmp_path / "model.pt"
    missing = dict(state)
    del missing["steps.1.codebook"]
    save_checkpoint(path, cfg, missing)
    with pytest.raises(ModelFileError, match="model.pt is a damaged model file.*missing weight steps.1.codebook"):
        QincoCodec.load(path)
    wrong = dict(state, **{"steps.0.codebook": torch.zeros(16, D + 1)})
    save_checkpoint(path, cfg, wrong)
    with pytest.raises(ModelFileError, match=r"steps.0.codebook has shape \(16, 9\), the config needs \(16, 8\)"):
        QincoCodec.load(path)
    save_checkpoint(path, cfg, dict(state, extra=torch.zeros(2)))
    with pytest.raises(ModelFileError, match="unexpected weight extra"):
        QincoCodec.load(path)


@pytest.mark.parametrize("change, words", [
    ({"bogus": 1}, "unknown model field"), ({"M": "3"}, "M must be an integer"), ({"K": 0}, "K must be >= 1"),
    ({"D": 0}, "D >= 1"), ({"codeword_skip": "yes"}, "codeword_skip must be a bool"), ({"de": 2.5}, "or None"),
])
def test_bad_model_config_is_a_model_file_error(tmp_path, make_codec, change, words):
    cfg, state = _model_payload(make_codec())
    path = tmp_path / "model.pt"
    save_checkpoint(path, {**cfg, **change}, state)
    with pytest.raises(ModelFileError, match=f"model.pt holds an invalid model config: .*{words}"):
        QincoCodec.load(path)


def test_a_flipped_byte_in_a_codebook_is_reported_as_corrupt(tmp_path, make_codec):
    codec = make_codec()
    path = tmp_path / "model.pt"
    codec.save(path)
    assert WEIGHTS_SHA_KEY in torch.load(path, weights_only=True)
    _flip_byte_of(path, codec.model_.steps[1].codebook)
    with pytest.raises(ModelFileError, match="model.pt is corrupt"):
        QincoCodec.load(path)


def test_a_model_file_without_checksum_still_loads(tmp_path, make_codec):
    codec = make_codec()
    path = tmp_path / "model.pt"
    codec.save(path)
    payload = torch.load(path, weights_only=True)
    del payload[WEIGHTS_SHA_KEY]
    torch.save(payload, path)
    x = np.random.default_rng(0).normal(size=(50, D)).astype(np.float32)
    np.testing.assert_array_equal(QincoCodec.load(path).encode(x), codec.encode(x))


def test_a_damaged_training_state_is_a_model_file_error(tmp_path, make_codec):
    cfg, state = _model_payload(make_codec())
    path = tmp_path / "model.pt"
    save_checkpoint(path, cfg, state, training={"config": {"no_such_field": 1}})
    with pytest.raises(ModelFileError, match="damaged training state"):
        QincoCodec.load(path)


def test_model_save_to_a_directory_or_under_a_file_fails_before_writing(tmp_path, make_codec):
    codec = make_codec()
    with pytest.raises(InputError, match="is a directory"):
        codec.save(tmp_path)
    (tmp_path / "plain").write_text("x")
    with pytest.raises(InputError, match="plain is a file, not a directory"):
        codec.save(tmp_path / "plain" / "sub" / "model.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]


# ---------------------------------------------------------------------------- item 9: index files
def _resaved(tmp_path, index, edit) -> str:
    path = tmp_path / "index.ivfpq"
    ivfpq.save(path, index)
    payload = torch.load(path, weights_only=True)
    payload.pop("sha256")
    edit(payload)
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("edit, words", [
    (lambda p: p.pop("pq_centers"), r"it lacks \['pq_centers'\]"),
    (lambda p: p["lists"].pop("ids"), "lists must hold"),
    (lambda p: p.update(centers=p["centers"][:, :-1]), r"centers has shape \(4, 7\).*call for \(4, 8\)"),
    (lambda p: p.update(pq_centers=p["pq_centers"].double()), "pq_centers has shape .*dtype torch.float64"),
    (lambda p: p["lists"].update(ids=p["lists"]["ids"][:-1]), r"lists.ids has shape \(599,\)"),
    (lambda p: p["params"].update(bogus=1), "unknown index parameters"),
    (lambda p: p["params"].update(pq_bits=3), "invalid index parameters.*pq_bits"),
    (lambda p: p.update(dim="8"), "dim must be a positive integer"),
    (lambda p: p.update(rotation_matrix=[1, 2]), "rotation_matrix is a list, not a tensor"),
    (lambda p: p.update(data={"rows": -1}), "malformed data fingerprint"),
])
def test_damaged_index_files_are_model_file_errors(tmp_path, index, edit, words):
    path = _resaved(tmp_path, index, edit)
    with pytest.raises(ModelFileError, match=f"index.ivfpq is a damaged IVF-PQ index file: {words}"):
        ivfpq.load(path)


def test_a_flipped_byte_in_an_index_is_reported_as_corrupt(tmp_path, index):
    path = tmp_path / "index.ivfpq"
    ivfpq.save(path, index)
    _flip_byte_of(path, index.lists.state_dict()["ids"], offset=8 * 300 + 1)
    with pytest.raises(ModelFileError, match="index.ivfpq is corrupt"):
        ivfpq.load(path)


@pytest.mark.parametrize("text", ["a text file\n", "hello\n"])
def test_a_text_file_as_index_is_a_model_file_error(tmp_path, text):
    path = tmp_path / "index.ivfpq"
    path.write_text(text)
    with pytest.raises(ModelFileError, match="index.ivfpq"):
        ivfpq.load(path)


def test_index_save_checks_the_output_path_before_writing(tmp_path, index):
    with pytest.raises(InputError, match="is a directory"):
        ivfpq.save(tmp_path, index)
    (tmp_path / "plain").write_text("x")
    with pytest.raises(InputError, match="plain is a file, not a directory"):
        ivfpq.save(tmp_path / "plain" / "index.ivfpq", index)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]


# ---------------------------------------------------------------------------- item 11: ids
@pytest.mark.parametrize("bad_ids, words", [
    (np.array([0, 1, 2, -1, 4, -7], dtype=np.int64), r"ids\[3\] = -1"),
    (np.array([0, 2**63, 2**64 - 1], dtype=np.uint64), r"ids\[1\] = 9223372036854775808"),
    ([5, 6, -2], r"ids\[2\] = -2"),
])
def test_extend_refuses_ids_the_index_cannot_return(db, bad_ids, words):
    x = db[0]
    idx = ivfpq.build(PARAMS, x)
    n = len(bad_ids)
    with pytest.raises(InputError, match=r"ids must be in \[0, 2\*\*63\).*" + words):
        ivfpq.extend(idx, x[:n], bad_ids)
    assert idx.size == 600 and idx.fingerprint.rows == 600          # nothing was added
    far = x[:1] + 100
    ivfpq.extend(idx, far, np.array([2**63 - 1], dtype=np.uint64))  # the largest id is fine
    assert 2**63 - 1 in ivfpq.search(SEARCH, idx, far, idx.size)[1]


# ---------------------------------------------------------------------------- item 12: vector files
def test_a_directory_without_a_vector_suffix_is_called_a_directory(tmp_path):
    folder = tmp_path / "vectors"
    folder.mkdir()
    with pytest.raises(VectorFileError, match="vectors: is a directory"):
        open_vectors(folder)


@pytest.mark.parametrize("suffix", [".fvecs", ".bvecs", ".ivecs", ".fbin", ".u8bin", ".ibin"])
def test_a_npy_file_renamed_is_told_to_be_renamed_back(tmp_path, suffix):
    np.save(tmp_path / "x.npy", np.arange(60, dtype=np.float32).reshape(6, 10))
    path = tmp_path / f"x{suffix}"
    (tmp_path / "x.npy").rename(path)
    with pytest.raises(VectorFileError, match=r"looks like a \.npy file.*NumPy magic.*rename it to x\.npy") as err:
        count_vectors(path)
    assert "cut it" not in str(err.value)


@pytest.mark.parametrize("real, named, words", [
    (".fvecs", ".fbin", r"\.fvecs or \.ivecs file, not a \.fbin"),
    (".fbin", ".fvecs", r"\.fbin or \.ibin file, not a \.fvecs"),
    (".bvecs", ".fvecs", r"\.bvecs file, not a \.fvecs"),
    (".fvecs", ".bvecs", r"\.fvecs or \.ivecs file, not a \.bvecs"),
    (".fvecs", ".npy", r"\.fvecs or \.ivecs file, not a \.npy"),
    (".u8bin", ".fbin", r"\.u8bin file, not a \.fbin"),
])
def test_other_formats_behind_a_suffix_are_named(tmp_path, real, named, words):
    write_vectors(tmp_path / f"x{real}", np.arange(7 * 12).reshape(7, 12) % 200)
    path = tmp_path / f"x{named}"
    (tmp_path / f"x{real}").rename(path)
    with pytest.raises(VectorFileError, match=f"looks like a {words}.*[Rr]ename it") as err:
        count_vectors(path)
    assert "cut it" not in str(err.value)


def test_a_file_smaller_than_one_record_is_not_told_to_be_cut_to_0_bytes(tmp_path):
    path = tmp_path / "x.fvecs"
    path.write_bytes(np.array([16], "<i4").tobytes() + bytes(20))   # d=16: a record is 68 bytes
    with pytest.raises(VectorFileError, match="file size 24 bytes is smaller than the record size 68 bytes") as err:
        count_vectors(path)
    assert "cut it" not in str(err.value)


def test_a_directory_as_data_set_is_called_a_directory(tmp_path):
    from qinco2 import DatasetError, resolve_dataset

    (tmp_path / "vectors").mkdir()
    with pytest.raises(DatasetError, match="is a directory"):
        resolve_dataset(str(tmp_path / "vectors"))
    with pytest.raises(DatasetError, match="is a directory"):
        resolve_dataset(str(tmp_path / "vectors") + "/")
