"""Output layer + cross-entropy with the loss gradient computed during the forward pass.
The 49k-way logits are written once and turned into their own gradient by one Triton kernel
(~2-3 passes over memory instead of ~4); `fp8` also runs all three matmuls in FP8. Costs: the
gradient's memory is held until backward (as the plain step's logits are), and FP8 rounds."""
from __future__ import annotations

import torch

try:  # triton exists only where CUDA does; the CPU path uses the torch reference below
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

FP8_MAX = 448.0  # largest finite float8_e4m3fn
CE_BLOCK, CE_WARPS = 8192, 16  # columns per loop iteration and warps per row (tuned in train_bench)
FP8_BM, FP8_BN, FP8_WARPS = 64, 256, 8
GRAD_Q = 32768.0  # |dCE/dlogit| <= 1 before the 1/N: scaled by 2^15 it fills float8_e5m2 (max 57,344)


if triton is not None:
    @triton.jit
    def _ce_grad_kernel(logits_ptr, stride, targets_ptr, loss_ptr, V, VP, scale,
                        BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        offs = tl.arange(0, BLOCK)
        # finite sentinel: exp(m - m_new) of two -inf lanes would be NaN
        m = tl.full([BLOCK], -1e30, tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        for start in tl.range(0, V, BLOCK):
            cols = start + offs
            ok = cols < V
            x = tl.load(base + cols, mask=ok, other=-1e30).to(tl.float32)
            m_new = tl.maximum(m, x)
            s = s * tl.exp(m - m_new) + tl.where(ok, tl.exp(x - m_new), 0.0)
            m = m_new
        mx = tl.max(m, 0)
        lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), 0))
        tgt = tl.load(targets_ptr + row).to(tl.int64)
        x_t = tl.load(base + tgt).to(tl.float32)
        tl.store(loss_ptr + row, (lse - x_t) * scale)
        # second read of the row: it was read microseconds ago, so mostly served from L2
        for start in tl.range(0, VP, BLOCK):
            cols = start + offs
            x = tl.load(base + cols, mask=cols < VP, other=0.0).to(tl.float32)
            p = tl.where(cols < V, tl.exp(x - lse), 0.0)
            p = tl.where(cols == tgt, p - 1.0, p)
            tl.store(base + cols, (p * scale).to(logits_ptr.dtype.element_ty), mask=cols < VP)

    @triton.jit
    def _ce_grad_fp8_kernel(logits_ptr, stride, targets_ptr, loss_ptr, g_ptr, gt_ptr, N, V, VP, scale, q,
                            BM: tl.constexpr, BN: tl.constexpr):
        """BM rows at a time: the loss, and q * dCE/dlogits in float8_e5m2 both as (N, VP) and as
        its transpose (VP, N), the layouts the two backward FP8 matmuls need."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        rmask = rows < N
        r64 = rows.to(tl.int64)
        offs = tl.arange(0, BN)
        m = tl.full([BM], -1e30, tl.float32)
        s = tl.zeros([BM], tl.float32)
        for start in tl.range(0, V, BN):
            cols = start + offs
            ok = rmask[:, None] & (cols < V)[None, :]
            x = tl.load(logits_ptr + r64[:, None] * stride + cols[None, :], mask=ok, other=-1e30).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.where(ok, tl.exp(x - m_new[:, None]), 0.0), 1)
            m = m_new
        lse = m + tl.log(s)
        tgt = tl.load(targets_ptr + rows, mask=rmask, other=0).to(tl.int64)
        x_t = tl.load(logits_ptr + r64 * stride + tgt, mask=rmask, other=0.0).to(tl.float32)
        tl.store(loss_ptr + rows, (lse - x_t) * scale, mask=rmask)
        for start in tl.range(0, VP, BN):
            cols = start + offs
            ok = rmask[:, None] & (cols < VP)[None, :]
            x = tl.load(logits_ptr + r64[:, None] * stride + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            p = tl.where((cols < V)[None, :], tl.exp(x - lse[:, None]), 0.0)
            p = tl.where(cols[None, :] == tgt[:, None], p - 1.0, p)
            g8 = (p * q).to(tl.float8e5)
            tl.store(g_ptr + r64[:, None] * VP + cols[None, :], g8, mask=ok)
            tl.store(gt_ptr + cols[:, None].to(tl.int64) * N + r64[None, :], tl.trans(g8), mask=tl.trans(ok))


def ce_grad_inplace(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, scale: float) -> torch.Tensor:
    """Per-row `scale * CE` over the first `vocab_size` columns; `logits` becomes scale * dCE/dlogits."""
    n, vp = logits.shape
    loss = torch.empty(n, device=logits.device, dtype=torch.float32)
    if logits.is_cuda and triton is not None:
        assert logits.stride(1) == 1
        _ce_grad_kernel[(n,)](logits, logits.stride(0), targets, loss, vocab_size, vp, scale,
                              BLOCK=CE_BLOCK, num_warps=CE_WARPS)
        return loss
    x = logits[:, :vocab_size].float()
    lse = torch.logsumexp(x, dim=-1)
    loss.copy_((lse - x.gather(1, targets.view(-1, 1)).squeeze(1)) * scale)
    p = torch.exp(x - lse[:, None])
    p[torch.arange(n, device=p.device), targets] -= 1.0
    logits[:, :vocab_size] = (p * scale).to(logits.dtype)
    logits[:, vocab_size:] = 0
    return loss


def to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn copy and its per-tensor dequantisation scale (amax maps to 448)."""
    sx = (x.abs().amax().float() / FP8_MAX).clamp_min(1e-12)
    return (x / sx).to(torch.float8_e4m3fn), sx


def fp8_linear(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """h @ w.T with both operands in float8_e4m3fn, per-tensor scales from their amax."""
    h8, sh = to_fp8(h)
    w8, sw = to_fp8(w)
    return torch._scaled_mm(h8, w8.t(), scale_a=sh, scale_b=sw, out_dtype=torch.bfloat16, use_fast_accum=True)


def ce_grad_fp8(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, scale: float):
    """Per-row `scale * CE`, and GRAD_Q * dCE/dlogits in float8_e5m2 as (N, VP) and (VP, N)."""
    n, vp = logits.shape
    loss = torch.empty(n, device=logits.device, dtype=torch.float32)
    g = torch.empty(n, vp, device=logits.device, dtype=torch.float8_e5m2)
    gt = torch.empty(vp, n, device=logits.device, dtype=torch.float8_e5m2)
    _ce_grad_fp8_kernel[(triton.cdiv(n, FP8_BM),)](logits, logits.stride(0), targets, loss, g, gt, n, vocab_size,
                                                   vp, scale, GRAD_Q, BM=FP8_BM, BN=FP8_BN, num_warps=FP8_WARPS)
    return loss, g, gt


class FP8HeadLoss(torch.autograd.Function):
    """All three output-layer matmuls in FP8: e4m3 activations and weights, e5m2 logit gradients."""

    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size: int):
        h2 = h.reshape(-1, h.size(-1))
        t = targets.reshape(-1)
        h8, sh = to_fp8(h2)
        w8, sw = to_fp8(weight)
        logits = torch._scaled_mm(h8, w8.t(), scale_a=sh, scale_b=sw, out_dtype=torch.bfloat16, use_fast_accum=True)
        rows, g8, g8t = ce_grad_fp8(logits, t, vocab_size, 1.0 / t.numel())
        del logits
        ctx.save_for_backward(h8, sh, w8, sw, g8, g8t)
        ctx.h_shape, ctx.h_dtype, ctx.n = h.shape, h.dtype, t.numel()
        return rows.sum()

    @staticmethod
    def backward(ctx, g):
        h8, sh, w8, sw, g8, g8t = ctx.saved_tensors
        sg = (g.float() / (ctx.n * GRAD_Q)).reshape(())  # undoes GRAD_Q, applies the mean and grad_output
        # _scaled_mm wants its second operand column-major: small transposed copies of w8 and h8
        gx = torch._scaled_mm(g8, w8.t().contiguous().t(), scale_a=sg, scale_b=sw, out_dtype=torch.bfloat16)
        gw = torch._scaled_mm(g8t, h8.t().contiguous().t(), scale_a=sg, scale_b=sh, out_dtype=torch.float32)
        return gx.view(ctx.h_shape).to(ctx.h_dtype), gw, None, None


class FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size: int, fp8: bool):
        dtype = torch.bfloat16 if h.is_cuda else h.dtype
        hb = h.reshape(-1, h.size(-1)).to(dtype)
        t = targets.reshape(-1)
        if fp8:
            logits = fp8_linear(hb, weight.to(torch.bfloat16))
        else:
            logits = hb @ weight.to(dtype).t()
        rows = ce_grad_inplace(logits, t, vocab_size, 1.0 / t.numel())
        ctx.save_for_backward(hb, weight, logits)
        ctx.h_shape, ctx.h_dtype = h.shape, h.dtype
        return rows.sum()

    @staticmethod
    def backward(ctx, g):
        hb, weight, dlogits = ctx.saved_tensors
        wb = weight.to(hb.dtype)
        gx = (dlogits @ wb).mul_(g.to(hb.dtype))
        gw = (dlogits.t() @ hb).to(weight.dtype).mul_(g)
        return gx.view(ctx.h_shape).to(ctx.h_dtype), gw, None, None, None


def make_head_loss(kind: str):
    """`None` for the plain (autograd + compile) loss, else a loss function the model calls."""
    if kind == "plain":
        return None
    if kind == "fp8":
        @torch.compiler.disable
        def fp8_loss(h, weight, targets, vocab_size):
            return FP8HeadLoss.apply(h, weight, targets, vocab_size)
        return fp8_loss
    fp8 = kind == "fp8fwd"

    @torch.compiler.disable
    def head_loss(h, weight, targets, vocab_size):
        return FusedHeadLoss.apply(h, weight, targets, vocab_size, fp8)

    return head_loss
