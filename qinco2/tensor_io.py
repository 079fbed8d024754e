"""Torch tensors wherever the public API takes numpy arrays, answered in kind.

    >>> import torch
    >>> @accepts_tensors
    ... def double(x):
    ...     return 2 * x
    >>> double(torch.ones(2, 3)).dtype
    torch.float32

:func:`accepts_tensors` wraps a numpy-in, numpy-out function: each torch tensor argument
(CPU or CUDA, any layout) is read as a numpy array (CUDA tensors are copied to the host;
bfloat16, which numpy lacks, as float32); when any argument was a tensor, each numpy array
in the result (alone or in a tuple) comes back as a tensor on the device of the first tensor
argument. Without tensor arguments nothing changes.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = ["accepts_tensors", "to_numpy"]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """``t`` as a numpy array (a view for a CPU tensor of a numpy dtype, else a host copy)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.cpu().numpy() if t.is_contiguous() else t.contiguous().cpu().numpy()


def _back(value, device: torch.device):
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value).to(device)
    if isinstance(value, tuple):
        return tuple(_back(v, device) for v in value)
    return value


def accepts_tensors(fn):
    """Decorate ``fn`` as described in the module docstring."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if not tensors:
            return fn(*args, **kwargs)
        args = tuple(to_numpy(a) if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: to_numpy(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return _back(fn(*args, **kwargs), tensors[0].device)
    return wrapper
