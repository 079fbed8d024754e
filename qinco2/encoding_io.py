"""Encoding large (memory-mapped, larger than RAM) arrays to a ``.npz`` codes file, and
reading it back (spec section 8.3).

A codes file holds ``codes`` int32 ``(N, n_codes)`` (for an IVF model column 0 is the IVF id,
columns 1..M the step codes), the code sizes ``K``, ``M``, ``D``, ``ivf_K`` (0 without IVF),
and ``model_sha``: a short digest of the model's weights, so that later stages can check that
codes and model belong together.

:func:`encode_to_npz` encodes chunk by chunk into a temporary int32 ``.npy`` memory map next
to the output, then writes the ``.npz`` atomically (temporary file, then rename) and removes
the map: peak disk use is about twice the codes' size, memory use one chunk.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .codec import QincoCodec
from .errors import DatasetError, InputError
from .formats import _atomic_open

log = logging.getLogger(__name__)

SIZE_KEYS = ("K", "M", "D", "ivf_K")
ENCODE_HINT = "produce it with `qinco2 task=encode model=<model.pt> db=<vectors> output={path}`"


def model_sha(codec: QincoCodec) -> str:
    """16 hex digits of the sha256 of the model's weights (names, dtypes, shapes and bytes);
    the same for a trained codec, its saved file loaded back, and any device."""
    h = hashlib.sha256()
    for name, t in sorted(codec._model().state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _parts(x, D: int) -> list[np.ndarray]:
    parts = [x] if isinstance(x, np.ndarray) else list(x)
    for p in parts:
        if not isinstance(p, np.ndarray) or p.ndim != 2 or p.dtype.kind not in "iuf":
            raise InputError(f"x must be a 2-D integer or float numpy array (N, D) or a list of "
                             f"them, got {getattr(p, 'shape', type(p).__name__)}")
        if p.shape[1] != D:
            raise InputError(f"x has dimension {p.shape[1]} but the model was trained on D={D}")
    return parts


def encode_to_npz(codec: QincoCodec, x, path, *, batch: int = 65_536, progress: bool = True,
                  A: int | None = None, B: int | None = None) -> dict:
    """Encode ``x`` (an ``(N, D)`` array, or a list of arrays encoded one after the other) to
    the codes file ``path`` (``.npz``), ``batch`` rows at a time; ``A``/``B`` override the
    model's beam. Returns the file's sizes, ``model_sha`` and the codes' ``shape``."""
    cfg = codec._model().cfg
    parts = _parts(x, cfg.D)
    path = Path(path)
    if path.suffix != ".npz":
        raise InputError(f"the codes file must end in .npz, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    n = sum(len(p) for p in parts)
    meta = {"K": cfg.K, "M": cfg.M, "D": cfg.D, "ivf_K": cfg.ivf_K, "model_sha": model_sha(codec)}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".codes.npy", dir=path.parent)
    os.close(fd)
    try:
        codes_NM = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32,
                                             shape=(n, codec.n_codes))
        with tqdm(total=n, unit="vec", desc=f"encode {path.name}", disable=not progress) as bar:
            start = 0
            for part in parts:
                for i in range(0, len(part), batch):
                    x_ND = np.array(part[i:i + batch], dtype=np.float32)  # writable copy for torch
                    codes = codec.encode(x_ND, A=A, B=B, batch_size=batch)
                    codes_NM[start:start + len(x_ND)] = codes
                    start += len(x_ND)
                    bar.update(len(x_ND))
        codes_NM.flush()
        with _atomic_open(path) as f:  # np.savez streams a memory map in 16 MiB pieces
            np.savez(f, codes=codes_NM, **meta)
        del codes_NM
    finally:
        Path(tmp).unlink(missing_ok=True)
    log.info("wrote codes (%d, %d) to %s", n, codec.n_codes, path)
    return {**meta, "shape": [n, codec.n_codes]}


def load_encoded(path, *, require_ivf: bool = False) -> dict:
    """The content of a codes file written by :func:`encode_to_npz`: ``codes`` int32
    ``(N, n_codes)``, ``K``, ``M``, ``D``, ``ivf_K`` (int) and ``model_sha`` (str; None in files
    written before it existed). ``require_ivf``: the codes must start with an IVF column."""
    p = Path(path)
    hint = ENCODE_HINT.format(path=p)
    if not p.is_file():
        raise DatasetError(f"codes file {p} does not exist; {hint}")
    try:
        with np.load(p, allow_pickle=False) as z:
            content = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"cannot read codes file {p} ({exc}); {hint}") from None
    missing = [k for k in ("codes", *SIZE_KEYS) if k not in content]
    if missing:
        raise DatasetError(f"{p} is not a qinco2 codes file (no {', '.join(missing)}); "
                           f"{hint}")
    out = {k: int(content[k]) for k in SIZE_KEYS}
    out["model_sha"] = str(content["model_sha"]) if "model_sha" in content else None
    codes = content["codes"]
    n_codes = out["M"] + (1 if out["ivf_K"] else 0)
    if codes.ndim != 2 or codes.dtype.kind not in "iu" or codes.shape[1] != n_codes:
        raise DatasetError(f"{p}: codes of shape {codes.shape} and dtype {codes.dtype} do not "
                           f"match M={out['M']}, ivf_K={out['ivf_K']}; {hint}")
    if require_ivf and not out["ivf_K"]:
        raise InputError(f"the codes in {p} come from a model without IVF (ivf_K=0); train the "
                         "model with ivf_centroids=<centroids.npy> (made by `qinco2 "
                         "task=ivf_centroids ivf_K=... output=centroids.npy`) and encode again")
    out["codes"] = codes.astype(np.int32, copy=False)
    return out
