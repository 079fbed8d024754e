r"""The IVF-PQ tasks of the command line: ``task=ivfpq_build`` and ``task=ivfpq_search``.

    qinco2 task=ivfpq_build db=sift-photos n_lists=1024 pq_dim=32 output=sift.ivfpq
    qinco2 task=ivfpq_search db=sift-photos index=sift.ivfpq n_probes=[5,10,20,50] k=10
    qinco2 task=ivfpq_search db=sift-photos index=sift.ivfpq refine_ratio=4 refine=raw
    qinco2 task=ivfpq_search db=sift-photos index=sift.ivfpq refine_ratio=4 refine=codec \
        model=qinco2.pt encoded_db=db_codes.npy

The keys carry the names of :class:`qinco2.ivfpq.IndexParams` and
:class:`qinco2.ivfpq.SearchParams`; keys left out keep their cuVS defaults.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from ..atomic import atomic_open
from ..errors import ConfigError, InputError
from .common import data_limits, json_safe, load_codec, open_dataset, print_table, require
from .config import CliArgs
from .keys import IVFPQ_INDEX_KEYS as INDEX_KEYS
from .keys import IVFPQ_SEARCH_KEYS as SEARCH_KEYS

REFINE_KINDS = ("raw", "codec")


def _given(args: CliArgs, keys) -> dict:
    """The keys set on the command line (the others keep the parameter classes' defaults)."""
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def task_ivfpq_build(args: CliArgs, given: set[str], device: str) -> dict:
    from .. import ivfpq

    output = require(args, "output", "path of the index file to write, e.g. index.ivfpq")
    params = ivfpq.IndexParams(**_given(args, INDEX_KEYS))
    ds = open_dataset(args)
    x = ds.database(data_limits(args))
    start = time.perf_counter()
    index = ivfpq.build(params, x, device=device, progress=args.progress)
    build_s = time.perf_counter() - start
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    ivfpq.save(output, index)
    est = ivfpq.estimate_memory(len(x), x.shape[1], index.params, input_itemsize=x.dtype.itemsize,
                                device=str(index.device))
    result = {"task": "ivfpq_build", "output": output, "dataset": ds.name, "n": index.size,
              "dim": index.dim, **{k: v for k, v in dataclasses.asdict(index.params).items()},
              "rot_dim": index.rot_dim, "build_s": round(build_s, 2),
              "index_bytes": index.nbytes(), "index_bytes_estimate": est["index_bytes"],
              "device": str(index.device)}
    print_table([[k, v] for k, v in result.items() if k != "task"])
    return result


def _refiner(args: CliArgs, ds, limits, index, device: str) -> dict | None:
    """Keyword arguments of :func:`ivfpq.search_and_refine` for ``refine=``, or None."""
    from ..codec.codes_io import load_encoded, model_sha

    if args.refine is None:
        if args.refine_ratio != 1:
            raise ConfigError(f"refine_ratio={args.refine_ratio} needs refine=raw (exact distances "
                              "to the database vectors) or refine=codec (model= and encoded_db=)")
        return None
    if args.refine not in REFINE_KINDS:
        raise ConfigError(f"refine must be one of {REFINE_KINDS}, got {args.refine!r}")
    if args.refine == "raw":
        return {"dataset": ds.database(limits)}
    if args.encoded_db is None or args.model is None:
        raise ConfigError("refine=codec needs model=<QINCo2 model.pt> and encoded_db=<codes of the "
                          "database from `qinco2 task=encode model=<model.pt> db=<vectors> "
                          "output=db_codes.npy`>")
    codec = load_codec(args, set(), device)
    enc = load_encoded(args.encoded_db)
    if enc["model_sha"] is not None and enc["model_sha"] != model_sha(codec):
        raise InputError(f"the codes in {args.encoded_db} come from another model than "
                         f"{args.model}; encode the database with "
                         f"`qinco2 task=encode model={args.model} ...`")
    if len(enc["codes"]) != index.size:
        raise InputError(f"{args.encoded_db} holds {len(enc['codes'])} codes but the index holds "
                         f"{index.size} vectors; encode the same database rows the index was "
                         "built from")
    return {"codec": codec, "codes": enc["codes"]}


def task_ivfpq_search(args: CliArgs, given: set[str], device: str) -> dict:
    from .. import ivfpq
    from ..metrics import neighbor_recall, recall_at

    path = require(args, "index", "an index file from `qinco2 task=ivfpq_build ...`")
    index = ivfpq.load(path, device=device)
    ds = open_dataset(args)
    limits = data_limits(args)
    queries, gt = ds.query_vectors(), ds.ground_truth()
    refine = _refiner(args, ds, limits, index, device)
    probes = (args.n_probes if isinstance(args.n_probes, list)
              else [args.n_probes or ivfpq.SearchParams().n_probes])
    rows = []
    for n_probes in probes:
        sp = ivfpq.SearchParams(n_probes=n_probes, **_given(args, SEARCH_KEYS))
        start = time.perf_counter()
        if refine is None:
            _, ids = ivfpq.search(sp, index, queries, args.k)
        else:
            _, ids = ivfpq.search_and_refine(sp, index, queries, args.k,
                                             refine_ratio=args.refine_ratio, **refine)
        seconds = time.perf_counter() - start
        r = recall_at(ids, gt, [k for k in (1, 10, 100) if k <= args.k])
        k_recall = neighbor_recall(ids, gt, args.k) if gt.shape[1] >= args.k else None
        rows.append({"n_probes": n_probes, **{f"R@{k}": v for k, v in r.items()},
                     f"{args.k}-recall@{args.k}": k_recall, "qps": len(queries) / seconds})
    print_table([list(r.values()) for r in rows], list(rows[0]))
    result = {"task": "ivfpq_search", "index": path, "dataset": ds.name, "k": args.k,
              "refine": args.refine, "refine_ratio": args.refine_ratio,
              "n_queries": len(queries), "runs": rows}
    if args.output:                     # strict JSON, written atomically
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(args.output) as f:
            f.write(json.dumps(json_safe(result), indent=1, allow_nan=False).encode())
    return result
