"""Output layer + cross-entropy whose gradient one Triton kernel writes in place over the logits (`--head fused`).
Trade-off: fewer passes over the 49k-way rows than autograd's, but that gradient is held until backward."""
from __future__ import annotations

import math

import torch

from model.config import AUTO_GRAD_FLOOR

try:  # triton exists only where CUDA does; the CPU path uses the torch reference below
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

LOG2E = 1.4426950408889634
# columns per loop iteration and warps per row (the fastest `head_bench.py --ce-only` found): 32 warps keep fewer
# rows in flight, so the second read of a row is more often served from L2; 8192 / (32 warps x 32 lanes) = 8 values
# per thread, one 16-byte load of bf16 that shares one running max
CE_BLOCK, CE_WARPS = 8192, 32


if triton is not None:
    _LOG2E = tl.constexpr(LOG2E)  # Triton reads only constexpr globals

    @triton.jit
    def _online(x, m, s):
        """One [rows, R] slice into per-row running (max, sum of exp2) in log2 units."""
        m_new = tl.maximum(m, tl.max(x, 1))
        s = s * tl.exp2(m - m_new) + tl.sum(tl.exp2(x - m_new[:, None]), 1)
        return m_new, s

    @triton.jit
    def row_lse2(base, V, VP, V_FULL, BLOCK: tl.constexpr, R: tl.constexpr):
        """log2-sum-exp2 of one row's first V values times log2(e), i.e. lse / ln 2.
        The row is viewed as [BLOCK // R, R]: each thread's R contiguous values share one running max, so
        the rescale costs one exp2 per R values, and blocks below V_FULL need no mask (vector loads)."""
        offs = tl.arange(0, BLOCK // R)[:, None] * R + tl.arange(0, R)[None, :]
        # finite sentinel: exp2(m - m_new) of two -inf lanes would be NaN
        m = tl.full([BLOCK // R], -1e30, tl.float32)
        s = tl.zeros([BLOCK // R], tl.float32)
        for start in tl.range(0, V_FULL, BLOCK):
            x = tl.load(base + start + offs).to(tl.float32) * _LOG2E
            m, s = _online(x, m, s)
        for start in tl.range(V_FULL, VP, BLOCK):
            cols = start + offs
            x = tl.load(base + cols, mask=cols < VP, other=0.0).to(tl.float32) * _LOG2E
            m, s = _online(tl.where(cols < V, x, -1e30), m, s)
        mx = tl.max(m, 0)
        return mx + tl.log2(tl.sum(s * tl.exp2(m - mx), 0))

    @triton.jit
    def _grad_value(e, floor2, FLOOR: tl.constexpr):
        """2^e (the scaled probability); with FLOOR, exactly 0 where e < floor2."""
        g = tl.exp2(e)
        if FLOOR:
            g = tl.where(e < floor2, 0.0, g)
        return g

    @triton.jit
    def _ce_grad_kernel(logits_ptr, stride, targets_ptr, loss_ptr, V, VP, V_FULL, scale, log2_out, floor2,
                        BLOCK: tl.constexpr, R: tl.constexpr, FLOOR: tl.constexpr):
        # overwrites the row in place with p * 2^log2_out for every column, then the target's p - 1 over it: the
        # one-hot costs one store per row instead of a compare and select per value.
        # FLOOR: probabilities under 2^floor are written as 0 (the target's p - 1 never is)
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        lse2 = row_lse2(base, V, VP, V_FULL, BLOCK, R)
        lse = lse2 / _LOG2E
        tgt = tl.load(targets_ptr + row).to(tl.int64)
        x_t = tl.load(base + tgt).to(tl.float32)
        tl.store(loss_ptr + row, (lse - x_t) * scale)
        shift = lse2 - log2_out  # p * 2^log2_out = exp2(x log2 e - shift): one FMA and one exp2 per value
        # second read of the row: it was read just before, so mostly served from L2
        offs = tl.arange(0, BLOCK)
        for start in tl.range(0, V_FULL, BLOCK):
            x = tl.load(base + start + offs).to(tl.float32)
            tl.store(base + start + offs, _grad_value(x * _LOG2E - shift, floor2, FLOOR).to(base.dtype.element_ty))
        for start in tl.range(V_FULL, VP, BLOCK):
            cols = start + offs
            x = tl.load(base + cols, mask=cols < VP, other=0.0).to(tl.float32)
            g = tl.where(cols < V, _grad_value(x * _LOG2E - shift, floor2, FLOOR), 0.0)
            tl.store(base + cols, g.to(base.dtype.element_ty), mask=cols < VP)
        # every thread's stores of this row are ordered before the barrier, so the fix-up lands last
        tl.debug_barrier()
        g_t = (tl.exp2(x_t * _LOG2E - lse2) - 1.0) * tl.exp2(log2_out)
        tl.store(base + tgt, g_t.to(base.dtype.element_ty))


def launch_ce(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, scale: float, loss: torch.Tensor,
              block: int, warps: int, floor_log2: float | None = None) -> None:
    """One program per row of `logits` (CUDA): `loss` gets each row's `scale * CE`, `logits` becomes
    `scale * dCE/dlogits` in place; `floor_log2`: probabilities under 2**floor_log2 written as 0."""
    n, vp = logits.shape
    assert logits.stride(1) == 1 and vp % 16 == 0 and block % (32 * warps) == 0
    r = block // (32 * warps)
    v_full = vocab_size // block * block
    log2_out = math.log2(scale)
    floor2 = (floor_log2 if floor_log2 is not None else 0.0) + log2_out  # in the kernel's scaled exponent
    _ce_grad_kernel[(n,)](logits, logits.stride(0), targets, loss, vocab_size, vp, v_full, scale, log2_out, floor2,
                          BLOCK=block, R=r, FLOOR=floor_log2 is not None, num_warps=warps)


def ce_grad_inplace(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, scale: float,
                    floor_log2: float | None = None) -> torch.Tensor:
    """Per-row `scale * CE` over the first `vocab_size` columns; `logits` becomes scale * dCE/dlogits, with
    probabilities under 2**floor_log2 (if given) as exact zeros."""
    n, vp = logits.shape
    loss = torch.empty(n, device=logits.device, dtype=torch.float32)
    if logits.is_cuda and triton is not None:
        launch_ce(logits, targets, vocab_size, scale, loss, CE_BLOCK, CE_WARPS, floor_log2)
        return loss
    x = logits[:, :vocab_size].float()
    lse = torch.logsumexp(x, dim=-1)
    loss.copy_((lse - x.gather(1, targets.view(-1, 1)).squeeze(1)) * scale)
    p = torch.exp(x - lse[:, None])
    rows = torch.arange(n, device=p.device)
    if floor_log2 is not None:
        below = p < 2.0 ** floor_log2
        below[rows, targets] = False  # as the kernel: the target's p - 1 is written whatever p is
        p = p.masked_fill(below, 0.0)
    p[rows, targets] -= 1.0
    logits[:, :vocab_size] = (p * scale).to(logits.dtype)
    logits[:, vocab_size:] = 0
    return loss


@torch.no_grad()
def token_ce(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Each target's cross-entropy in nats (float32, flat), through the logits and CE kernel the fused head uses:
    evaluation needs the per-target values (to leave some targets out) without a float32 copy of the logits."""
    dtype = torch.bfloat16 if h.is_cuda else h.dtype
    logits = h.reshape(-1, h.size(-1)).to(dtype) @ weight.to(dtype).t()
    return ce_grad_inplace(logits, targets.reshape(-1), vocab_size, 1.0)


def matmul_f32(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b as `dtype`; bf16 operands on CUDA are written out straight from cuBLAS's fp32 accumulator
    (`mm` with out_dtype), which skips rounding to bf16 and a cast pass over the whole result."""
    if a.is_cuda and a.dtype != dtype:
        return torch.mm(a, b, out_dtype=dtype)
    return (a @ b).to(dtype)


class FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size: int, floor_log2: float | None = None):
        dtype = torch.bfloat16 if h.is_cuda else h.dtype
        hb = h.reshape(-1, h.size(-1)).to(dtype)
        t = targets.reshape(-1)
        logits = hb @ weight.to(dtype).t()
        rows = ce_grad_inplace(logits, t, vocab_size, 1.0 / t.numel(), floor_log2)
        ctx.save_for_backward(hb, weight, logits)
        ctx.h_shape, ctx.h_dtype = h.shape, h.dtype
        return rows.sum()

    @staticmethod
    def backward(ctx, g):
        hb, weight, dlogits = ctx.saved_tensors
        # g is folded into the small operands, never into the products: W's bf16 copy is made anyway
        # (torch.mul with a bf16 out= is that one pass) and h is smaller than grad-W in fp32
        wg = torch.mul(weight, g, out=torch.empty(weight.shape, dtype=hb.dtype, device=hb.device))
        gx = dlogits @ wg
        gw = matmul_f32(dlogits.t(), hb * g.to(hb.dtype), weight.dtype)
        return gx.view(ctx.h_shape).to(ctx.h_dtype), gw, None, None, None


HEADS = ("plain", "fused", "gemm")  # `--head auto` picks one (resolve_head)
# the heads that write the gradient in a kernel of their own: fused floors p itself, gemm the bound
# exp(z - z_target) >= p (it never sees the row's lse), so it zeroes a subset of what fused would
FLOOR_HEADS = ("fused", "gemm")


def check_grad_floor(kind: str, grad_floor: float | None) -> None:
    if grad_floor is not None and kind not in FLOOR_HEADS:
        raise ValueError(f"--grad-floor {grad_floor:g} needs --head fused or gemm (the head here is {kind})")


def resolve_grad_floor(grad_floor: float | str | None, kind: str, device: torch.device) -> float | None:
    """The floor a run uses: `auto` is AUTO_GRAD_FLOOR where head `kind` writes its gradient in a kernel on CUDA,
    none elsewhere (on CPU the heads' torch paths keep the exact gradient); a number needs such a head."""
    if grad_floor == "auto":
        return AUTO_GRAD_FLOOR if device.type == "cuda" and kind in FLOOR_HEADS else None
    floor = None if grad_floor in (None, "off") else float(grad_floor)
    check_grad_floor(kind, floor)
    return floor


def resolve_head(kind: str, device: torch.device) -> str:
    """What `--head auto` means on `device`: plain on CPU (the reference); on CUDA gemm where its TMA GEMM runs
    (Hopper and later, where it beat fused at equal val loss), else fused."""
    if kind != "auto":
        return kind
    if device.type != "cuda":
        return "plain"
    from model.head_gemm import has_tma
    return "gemm" if has_tma(device) else "fused"


def make_head_loss(kind: str, grad_floor: float | None = None):
    """`None` for the plain (autograd + compile) loss, else a loss function the model calls. `grad_floor`
    (FLOOR_HEADS only): probabilities under 2**grad_floor enter the backward matmuls as exact zeros."""
    check_grad_floor(kind, grad_floor)
    if kind == "plain":
        return None
    if kind == "gemm":
        from model.head_gemm import make_gemm_head_loss
        return make_gemm_head_loss(grad_floor)

    @torch.compiler.disable
    def head_loss(h, weight, targets, vocab_size):
        return FusedHeadLoss.apply(h, weight, targets, vocab_size, grad_floor)

    return head_loss
