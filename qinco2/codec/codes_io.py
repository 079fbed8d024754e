"""Encoding large (memory-mapped, larger than RAM) arrays to a codes file, and reading it
back (spec section 8.3).

A codes file is two files:

* ``codes.npy``: the packed codes ``(N, code_size)`` uint8 (:mod:`.code_layout`: for an IVF
  model the IVF id first, as the smallest integer type that holds it, then one byte per step
  for ``K <= 256``), a plain NumPy file that is memory-mapped, never read whole;
* ``codes.npy.json``: the sidecar, with the code sizes ``K``, ``M``, ``D``, ``ivf_K`` (0
  without IVF), ``rows``, the byte layout and ``model_sha``, a short digest of the model's
  weights, so that later stages can check that codes and model belong together.

:func:`encode_to_file` encodes shard by shard (split over the processes of a launched job),
each shard written with the checksums of its codes and of its input rows so that a killed job
resumes where it stopped (a shard whose input rows changed since is encoded again), then
merges the shards into the ``.npy`` (temporary file, then rename; the sidecar is written last,
so a codes file without its sidecar is never taken for a finished one): peak disk use is about
twice the codes' size, memory use one chunk. One job at a time writes a codes file: the lock
file ``.<name>.lock`` (:mod:`qinco2.locks`) refuses a second one. :func:`load_encoded` also reads the ``.npz``
files of earlier versions (into memory); :func:`convert_codes` rewrites one as ``.npy``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

from ..atomic import atomic_open, atomic_path
from ..checkpoint import tensors_sha256
from ..distributed import Workers
from ..errors import DatasetError, InputError
from ..locks import exclusive_lock
from ..progress import progress_bar
from ..rows import RowStack
from ..validation import check_vectors
from .code_layout import CodeLayout, PackedCodes
from .codec import QincoCodec
from .precision import check_precision

log = logging.getLogger(__name__)

SIZE_KEYS = ("K", "M", "D", "ivf_K")
SHARD_ROWS = 65_536     # rows per restartable shard of an encoding job
ENCODE_HINT = "produce it with `qinco2 task=encode model=<model.pt> db=<vectors> output={path}`"
FORMAT = "qinco2-codes"
FORMAT_VERSION = 1


def model_sha(codec: QincoCodec) -> str:
    """16 hex digits of the sha256 of the model's weights (names, dtypes, shapes and bytes);
    the same for a trained codec, its saved file loaded back, and any device."""
    return tensors_sha256(codec._model().state_dict().items())[:16]   # the model file's checksum, cut


def _parts(x, D: int) -> list[np.ndarray]:
    """The input as a list of arrays (one array, or a list of them laid end to end); their
    NaN/Inf are found chunk by chunk when the codec encodes them."""
    parts = [x] if isinstance(x, np.ndarray) else list(x)
    for p in parts:
        check_vectors(p, "x", D, dim_owner=f"the codec was trained on D={D}", finite=False)
    return parts


def _rows(parts: list[np.ndarray], start: int, stop: int) -> np.ndarray:
    """Rows ``start..stop`` of the parts laid end to end, as a float32 array."""
    return np.array(RowStack(parts)[start:stop], dtype=np.float32)


def _fingerprint(parts: list[np.ndarray], n: int, samples: int = 64) -> str:
    """Digest of ``samples`` rows spread over the input (first and last included): shards
    of other input data are not reused."""
    h = hashlib.sha256()
    for i in sorted(set(np.linspace(0, n - 1, samples).astype(int).tolist())) if n else []:
        h.update(_rows(parts, i, i + 1).tobytes())
    return h.hexdigest()[:16]


def _shard_meta(shard: Path) -> Path:
    return shard.with_suffix(".json")


def _shard_bytes(shard: Path) -> tuple[bytes, dict] | None:
    """The bytes of a shard file and its metadata (the sha256 of these bytes and of the input
    rows encoded) when the checksum matches, else None (a shard cut short by a kill has no
    metadata file)."""
    meta_file = _shard_meta(shard)
    if not (shard.is_file() and meta_file.is_file()):
        return None
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError:
        return None
    data = shard.read_bytes()
    ok = isinstance(meta, dict) and meta.get("sha256") == hashlib.sha256(data).hexdigest()
    return (data, meta) if ok else None


def _write_shard(shard: Path, packed_NC: np.ndarray, rows_sha: str) -> None:
    buffer = io.BytesIO()
    np.save(buffer, packed_NC)
    data = buffer.getvalue()
    with atomic_open(shard) as f:
        f.write(data)
    meta = {"sha256": hashlib.sha256(data).hexdigest(), "input_sha256": rows_sha}
    with atomic_open(_shard_meta(shard)) as f:      # written last: marks the shard done
        f.write(json.dumps(meta).encode())


def _rows_sha(parts: list[np.ndarray], lo: int, hi: int, batch: int) -> str:
    """sha256 of the float32 bytes of the input rows ``lo..hi`` (read ``batch`` at a time)."""
    h = hashlib.sha256()
    for a in range(lo, hi, batch):
        h.update(_rows(parts, a, min(a + batch, hi)).tobytes())
    return h.hexdigest()


def _reusable(shard: Path, parts: list[np.ndarray], lo: int, hi: int, batch: int) -> bool:
    """The shard is complete and was encoded from the input rows ``lo..hi`` as they are now
    (re-hashing them is far cheaper than encoding them again)."""
    done = _shard_bytes(shard)
    if done is None:
        return False
    if done[1].get("input_sha256") != _rows_sha(parts, lo, hi, batch):
        log.warning("input rows %d..%d changed since %s was encoded: encoding them again", lo, hi, shard)
        return False
    return True


def _encode_shard(codec: QincoCodec, parts: list[np.ndarray], shard: Path, lo: int, hi: int, batch: int,
                  A: int | None, B: int | None, precision: str) -> None:
    h, packed = hashlib.sha256(), []
    for a in range(lo, hi, batch):
        x_ND = _rows(parts, a, min(a + batch, hi))
        h.update(x_ND.tobytes())
        try:
            packed.append(codec.encode(x_ND, A=A, B=B, batch_size=batch, packed=True, precision=precision))
        except InputError as exc:       # its row numbers count from the chunk's first row
            raise InputError(f"input rows {a}..{a + len(x_ND)} (row numbers below count from {a}): {exc}") from exc
    _write_shard(shard, np.concatenate(packed), h.hexdigest())


def _prepare_parts(work: Path, job: dict) -> None:
    """The shard folder of this job; shards of a different job (other input, model or beam)
    are deleted."""
    spec = work / "job.json"
    if work.is_dir() and (not spec.is_file() or json.loads(spec.read_text()) != job):
        log.warning("%s holds shards of another encoding job: starting over", work)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not spec.is_file():
        with atomic_open(spec) as f:
            f.write(json.dumps(job).encode())


def sidecar_path(path) -> Path:
    """The JSON sidecar of the codes file ``path`` (``codes.npy`` -> ``codes.npy.json``)."""
    return Path(f"{path}.json")


def encode_to_file(codec: QincoCodec, x, path, *, batch: int = 65_536, progress: bool = True,
                   A: int | None = None, B: int | None = None, shard_rows: int = SHARD_ROWS,
                   workers: Workers = Workers(), precision: str = "fp32") -> dict:
    """Encode ``x`` (an ``(N, D)`` array, or a list of arrays encoded one after the other) to
    the codes file ``path`` (``.npy`` plus its ``.npy.json`` sidecar), ``batch`` rows at a
    time; ``A``/``B`` override the model's beam, ``precision`` is the arithmetic of the step
    networks (:meth:`QincoCodec.encode`). Returns the sidecar's content.

    The rows are cut into shards of ``shard_rows``; shard ``i`` is encoded by process
    ``i % world_size`` and written, with the checksums of its codes and of its input rows, to
    the folder ``.<name>.parts`` beside ``path``. Run again after a crash or kill, the same
    call skips the shards already written and checked (input rows changed since: encoded
    again); rank 0 then merges them in order into ``path`` and removes the folder. Rank 0
    holds the lock file ``.<name>.lock`` meanwhile: a second job writing ``path`` is refused
    (:class:`~qinco2.locks.LockedError`). A process that fails stops the others."""
    check_precision(precision, codec.device)
    job_precision = {} if precision == "fp32" else {"precision": precision}   # fp32 jobs: as before
    with contextlib.ExitStack() as held:
        with workers.synced("preparing the encoding"):
            parts, path, meta = _check_encoding(codec, x, path, shard_rows)
            n, work = sum(len(p) for p in parts), path.parent / f".{path.name}.parts"
            if workers.is_main:
                held.enter_context(exclusive_lock(path))
                _prepare_parts(work, {**meta, "n": n, "shard_rows": shard_rows, "A": A, "B": B, **job_precision,
                                      "shards": 2, "format": FORMAT_VERSION, "data": _fingerprint(parts, n)})
        with workers.synced("encoding its shards"):
            shards = range(workers.rank, -(-n // shard_rows), workers.world_size)
            with progress_bar(total=n, unit="vec", desc=f"encode {path.name}",
                      disable=not (progress and workers.is_main)) as bar:
                for i in shards:
                    lo, hi = i * shard_rows, min(n, (i + 1) * shard_rows)
                    shard = work / f"shard-{i:07d}.npy"
                    if not _reusable(shard, parts, lo, hi, batch):
                        _encode_shard(codec, parts, shard, lo, hi, batch, A, B, precision)
                    bar.update((hi - lo) * workers.world_size)
        sidecar = {**meta, "rows": n}
        with workers.synced("merging the shards"):
            if workers.is_main:
                sidecar = _write_codes_file(path, meta, n, lambda out: _fill_from_shards(out, work, shard_rows))
                shutil.rmtree(work)
    log.info("wrote %d codes of %d bytes to %s", n, codec.code_size, path)
    return {**sidecar, "shape": [n, codec.n_codes]}


def _check_encoding(codec: QincoCodec, x, path, shard_rows: int) -> tuple[list[np.ndarray], Path, dict]:
    """The input parts, the codes file's path (its folder made) and the codes' metadata."""
    cfg = codec._model().cfg
    parts = _parts(x, cfg.D)
    path = Path(path)
    if path.suffix != ".npy":
        raise InputError(f"the codes file must end in .npy (packed codes, memory-mapped when read; a "
                         f".npy.json sidecar is written beside it), got {path}")
    if shard_rows < 1:
        raise InputError(f"shard_rows must be >= 1, got {shard_rows}")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"K": cfg.K, "M": cfg.M, "D": cfg.D, "ivf_K": cfg.ivf_K, "model_sha": model_sha(codec)}
    return parts, path, meta


def _fill_from_shards(out_NC: np.ndarray, work: Path, shard_rows: int) -> None:
    for i in range(-(-len(out_NC) // shard_rows)):
        shard = work / f"shard-{i:07d}.npy"
        done = _shard_bytes(shard)
        if done is None:
            raise DatasetError(f"shard {shard} is missing or corrupt; run the same command again")
        out_NC[i * shard_rows:(i + 1) * shard_rows] = np.load(io.BytesIO(done[0]))


def _write_codes_file(path: Path, meta: dict, n: int, fill) -> dict:
    """Write the packed codes ``(n, code_size)`` (``fill(memory_map)`` writes the rows) to
    ``path`` atomically, then its sidecar; returns the sidecar's content."""
    layout = CodeLayout(M=meta["M"], K=meta["K"], ivf_K=meta["ivf_K"])
    sidecar = sidecar_path(path)
    sidecar.unlink(missing_ok=True)       # a codes file without its sidecar is an unfinished one
    with atomic_path(path) as tmp:
        out_NC = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, layout.code_size))
        fill(out_NC)
        out_NC.flush()
        del out_NC
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    content = {"format": FORMAT, "version": FORMAT_VERSION, **meta, "rows": n, **layout.to_dict()}
    with atomic_open(sidecar) as f:
        f.write(json.dumps(content, indent=1).encode())
    return content


def convert_codes(npz_path, npy_path, *, batch: int = 1 << 20) -> dict:
    """Rewrite a ``.npz`` codes file of an earlier version as a ``.npy`` codes file with its
    sidecar (packed, memory-mappable); returns the sidecar's content."""
    old = load_encoded(npz_path)
    npy_path = Path(npy_path)
    if npy_path.suffix != ".npy":
        raise InputError(f"the new codes file must end in .npy, got {npy_path}")
    meta = {k: old[k] for k in (*SIZE_KEYS, "model_sha")}
    layout = CodeLayout(M=old["M"], K=old["K"], ivf_K=old["ivf_K"])
    codes = old["codes"]

    def fill(out_NC):
        for i in range(0, len(codes), batch):
            out_NC[i:i + batch] = layout.pack(codes[i:i + batch])

    return _write_codes_file(npy_path, meta, len(codes), fill)


def load_encoded(path, *, require_ivf: bool = False) -> dict:
    """The content of a codes file written by :func:`encode_to_file`: ``codes`` (a
    :class:`~qinco2.codec.code_layout.PackedCodes`, the int32 ``(N, n_codes)`` codes unpacked
    on access from a memory map), ``K``, ``M``, ``D``, ``ivf_K`` (int) and ``model_sha`` (str).
    A ``.npz`` of an earlier version is read into memory (``codes`` int32; ``model_sha`` None in
    the oldest). ``require_ivf``: the codes must start with an IVF column."""
    p = Path(path)
    hint = ENCODE_HINT.format(path=p.with_suffix(".npy"))
    if not p.is_file():
        raise DatasetError(f"codes file {p} does not exist; {hint}")
    out = _load_npz(p, hint) if p.suffix == ".npz" else _load_npy(p, hint)
    if require_ivf and not out["ivf_K"]:
        raise InputError(f"the codes in {p} come from a model without IVF (ivf_K=0); train the "
                         "model with ivf_centroids=<centroids.npy> (made by `qinco2 "
                         "task=ivf_centroids ivf_K=... output=centroids.npy`) and encode again")
    return out


def _load_npy(p: Path, hint: str) -> dict:
    sidecar = sidecar_path(p)
    if not sidecar.is_file():
        raise DatasetError(f"{p} has no sidecar {sidecar.name} (an unfinished or foreign file); {hint}")
    try:
        meta = json.loads(sidecar.read_text())
        layout = CodeLayout(M=int(meta["M"]), K=int(meta["K"]), ivf_K=int(meta["ivf_K"]))
        rows = int(meta["rows"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{sidecar} is not a qinco2 codes sidecar ({exc!r}); {hint}") from None
    try:
        packed_NC = np.load(p, mmap_mode="r" if rows else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DatasetError(f"cannot read codes file {p} ({exc}); {hint}") from None
    if packed_NC.dtype != np.uint8 or packed_NC.shape != (rows, layout.code_size):
        raise DatasetError(f"{p}: packed codes of shape {packed_NC.shape} and dtype {packed_NC.dtype} do not "
                           f"match its sidecar ({rows} rows of {layout.code_size} bytes); {hint}")
    out = {k: int(meta[k]) for k in SIZE_KEYS}
    out["model_sha"] = meta.get("model_sha")
    out["codes"] = PackedCodes(packed_NC, layout)
    return out


def _load_npz(p: Path, hint: str) -> dict:
    try:
        with np.load(p, allow_pickle=False) as z:
            content = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"cannot read codes file {p} ({exc}); {hint}") from None
    missing = [k for k in ("codes", *SIZE_KEYS) if k not in content]
    if missing:
        raise DatasetError(f"{p} is not a qinco2 codes file (no {', '.join(missing)}); {hint}")
    out = {k: int(content[k]) for k in SIZE_KEYS}
    out["model_sha"] = str(content["model_sha"]) if "model_sha" in content else None
    codes = content["codes"]
    n_codes = out["M"] + (1 if out["ivf_K"] else 0)
    if codes.ndim != 2 or codes.dtype.kind not in "iu" or codes.shape[1] != n_codes:
        raise DatasetError(f"{p}: codes of shape {codes.shape} and dtype {codes.dtype} do not "
                           f"match M={out['M']}, ivf_K={out['ivf_K']}; {hint}")
    log.warning("%s is a codes file of an earlier version, read whole into memory; convert it once with "
                "`python -c \"import qinco2; qinco2.convert_codes('%s', '%s')\"`", p, p, p.with_suffix(".npy"))
    out["codes"] = codes.astype(np.int32, copy=False)
    return out
