"""Arithmetic precision of the step networks during encoding.

``precision`` names how the encoder runs the step networks, the bulk of its work:

* ``"fp32"``: in the model's own dtype (float32), as torch is set up by the caller: the
  default, the codes of every earlier version.
* ``"bf16"``: the networks' weights and activations in bfloat16 (CPU: AMX / AVX512-BF16
  where the processor has them, still correct and slower elsewhere; CUDA: tensor cores).
* ``"fp16"``: float16 (CUDA only).
* ``"tf32"``: float32 weights, matrix products on TF32 tensor cores (CUDA only).

Distances, pre-selection, the beam's scores and reconstructions stay in float32 whatever the
precision, and the reduced precisions re-score their final beams in float32
(:func:`qinco2.codec.encode.beam_search`). ``fp16`` and ``tf32`` on the CPU are refused with
an :class:`~qinco2.errors.InputError` that names ``bf16`` instead: the CPU has no TF32 and
torch's float16 CPU matrix products are slower than float32 on most processors.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import InputError

PRECISIONS = ("fp32", "bf16", "fp16", "tf32")
_CUDA_ONLY = ("fp16", "tf32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision, device: torch.device | str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS` and runs on ``device``; else
    :class:`InputError` saying what to pass instead."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}; pass "
                         "precision='fp32' (exact, the default) or 'bf16' (faster where the hardware has "
                         "bfloat16 units: recent Xeons, GPUs)")
    if precision in _CUDA_ONLY and torch.device(device).type != "cuda":
        raise InputError(f"precision={precision!r} needs a CUDA device, the vectors are on "
                         f"{torch.device(device)}; on the CPU pass precision='bf16' (AMX / AVX512-BF16 "
                         "where present) or 'fp32'")
    return precision


def compute_dtype(precision: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the step networks run in: bfloat16 or float16, else the model's own."""
    return _DTYPES.get(precision, model_dtype)


@contextlib.contextmanager
def matmul_precision(precision: str):
    """TF32 matrix products on CUDA inside the block when ``precision == "tf32"``; the
    caller's setting is restored on the way out. Nothing changes for other precisions."""
    if precision != "tf32":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
