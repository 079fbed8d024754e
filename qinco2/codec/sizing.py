"""Model size against the size of the training set.

A QINCo2 step network has to be pinned down by data. We count the training *values*
(rows x dimension: each row's reconstruction error constrains ``D`` outputs) against the
*network* parameters (projections, fusion layer and residual blocks of all conditioned steps;
the codebooks are left out, they are initialised by k-means and each codeword is fitted on
its own share of the rows). Below :data:`VALUES_PER_PARAMETER` values per network parameter
the training set is *small* for the model: on such data a run reaches its best validation MSE
early and then overfits, and the network's gain over the RQ initialisation is small.

:func:`fit_to_data` then shrinks the network along :data:`SHRINK_ORDER` (hidden width, depth,
embedding width, each no lower than its floor) until the rule holds or nothing is left to
shrink, and shortens the patience of the early stop. Training on a small set also mixes
each training row with one of its nearest training rows (``neighbour_mix``,
:mod:`.augment`), :data:`SMALL_DATA_MIX` of the way at most; a network trained so needs fewer
rows, and is shrunk only until :data:`MIXED_VALUES_PER_PARAMETER` values per parameter.
Measured on wordnet-minilm (D=384) at 8 bytes with mixing, database MSE of the network this
rule picks against the one shrunk to 20 values per parameter: 9k rows 0.448 against 0.450,
20k rows 0.376 against 0.383, 75k rows (the full ``qinco2-S``, 14 values per parameter, 30
minutes on 2 cores) 0.316 against 0.323; at 16 bytes with 75k rows (6.5 values per
parameter) 0.2175 against 0.2195. The full network at 9k rows (1.7 values per parameter)
lost (validation MSE 0.462 against 0.456). Without mixing the shrunk network at 9k rows
reached 0.492. Fields the caller set explicitly are never changed.
"""

from __future__ import annotations

import dataclasses

from .model import ModelConfig, expected_parameter_count

VALUES_PER_PARAMETER = 20
SHRINK_ORDER = (("dh", 64), ("L", 1), ("de", 32))   # field, floor: halve dh, then L, then de
SMALL_DATA_PATIENCE = 5
SMALL_DATA_MIX = 0.5    # neighbour_mix on a small training set (measured: see the module docstring)
MIXED_VALUES_PER_PARAMETER = 5   # the shrinking goal when the rows are mixed with their neighbours


def codebook_parameter_count(cfg: ModelConfig) -> int:
    """Trainable codebook and pre-selector values (``K x D`` each, per trained step)."""
    trained_steps = cfg.M
    per_step = cfg.K * cfg.D
    conditioned = cfg.M if cfg.ivf_K else cfg.M - 1
    return trained_steps * per_step + conditioned * (cfg.A > 0) * per_step


def network_parameter_count(cfg: ModelConfig) -> int:
    """Trainable values of the step networks (everything but codebooks and pre-selectors)."""
    return expected_parameter_count(cfg) - codebook_parameter_count(cfg)


def values_per_parameter(cfg: ModelConfig, n_train: int) -> float:
    n_params = network_parameter_count(cfg)
    return float("inf") if n_params == 0 else n_train * cfg.D / n_params


def _smaller(cfg: ModelConfig, field: str, floor: int) -> ModelConfig | None:
    value = cfg.E if field == "de" else getattr(cfg, field)
    if value <= floor:
        return None
    new = max(floor, value // 2) if field != "L" else max(floor, value - 1)
    return dataclasses.replace(cfg, **{field: new})


def fit_to_data(cfg: ModelConfig, n_train: int, fixed: set[str] = frozenset(),
                least: float = VALUES_PER_PARAMETER) -> tuple[ModelConfig, str | None]:
    """``cfg`` shrunk until ``n_train`` rows give ``least`` values per network parameter
    (fields in ``fixed`` untouched; :data:`MIXED_VALUES_PER_PARAMETER` when the training rows
    are mixed with their neighbours), and a note for the user when the training set is small
    for the model as given, i.e. below :data:`VALUES_PER_PARAMETER` (None otherwise)."""
    ratio = values_per_parameter(cfg, n_train)
    if ratio >= VALUES_PER_PARAMETER:
        return cfg, None
    new = cfg
    while values_per_parameter(new, n_train) < least:
        for field, floor in SHRINK_ORDER:
            smaller = None if field in fixed else _smaller(new, field, floor)
            if smaller is not None:
                new = smaller
                break
        else:
            break
    shape = lambda c: f"L={c.L} de={c.E} dh={c.dh}"  # noqa: E731
    note = (f"the training set is small for this model: {n_train:,} rows x D={cfg.D} = {n_train * cfg.D:,} values "
            f"for {network_parameter_count(cfg):,} network parameters ({ratio:.1f} values per parameter, "
            f"fewer than {VALUES_PER_PARAMETER}); ")
    if new is cfg and ratio >= least:
        return cfg, note + (f"keeping {shape(cfg)}: trained on rows mixed with their neighbours it needs "
                            f"{least:g} values per parameter")
    if new is cfg:
        return cfg, note + "set L, de and dh lower, or train on more rows"
    return new, (note + f"training {shape(new)} instead of {shape(cfg)} "
                 f"({values_per_parameter(new, n_train):.1f} values per parameter) and stopping after "
                 f"{SMALL_DATA_PATIENCE} epochs without improvement; set L, de, dh (or small_data=keep) to choose yourself")
