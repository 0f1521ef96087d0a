"""Dropout whose keep-mask is a hash of (one random seed per call, the element's index), as an option.
Cheaper to draw than torch's Philox per element, and a pure function of the index, so a compiled backward
may redraw it instead of storing it; the masks differ from torch's, so a run is not bit-identical across the two."""
from __future__ import annotations

import torch
import torch.nn as nn

RNGS = ("torch", "hash")

# murmur3's 32-bit finaliser constants and the golden-ratio step, as signed int32 (int32 products wrap)
_GOLDEN = 0x9E3779B1 - (1 << 32)
_M1 = 0x85EBCA6B - (1 << 32)
_M2 = 0xC2B2AE35 - (1 << 32)
_BITS = 24  # the keep test compares 24 hash bits: p is honoured to 2**-24


def _shr(h: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int32 (torch's >> is arithmetic)."""
    return (h >> n) & ((1 << (32 - n)) - 1)


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ _shr(h, 16)
    h = h * _M1
    h = h ^ _shr(h, 13)
    h = h * _M2
    return h ^ _shr(h, 16)


def _fmix32_wide(h: torch.Tensor) -> torch.Tensor:
    """_fmix32 on int64 holding 32-bit values (products masked back to 32 bits)."""
    h = h ^ (h >> 16)
    h = (h * (_M1 & _MASK)) & _MASK
    h = h ^ (h >> 13)
    h = (h * (_M2 & _MASK)) & _MASK
    return h ^ (h >> 16)


_MASK = (1 << 32) - 1
WIDE = False  # int64 arithmetic instead of wrapping int32 (benchmarks/dropout_probe.py compiles both)


def keep_mask(shape: torch.Size, p: float, seed: torch.Tensor) -> torch.Tensor:
    """True where an element survives; `seed` is a one-element int32 tensor. Two rounds of the finaliser:
    one alone leaves the masks of seeds that differ by a multiple of the golden step shifted copies."""
    n = 1
    for s in shape:
        n *= s
    if n >= 1 << 31:
        raise ValueError(f"hash dropout over {n} elements: at most 2**31 - 1 per call")
    if WIDE:
        idx = torch.arange(n, device=seed.device, dtype=torch.int64).view(shape)
        s64 = seed.to(torch.int64) & _MASK
        h = _fmix32_wide((_fmix32_wide(((idx * (_GOLDEN & _MASK)) & _MASK) ^ s64) + s64) & _MASK)
        return (h & ((1 << _BITS) - 1)) >= round(p * (1 << _BITS))
    idx = torch.arange(n, device=seed.device, dtype=torch.int32).view(shape)
    h = _fmix32(_fmix32(idx * _GOLDEN ^ seed) + seed)
    return (h & ((1 << _BITS) - 1)) >= round(p * (1 << _BITS))


def hash_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    # one draw from torch's generator per call: seeded, saved in checkpoints and resumed as before
    seed = torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int32)
    keep = keep_mask(x.shape, p, seed)
    return torch.where(keep, x * (1.0 / (1.0 - p)), torch.zeros((), dtype=x.dtype, device=x.device))


class Dropout(nn.Module):
    """nn.Dropout with the mask drawn by torch (`rng="torch"`) or by `hash_dropout`; no parameters, so
    checkpoints load either way."""

    def __init__(self, p: float, rng: str = "torch"):
        super().__init__()
        if rng not in RNGS:
            raise ValueError(f"--dropout-rng {rng}: expected {' or '.join(RNGS)}")
        self.p, self.rng = p, rng

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rng == "hash":
            return hash_dropout(x, self.p, self.training)
        return nn.functional.dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}, rng={self.rng}"
