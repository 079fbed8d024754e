"""Files of the IVF-QINCo2 index object (:class:`~qinco2.ivfsearch.index.IVFQincoIndex`): the
folder it is saved to, and the checks that a model, codes, a faiss index and a pairwise decoder
belong together.

A saved index is a small folder, each file written atomically (:mod:`qinco2.atomic`)::

    index.json            format, version, metric, model digest, ntotal, code layout (written last)
    model.pt              the codec's model file (QincoCodec.save): load() needs no other file
    shortlist.faissindex  the faiss IVF-AQ index (+ .json sidecar), as task=build_index writes it
    codes.npy             packed codes (ntotal, code_size) uint8, memory-mapped when loaded
    ids.npy               int64 user ids (ntotal,), only when they are not 0..ntotal-1
    pairwise.pt           the pairwise decoder, only when the index has one

``index.json`` is removed first and written last, so a folder whose saving was interrupted is
refused on loading instead of being read half old, half new.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..atomic import atomic_open, atomic_path
from ..codec.code_layout import CodeLayout
from ..errors import DatasetError, InputError, ModelFileError
from .pairwise import PairwiseDecoder

FORMAT_TAG = "qinco2-ivf-index"
FORMAT_VERSION = 1
META, MODEL, SHORTLIST, CODES, IDS, PAIRWISE = ("index.json", "model.pt", "shortlist.faissindex", "codes.npy",
                                                 "ids.npy", "pairwise.pt")
SAVE_HINT = "save it again with IVFQincoIndex.save(path)"
ENCODE_DB_HINT = "encode the database with `qinco2 task=encode model={model} db=<vectors> output={path}`"


def check_same_model(have_sha: str | None, want_sha: str, what: str, fix: str) -> None:
    """:class:`InputError` when ``what`` (codes, an index) was made by another model than the
    codec's (``have_sha`` None: not recorded, nothing to check)."""
    if have_sha is not None and have_sha != want_sha:
        raise InputError(f"{what} come from model {have_sha}, but the codec given is model {want_sha}; {fix}")


def load_pairwise_for(path, codec, nlist: int) -> PairwiseDecoder:
    """A pairwise decoder file, checked against the codec's code sizes and the index's ``nlist``."""
    if not Path(path).is_file():
        raise ModelFileError(f"pairwise decoder file {path} does not exist; train one with `qinco2 "
                             "task=train_pairwise_decoder ivf_centroids=<centroids.npy> "
                             f"encoded_trainset=<train codes.npy> output={path}`")
    dec = PairwiseDecoder.load(path)
    check_pairwise(dec, codec, nlist, f"pairwise decoder {path}")
    return dec


def check_pairwise(dec: PairwiseDecoder, codec, nlist: int, what: str = "the pairwise decoder") -> None:
    """A trained decoder whose (M, K, IVF lists) are the codec's and the index's."""
    have = (dec.M_, dec.K, len(dec.ivf_centroids_))
    want = (codec.n_codes - 1, codec.model_config.K, nlist)
    if have != want:
        raise InputError(f"{what} decodes codes with (M, K, IVF lists) = {have} but the model and index "
                         f"have {want}; train it with `qinco2 task=train_pairwise_decoder` on codes of this model")


# ---------------------------------------------------------------------------- the folder
def start_saving(folder) -> Path:
    """The folder (created), its ``index.json`` removed: an unfinished save is never loaded.
    A non-empty folder that is not a saved index is refused (nothing in it is overwritten)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"cannot save the index to {folder}: it is a file; an index is saved to a folder, "
                         "give a new path or the folder of an earlier save")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / META).is_file():
        raise InputError(f"cannot save the index to {folder}: the folder holds other files; give a new "
                         "or empty folder, or the folder of an earlier save")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META).unlink(missing_ok=True)
    return folder


def write_array(path: Path, a: np.ndarray | None) -> None:
    """``a`` as a ``.npy`` file written atomically, or (None) the file removed."""
    if a is None:
        path.unlink(missing_ok=True)
        return
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, a, allow_pickle=False)


def finish_saving(folder: Path, meta: dict) -> None:
    with atomic_open(folder / META) as f:
        f.write(json.dumps({"format": FORMAT_TAG, "version": FORMAT_VERSION, **meta}, indent=1).encode())


def read_meta(folder) -> dict:
    """The ``index.json`` of a saved index, checked to be ours and of this version."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"index folder {folder} does not exist (or is a file); save an index there with "
                           "IVFQincoIndex.save(path)")
    if not (folder / META).is_file():
        raise DatasetError(f"{folder} holds no {META}: it is not a saved IVFQincoIndex, or its saving was "
                           f"interrupted; {SAVE_HINT}")
    try:
        meta = json.loads((folder / META).read_text())
        layout = CodeLayout(**meta["layout"])
        int(meta["ntotal"]), str(meta["metric"]), str(meta["model_sha"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{folder / META} is damaged ({exc!r}); {SAVE_HINT}") from None
    if meta.get("format") != FORMAT_TAG or meta.get("version") != FORMAT_VERSION:
        raise DatasetError(f"{folder / META} is not an IVFQincoIndex file of version {FORMAT_VERSION} "
                           f"(format {meta.get('format')!r}, version {meta.get('version')!r}); {SAVE_HINT}")
    meta["layout"] = layout
    return meta


def read_array(path: Path, shape: tuple, dtype) -> np.ndarray:
    """A ``.npy`` file of the saved index (memory-mapped), checked to have ``shape`` and ``dtype``."""
    if not path.is_file():
        raise DatasetError(f"{path} is missing from the saved index; {SAVE_HINT}")
    try:
        a = np.load(path, mmap_mode="r" if shape[0] else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DatasetError(f"cannot read {path} ({exc}); {SAVE_HINT}") from None
    if a.shape != shape or a.dtype != np.dtype(dtype):
        raise DatasetError(f"{path} holds {a.dtype} {a.shape} but the index records {np.dtype(dtype)} {shape}; "
                           f"{SAVE_HINT}")
    return a
