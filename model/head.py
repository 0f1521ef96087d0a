"""Output layer + cross-entropy with the loss gradient computed during the forward pass.
The 49k-way logits are written once and turned into their own gradient by one Triton kernel
(~2-3 passes over memory instead of ~4); `fp8` also runs the forward matmul in FP8 (e4m3). A floor
(`grad_floor`, -24 by default on CUDA; `head_gemm` gets its own from exp2's flush) writes probabilities under 2^floor as exact
zeros: the backward matmuls draw less power.
Costs: the gradient's memory is held until backward (as the plain step's logits are), and FP8
rounds the forward logits (loss within 3e-4 of float64, gradients within 3e-3: train_bench)."""
from __future__ import annotations

import math

import torch

from model.config import AUTO_GRAD_FLOOR

try:  # triton exists only where CUDA does; the CPU path uses the torch reference below
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

FP8_MAX = 448.0  # largest finite float8_e4m3fn
LOG2E = 1.4426950408889634
# columns per loop iteration and warps per row: the fastest of those `head_bench.py --ce-only` tried on the
# H200 (3.6 ms for 65,536 x 49,152 against 4.2-4.7 ms for the others): 32 warps keep fewer rows in flight, so
# the second read of a row is more often served from L2; 8192 / (32 warps x 32 lanes) = 8 values per thread,
# one 16-byte load of bf16 that shares one running max
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
    def softmax_minus_onehot(x, cols, V, tgt, lse):
        """dCE/dlogits of one slice of a row; padded columns (>= V) get 0."""
        p = tl.where(cols < V, tl.exp2(x * _LOG2E - lse * _LOG2E), 0.0)
        return tl.where(cols == tgt, p - 1.0, p)

    @triton.jit
    def _grad_value(e, floor2, FLOOR: tl.constexpr):
        """2^e (the scaled probability); with FLOOR, exactly 0 where e < floor2."""
        g = tl.exp2(e)
        if FLOOR:
            g = tl.where(e < floor2, 0.0, g)
        return g

    @triton.jit
    def _ce_grad_kernel(logits_ptr, stride, targets_ptr, loss_ptr, V, VP, V_FULL, scale, log2_out, lse_ptr, out_ptr,
                        out_stride, floor2, BLOCK: tl.constexpr, R: tl.constexpr, FP8_OUT: tl.constexpr,
                        FLOOR: tl.constexpr):
        # writes p * 2^log2_out for every column, then the target's p - 1 over it: the one-hot costs one
        # store per row instead of a compare and select per value. FP8_OUT (model.head_fp8): keep the
        # logits, store lse, write e5m2 to out_ptr; else the gradient overwrites the logits in place.
        # FLOOR: probabilities under 2^floor are written as 0 (the target's p - 1 never is)
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        lse2 = row_lse2(base, V, VP, V_FULL, BLOCK, R)
        lse = lse2 / _LOG2E
        tgt = tl.load(targets_ptr + row).to(tl.int64)
        x_t = tl.load(base + tgt).to(tl.float32)
        tl.store(loss_ptr + row, (lse - x_t) * scale)
        if FP8_OUT:
            tl.store(lse_ptr + row, lse)
        dst = out_ptr + row * out_stride
        shift = lse2 - log2_out  # p * 2^log2_out = exp2(x log2 e - shift): one FMA and one exp2 per value
        # second read of the row: it was read microseconds ago, so mostly served from L2
        offs = tl.arange(0, BLOCK)
        for start in tl.range(0, V_FULL, BLOCK):
            x = tl.load(base + start + offs).to(tl.float32)
            tl.store(dst + start + offs, _grad_value(x * _LOG2E - shift, floor2, FLOOR).to(dst.dtype.element_ty))
        for start in tl.range(V_FULL, VP, BLOCK):
            cols = start + offs
            x = tl.load(base + cols, mask=cols < VP, other=0.0).to(tl.float32)
            g = tl.where(cols < V, _grad_value(x * _LOG2E - shift, floor2, FLOOR), 0.0)
            tl.store(dst + cols, g.to(dst.dtype.element_ty), mask=cols < VP)
        # every thread's stores of this row are ordered before the barrier, so the fix-up lands last
        tl.debug_barrier()
        g_t = (tl.exp2(x_t * _LOG2E - lse2) - 1.0) * tl.exp2(log2_out)
        tl.store(dst + tgt, g_t.to(dst.dtype.element_ty))


def launch_ce(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, scale: float, loss: torch.Tensor,
              lse: torch.Tensor, out: torch.Tensor, out_scale: float, block: int, warps: int,
              floor_log2: float | None = None) -> None:
    """One program per row of `logits` (CUDA); `out` is `logits` itself (in place) or an e5m2 buffer;
    `floor_log2`: probabilities under 2**floor_log2 written as 0."""
    n, vp = logits.shape
    assert logits.stride(1) == 1 and vp % 16 == 0 and block % (32 * warps) == 0
    r = block // (32 * warps)
    v_full = vocab_size // block * block
    log2_out = math.log2(out_scale)
    floor2 = (floor_log2 if floor_log2 is not None else 0.0) + log2_out  # in the kernel's scaled exponent
    _ce_grad_kernel[(n,)](logits, logits.stride(0), targets, loss, vocab_size, vp, v_full, scale,
                          log2_out, lse, out, out.stride(0), floor2, BLOCK=block, R=r, FP8_OUT=out is not logits,
                          FLOOR=floor_log2 is not None, num_warps=warps)


def ce_grad_inplace(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, scale: float,
                    floor_log2: float | None = None) -> torch.Tensor:
    """Per-row `scale * CE` over the first `vocab_size` columns; `logits` becomes scale * dCE/dlogits, with
    probabilities under 2**floor_log2 (if given) as exact zeros."""
    n, vp = logits.shape
    loss = torch.empty(n, device=logits.device, dtype=torch.float32)
    if logits.is_cuda and triton is not None:
        launch_ce(logits, targets, vocab_size, scale, loss, loss, logits, scale, CE_BLOCK, CE_WARPS, floor_log2)
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


def to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn copy and its per-tensor dequantisation scale (amax maps to 448), in two passes over x
    (max |x|, then divide and store as e4m3) where abs/amax/div/cast took four; x may be the fp32 master
    weight itself. Autocast is off here: it would run the norm on an fp32 copy of x."""
    with torch.autocast(x.device.type, enabled=False):
        sx = (torch.linalg.vector_norm(x, float("inf")).float() / FP8_MAX).clamp_min(1e-12)
        q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
        return torch.div(x, sx, out=q), sx


def fp8_linear(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """h @ w.T with both operands in float8_e4m3fn, per-tensor scales from their amax."""
    h8, sh = to_fp8(h)
    w8, sw = to_fp8(w)
    return torch._scaled_mm(h8, w8.t(), scale_a=sh, scale_b=sw, out_dtype=torch.bfloat16, use_fast_accum=True)


def matmul_f32(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b as `dtype`; bf16 operands on CUDA are written out straight from cuBLAS's fp32 accumulator
    (`mm` with out_dtype), which skips rounding to bf16 and the cast pass over the 100 MB result."""
    if a.is_cuda and a.dtype != dtype:
        return torch.mm(a, b, out_dtype=dtype)
    return (a @ b).to(dtype)


class FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size: int, fp8: bool, floor_log2: float | None = None):
        dtype = torch.bfloat16 if h.is_cuda else h.dtype
        hb = h.reshape(-1, h.size(-1)).to(dtype)
        t = targets.reshape(-1)
        if fp8:
            logits = fp8_linear(hb, weight)  # quantised from the fp32 weight: no bf16 copy in between
        else:
            logits = hb @ weight.to(dtype).t()
        rows = ce_grad_inplace(logits, t, vocab_size, 1.0 / t.numel(), floor_log2)
        ctx.save_for_backward(hb, weight, logits)
        ctx.h_shape, ctx.h_dtype = h.shape, h.dtype
        return rows.sum()

    @staticmethod
    def backward(ctx, g):
        hb, weight, dlogits = ctx.saved_tensors
        # g is folded into the small operands, never into the products: W's bf16 copy is made anyway
        # (torch.mul with a bf16 out= is that one pass) and h is 64 MB against grad-W's 100 MB in fp32
        wg = torch.mul(weight, g, out=torch.empty(weight.shape, dtype=hb.dtype, device=hb.device))
        gx = dlogits @ wg
        gw = matmul_f32(dlogits.t(), hb * g.to(hb.dtype), weight.dtype)
        return gx.view(ctx.h_shape).to(ctx.h_dtype), gw, None, None, None, None


# the heads that write the gradient in a kernel of their own: fused/fp8 floor p itself, gemm the bound
# exp(z - z_target) >= p (it never sees the row's lse), so it zeroes a subset of what they would
FLOOR_HEADS = ("fused", "fp8", "gemm")


def check_grad_floor(kind: str, grad_floor: float | None) -> None:
    if grad_floor is not None and kind not in FLOOR_HEADS:
        raise ValueError(f"--grad-floor {grad_floor:g} needs --head fused, fp8 or gemm (the head here is {kind})")


def resolve_grad_floor(grad_floor: float | str | None, kind: str, device: torch.device) -> float | None:
    """The floor a run uses: `auto` is AUTO_GRAD_FLOOR where head `kind` writes its gradient in a kernel on CUDA,
    none elsewhere (on CPU the heads' torch paths keep the exact gradient); a number needs such a head."""
    if grad_floor == "auto":
        return AUTO_GRAD_FLOOR if device.type == "cuda" and kind in FLOOR_HEADS else None
    floor = None if grad_floor in (None, "off") else float(grad_floor)
    check_grad_floor(kind, floor)
    return floor


def resolve_head(kind: str, device: torch.device) -> str:
    """What `--head auto` means on `device`: plain on CPU; on CUDA gemm where its TMA GEMM runs (Hopper and later:
    6 % per step over fused on the H200 at equal val loss, RESULTS.md), else fused."""
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
    if kind == "fp8all":
        from model.head_fp8 import make_fp8_head_loss
        return make_fp8_head_loss()
    if kind == "gemm":
        from model.head_gemm import make_gemm_head_loss
        return make_gemm_head_loss(grad_floor)
    fp8 = kind == "fp8"

    @torch.compiler.disable
    def head_loss(h, weight, targets, vocab_size):
        return FusedHeadLoss.apply(h, weight, targets, vocab_size, fp8, grad_floor)

    return head_loss
