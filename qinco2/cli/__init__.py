"""The ``qinco2 task=... key=value ...`` command line: a thin layer over the public API.

Modules (imports point down only)::

    main              main(), run(), usage(): the task table, logging/threads/device setup
    codec_tasks       train, eval, eval_valset, encode, demo, search without index=
    ivfsearch_tasks   ivf_centroids, train_pairwise_decoder, build_index, search with index=
    ivfpq_tasks       ivfpq_build, ivfpq_search
    task_files        the files each task reads and writes, checked before it starts
    keys              the keys each task reads (checked before it starts) and the help texts
    common            helpers of every task: required keys, data set, codec, printing
    config            CliArgs (every key, its default and description) and parse_args
"""

from .main import main

__all__ = ["main"]
