"""Bit packing of integer codes: ``S`` codes of ``bits`` bits each into ``ceil(S * bits / 8)``
bytes per row, little-endian (code ``s`` starts at bit ``s * bits``; 8-bit codes are plain
bytes, the layout of faiss' standalone codes and of the IVF-PQ inverted lists).

The one implementation is in torch (the same on CPU and CUDA); numpy arrays in give numpy
arrays out.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import InputError


def packed_bytes(n_codes: int, bits: int) -> int:
    """Bytes per row of ``n_codes`` packed codes of ``bits`` bits."""
    return (n_codes * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 16:
        raise InputError(f"codes must have between 1 and 16 bits, got bits={bits}")


def _bit_layout(n_codes: int, bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    pos_S = torch.arange(n_codes, device=device) * bits
    return pos_S // 8, pos_S % 8


def pack_codes(codes_NS, bits: int):
    """``(N, S)`` integer codes in ``[0, 2^bits)`` -> ``(N, ceil(S * bits / 8))`` uint8 (a torch
    tensor for a tensor, a numpy array for an array). Out-of-range codes raise InputError."""
    _check_bits(bits)
    as_numpy = isinstance(codes_NS, np.ndarray)
    c_NS = torch.from_numpy(np.ascontiguousarray(codes_NS)) if as_numpy else codes_NS
    if c_NS.ndim != 2 or c_NS.is_floating_point() or c_NS.is_complex():
        raise InputError(f"codes must be a 2-D integer array (N, S), got {tuple(c_NS.shape)} {c_NS.dtype}")
    if c_NS.numel() and (int(c_NS.min()) < 0 or int(c_NS.max()) >= 1 << bits):
        raise InputError(f"codes must lie in [0, 2^{bits}) to be packed in {bits} bits, got "
                         f"[{int(c_NS.min())}, {int(c_NS.max())}]")
    N, S = c_NS.shape
    if bits == 8:
        out = c_NS.to(torch.uint8)
    else:
        byte_S, shift_S = _bit_layout(S, bits, c_NS.device)
        words_NS = c_NS.long() << shift_S                           # spans at most three bytes
        out_NB = torch.zeros(N, packed_bytes(S, bits) + 2, dtype=torch.int64, device=c_NS.device)
        for k in range(3):                                          # bit fields never overlap: add == or
            out_NB.scatter_add_(1, (byte_S + k).expand(N, -1), (words_NS >> (8 * k)) & 0xFF)
        out = out_NB[:, :packed_bytes(S, bits)].to(torch.uint8)
    return out.numpy() if as_numpy else out


def unpack_codes(packed_NB, n_codes: int, bits: int):
    """Inverse of :func:`pack_codes`: ``(N, n_codes)`` int64 codes (torch or numpy, as given)."""
    _check_bits(bits)
    as_numpy = isinstance(packed_NB, np.ndarray)
    p_NB = torch.from_numpy(np.ascontiguousarray(packed_NB)) if as_numpy else packed_NB
    if p_NB.shape[-1] != packed_bytes(n_codes, bits):
        raise InputError(f"packed codes have {p_NB.shape[-1]} bytes per row, but {n_codes} codes of "
                         f"{bits} bits take {packed_bytes(n_codes, bits)}")
    if bits == 8:
        out = p_NB.long()
    else:
        byte_S, shift_S = _bit_layout(n_codes, bits, p_NB.device)
        padded = torch.nn.functional.pad(p_NB, (0, 2)).long()
        words_NS = padded[:, byte_S] | (padded[:, byte_S + 1] << 8) | (padded[:, byte_S + 2] << 16)
        out = (words_NS >> shift_S) & ((1 << bits) - 1)
    return out.numpy() if as_numpy else out
