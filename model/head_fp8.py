"""Output layer + cross-entropy with all three matmuls in FP8 (CUDA only, `--head fp8all`): forward
e4m3 x e4m3, the logit gradient written as e5m2 in the two layouts the backward matmuls need.
Trade-off: the backward matmuls run at twice bf16's rate, but the extra gradient pass eats most of it
(+1.6 % per step, RESULTS.md) and e5m2's 2-bit mantissa makes gradients 10x noisier than `fp8`'s."""
from __future__ import annotations

import torch

from model.head import FP8_MAX, launch_ce, to_fp8

try:
    import triton
    import triton.language as tl

    from model.head import softmax_minus_onehot
except ImportError:  # pragma: no cover - CPU machines
    triton = None

# p - onehot lies in [-1, 1]; 2^15 puts it under e5m2's 57,344 and keeps probabilities down to
# 2^-31 representable (a 49k-way softmax has most of its mass in values near 2e-5)
GRAD_SCALE = 2.0 ** 15
LSE_BLOCK, LSE_WARPS = 8192, 32
TILE_M, TILE_N, TILE_WARPS = 32, 256, 4  # fastest transposed-only tile in head_bench


if triton is not None:
    @triton.jit
    def _grad8_kernel(logits_ptr, stride, targets_ptr, lse_ptr, out_ptr, outT_ptr, N, V, VP, qscale,
                      BM: tl.constexpr, BN: tl.constexpr, ROW_MAJOR: tl.constexpr, TRANSPOSED: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        r64 = rows.to(tl.int64)
        x = tl.load(logits_ptr + r64[:, None] * stride + cols[None, :]).to(tl.float32)
        lse = tl.load(lse_ptr + rows)
        tgt = tl.load(targets_ptr + rows)
        p = softmax_minus_onehot(x, cols[None, :], V, tgt[:, None], lse[:, None])
        q = (p * qscale).to(tl.float8e5)
        if ROW_MAJOR:
            tl.store(out_ptr + r64[:, None] * VP + cols[None, :], q)
        if TRANSPOSED:
            c64 = cols.to(tl.int64)
            tl.store(outT_ptr + c64[:, None] * N + rows[None, :], tl.trans(q))


def ce_rm8(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, scale: float):
    """lse, per-row scaled loss, and (p - onehot) * GRAD_SCALE as row-major e5m2, in one row pass."""
    n, vp = logits.shape
    lse = torch.empty(n, device=logits.device, dtype=torch.float32)
    loss = torch.empty_like(lse)
    out = torch.empty(n, vp, device=logits.device, dtype=torch.float8_e5m2)
    launch_ce(logits, targets, vocab_size, scale, loss, lse, out, GRAD_SCALE, LSE_BLOCK, LSE_WARPS)
    return lse, loss, out


def grad8(logits, targets, lse, vocab_size: int, row_major: bool, transposed: bool):
    """(p - onehot) * GRAD_SCALE as e5m2, row-major [N, VP] and/or transposed [VP, N]."""
    n, vp = logits.shape
    assert n % TILE_M == 0 and vp % TILE_N == 0 and logits.stride(1) == 1
    out = torch.empty(n, vp, device=logits.device, dtype=torch.float8_e5m2) if row_major else None
    outT = torch.empty(vp, n, device=logits.device, dtype=torch.float8_e5m2) if transposed else None
    _grad8_kernel[(n // TILE_M, vp // TILE_N)](
        logits, logits.stride(0), targets, lse, out if row_major else logits,
        outT if transposed else logits, n, vocab_size, vp, GRAD_SCALE,
        BM=TILE_M, BN=TILE_N, ROW_MAJOR=row_major, TRANSPOSED=transposed, num_warps=TILE_WARPS)
    return out, outT


class Fp8HeadLoss(torch.autograd.Function):
    """The gradient is written twice, row-major for grad-x and transposed for grad-W: FP8 matmuls
    take only K-major operands, and one kernel writing both layouts ran at a third of the speed."""

    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size: int):
        hb = h.reshape(-1, h.size(-1)).to(torch.bfloat16)
        t = targets.reshape(-1)
        n = t.numel()
        h8, sh = to_fp8(hb)
        w8, sw = to_fp8(weight)
        logits = torch._scaled_mm(h8, w8.t(), scale_a=sh, scale_b=sw, out_dtype=torch.bfloat16,
                                  use_fast_accum=True)
        lse, rows, dl8 = ce_rm8(logits, t, vocab_size, 1.0 / n)
        _, dlT8 = grad8(logits, t, lse, vocab_size, row_major=False, transposed=True)
        del logits
        gscale = torch.full((), 1.0 / (GRAD_SCALE * n), device=h.device, dtype=torch.float32)
        ctx.save_for_backward(h8.t().contiguous(), sh, w8.t().contiguous(), sw, dl8, dlT8, gscale)
        ctx.h_shape, ctx.h_dtype, ctx.w_dtype = h.shape, h.dtype, weight.dtype
        return rows.sum()

    @staticmethod
    def backward(ctx, g):
        hT8, sh, wT8, sw, dl8, dlT8, gscale = ctx.saved_tensors
        gx = torch._scaled_mm(dl8, wT8.t(), scale_a=gscale, scale_b=sw, out_dtype=torch.bfloat16)
        gw = torch._scaled_mm(dlT8, hT8.t(), scale_a=gscale, scale_b=sh, out_dtype=torch.float32)
        gx = gx.mul_(g.to(gx.dtype)).view(ctx.h_shape).to(ctx.h_dtype)
        return gx, gw.mul_(g).to(ctx.w_dtype), None, None


def make_fp8_head_loss():
    @torch.compiler.disable
    def head_loss(h, weight, targets, vocab_size):
        if not h.is_cuda:
            raise ValueError("--head fp8all needs CUDA (FP8 matmuls); use fused or plain on CPU")
        return Fp8HeadLoss.apply(h, weight, targets, vocab_size)

    return head_loss


__all__ = ["Fp8HeadLoss", "make_fp8_head_loss", "ce_rm8", "grad8", "FP8_MAX"]
