"""Dropout whose keep-mask is a hash of (a per-site call counter, the element's index): the trainer's on CUDA.
Trade-off: cheaper than Philox and stateless, so resume is exact from the step count; masks differ from torch's."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from model.config import DROPOUT_RNGS

# murmur3's 32-bit finaliser constants as signed int32 (int32 products wrap)
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


def keep_mask(shape: torch.Size, p: float, seed: torch.Tensor) -> torch.Tensor:
    """True where an element survives; `seed` is a one-element int32 tensor. The index meets the seed first:
    Inductor folds arithmetic on a bare index into its index expressions, where a product like index x a
    32-bit constant overflows Triton's int32 literals (a compile error on CUDA). Two rounds of the
    finaliser, the seed in both, so masks of seeds that differ in a few bits are not permutations of each other."""
    n = math.prod(shape)
    if n >= 1 << 31:
        raise ValueError(f"hash dropout over {n} elements: at most 2**31 - 1 per call")
    idx = torch.arange(n, device=seed.device, dtype=torch.int32).view(shape)
    h = _fmix32(_fmix32(idx ^ seed) + seed)
    return (h & ((1 << _BITS) - 1)) >= round(p * (1 << _BITS))


def hash_dropout(x: torch.Tensor, p: float, training: bool = True, seed: torch.Tensor | None = None) -> torch.Tensor:
    """`seed`: a one-element int32 tensor; None draws one from torch's generator (eager use). Inside a compiled
    graph pass a tensor: Inductor fuses a one-element randint into the consumer and reruns its Philox per element."""
    if not training or p == 0.0:
        return x
    if seed is None:
        seed = torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int32)
    keep = keep_mask(x.shape, p, seed)
    return torch.where(keep, x * (1.0 / (1.0 - p)), torch.zeros((), dtype=x.dtype, device=x.device))


# sites' counters start this far apart: ~2**27 training calls before two sites could meet
_SITE_STRIDE = 1 << 27


def wrap32(v: int) -> int:
    v &= (1 << 32) - 1
    return v - (1 << 32) if v >= 1 << 31 else v


class Dropout(nn.Module):
    """nn.Dropout with the mask drawn by torch (`rng="torch"`) or by `hash_dropout`. With hash, the module keeps
    its seed as a one-element buffer that each training call uses and then replaces by seed + 1 (in the compiled
    graph too, as an input rather than a constant: no recompiles, one block graph for all blocks); the buffer
    is not persistent, so checkpoints hold the same keys either way, and `reseed` restores it from a step count."""

    def __init__(self, p: float, rng: str = "torch", site: int = 0):
        super().__init__()
        if rng not in DROPOUT_RNGS:
            raise ValueError(f"dropout_rng {rng}: expected {' or '.join(DROPOUT_RNGS)}")
        self.p, self.rng, self.site = p, rng, site
        if rng == "hash":
            self.register_buffer("seed", torch.zeros(1, dtype=torch.int32), persistent=False)
            self.reseed(0, 0)

    def reseed(self, base: int, calls: int) -> None:
        """The seed after `calls` training calls of a run whose seeds derive from `base`."""
        if self.rng == "hash":
            self.seed.fill_(wrap32(base + self.site * _SITE_STRIDE + calls))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rng != "hash":
            return nn.functional.dropout(x, self.p, self.training)
        if not self.training or self.p == 0.0:
            return x
        y = hash_dropout(x, self.p, True, self.seed)
        # a new tensor, not add_: a compiled backward may redraw the mask from the seed it was given, and an
        # in-place add reached that saved input before the backward ran (its gradient took the next call's mask)
        self.seed = self.seed + 1
        return y

    def extra_repr(self) -> str:
        return f"p={self.p}, rng={self.rng}"
