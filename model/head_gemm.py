"""Output layer + cross-entropy taken in the logits GEMM's epilogue (`--head gemm`): it writes exp(z - z_target).
Trade-off: no pass over the rows follows the GEMM, but the GEMM is Triton's, and a target > 111 nats behind overflows."""
from __future__ import annotations

import torch

from model.head import LOG2E, matmul_f32

try:  # triton exists only where CUDA does; the CPU path below computes the same values in torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
try:  # host-side TMA descriptors (Triton >= 3.4); without them the pointer-load kernel runs
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the machine
    TensorDescriptor = None
# E = 2^((z - z_target) log2 e - OFFSET2): the target's own term is 2^-OFFSET2, values overflow only past
# (128 + OFFSET2) / log2 e = 111 nats above the target, and a value underflows only below 2^-(126 - OFFSET2)
# = 2^-94 times the target's probability, far under anything a bf16 gradient could carry
OFFSET2 = 32.0
# exp2 in the kernels is ex2.approx.ftz: results under 2^-126 are flushed to 0. `--grad-floor F` uses that:
# with the offset 126 + F the flush falls exactly where exp(z - z_target) < 2^F (a bound above p), so the floor
# costs no instruction in the epilogue (an explicit compare and select would)
FLUSH2 = -126.0


def offset2_for(floor_log2: float | None) -> float:
    """E's offset (log2 of 1 / the target's term): OFFSET2, or 126 + F where that floors at 2^F."""
    return OFFSET2 if floor_log2 is None else max(OFFSET2, floor_log2 - FLUSH2)
# tile rows, tile columns, K step, rows of tiles per L2 group, warps, pipeline stages; `tma`: one persistent
# program per SM with TMA loads and stores (Hopper on; elsewhere the pointer kernel), `split`: E stored in two
# halves (room for a 4th stage). The fastest configuration `head_bench.py --gemm` found; the group size changes only
# the order tiles run in, never the values
GEMM_CONFIG = dict(BM=128, BN=256, BK=64, GROUP=16, warps=8, stages=4, tma=True, split=True)


if triton is not None:
    _LOG2E = tl.constexpr(LOG2E)

    @triton.jit
    def _target_logit_kernel(h_ptr, w_ptr, tgt_ptr, out_ptr, M, K, offset2, BR: tl.constexpr, BK: tl.constexpr):
        """out[i] = (h[i] . w[t[i]]) log2 e + offset2, in fp32 from the bf16 operands (exact products)."""
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        ok = rows < M
        t = tl.load(tgt_ptr + rows, mask=ok, other=0).to(tl.int64)
        acc = tl.zeros([BR], tl.float32)
        for k in tl.range(0, K, BK):
            cols = k + tl.arange(0, BK)
            m = ok[:, None] & (cols[None, :] < K)
            a = tl.load(h_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], mask=m, other=0.0).to(tl.float32)
            b = tl.load(w_ptr + t[:, None] * K + cols[None, :], mask=m, other=0.0).to(tl.float32)
            acc += tl.sum(a * b, 1)
        tl.store(out_ptr + rows, acc * _LOG2E + offset2, mask=ok)

    @triton.jit
    def _tile_coords(tile, n_m, n_tiles_n, GROUP: tl.constexpr):
        """(tile row, tile column) of the `tile`-th tile, GROUP tile-rows at a time so W's columns are re-read
        from L2 rather than memory."""
        width = GROUP * n_tiles_n
        first_m = (tile // width) * GROUP
        rows_in_group = min(n_m - first_m, GROUP)
        return first_m + (tile % width) % rows_in_group, (tile % width) // rows_in_group

    @triton.jit
    def _exp_tile(acc, c0, W: tl.constexpr, ref, tgt, V):
        """2^(z log2 e - ref) of the logits in columns c0..c0+W (flushed to 0 under 2^-126), 0 in the target's
        and the padded columns: the target's term is known exactly (2^-offset) and left out, so p - 1 there comes
        from the other terms' sum. (Skipping the compare and select in tiles without a target or padding gained
        nothing.)"""
        rn = c0 + tl.arange(0, W)
        e = tl.exp2(acc * _LOG2E - ref[:, None])
        return tl.where((rn[None, :] < V) & (rn[None, :] != tgt[:, None]), e, 0.0)

    @triton.jit
    def _logits_exp_kernel(h_ptr, w_ptr, ref_ptr, tgt_ptr, e_ptr, part_ptr, M, V, VP, K, n_tiles_n,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                           UPCAST: tl.constexpr):
        """One [BM, BN] tile of h @ w.T, written as 2^(z log2 e - ref) with the target's and padded columns 0;
        the tile's row sums go to part[row, tile column] (summed later in a fixed order: deterministic)."""
        pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BM), n_tiles_n, GROUP)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        rm_ok, rn_ok = rm < M, rn < VP
        a_ptrs = h_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :]
        b_ptrs = w_ptr + rn.to(tl.int64)[:, None] * K + rk[None, :]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            a = tl.load(a_ptrs, mask=rm_ok[:, None] & (rk[None, :] < K - k), other=0.0)
            b = tl.load(b_ptrs, mask=rn_ok[:, None] & (rk[None, :] < K - k), other=0.0)
            if UPCAST:  # Triton's interpreter multiplies bf16 as raw integers; fp32 holds their products exactly
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc)
            a_ptrs += BK
            b_ptrs += BK
        ref = tl.load(ref_ptr + rm, mask=rm_ok, other=0.0)
        tgt = tl.load(tgt_ptr + rm, mask=rm_ok, other=-1).to(tl.int32)
        e = _exp_tile(acc, pid_n * BN, BN, ref, tgt, V)
        tl.store(e_ptr + rm.to(tl.int64)[:, None] * VP + rn[None, :], e.to(e_ptr.dtype.element_ty),
                 mask=rm_ok[:, None] & rn_ok[None, :])
        tl.store(part_ptr + rm.to(tl.int64) * n_tiles_n + pid_n, tl.sum(e, 1), mask=rm_ok)

    @triton.jit
    def _logits_exp_tma_kernel(a_desc, b_desc, e_desc, ref_ptr, tgt_ptr, part_ptr, M, V, VP, K, n_tiles_n,
                               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                               NUM_SMS: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr):
        """The same tiles as `_logits_exp_kernel` from one program per SM, operands and E moved by TMA (which
        zero-fills and clips the edges); the flattened loop issues the next tile's loads during this tile's epilogue."""
        n_m = tl.cdiv(M, BM)
        for tile in tl.range(tl.program_id(0), n_m * n_tiles_n, NUM_SMS, flatten=True):
            pid_m, pid_n = _tile_coords(tile, n_m, n_tiles_n, GROUP)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k in range(0, K, BK):
                a = a_desc.load([pid_m * BM, k])
                b = b_desc.load([pid_n * BN, k])
                if UPCAST:
                    a, b = a.to(tl.float32), b.to(tl.float32)
                acc = tl.dot(a, b.T, acc)
            rm = pid_m * BM + tl.arange(0, BM)
            rm_ok = rm < M
            ref = tl.load(ref_ptr + rm, mask=rm_ok, other=0.0)
            # ids compared in 32 bits: as int64 every element's compare takes two instructions and a sign extension
            # (benchmarks/kernel_sass.py checks the compiled epilogue)
            tgt = tl.load(tgt_ptr + rm, mask=rm_ok, other=-1).to(tl.int32)
            if SPLIT:  # two half-width stores: half the shared memory for staging E, room for a deeper pipeline
                a0, a1 = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
                c0 = pid_n * BN
                e0 = _exp_tile(a0, c0, BN // 2, ref, tgt, V)
                e_desc.store([pid_m * BM, c0], e0.to(e_desc.dtype))
                e1 = _exp_tile(a1, c0 + BN // 2, BN // 2, ref, tgt, V)
                e_desc.store([pid_m * BM, c0 + BN // 2], e1.to(e_desc.dtype))
                total = tl.sum(e0, 1) + tl.sum(e1, 1)
            else:
                e = _exp_tile(acc, pid_n * BN, BN, ref, tgt, V)
                e_desc.store([pid_m * BM, pid_n * BN], e.to(e_desc.dtype))
                total = tl.sum(e, 1)
            tl.store(part_ptr + rm.to(tl.int64) * n_tiles_n + pid_n, total, mask=rm_ok)


def use_kernels(x: torch.Tensor) -> bool:
    return x.is_cuda and triton is not None


def has_tma(device: torch.device) -> bool:
    """Whether the persistent TMA kernel can run: Hopper or later with Triton's host descriptors (Triton's
    interpreter runs it on CPU tensors for the tests). Before Hopper the pointer kernel is no faster than
    cuBLAS + the fused head's CE kernel, which is why `--head auto` picks gemm only where this holds."""
    if triton is None or TensorDescriptor is None:
        return False
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9


def target_logits2(hb: torch.Tensor, wb: torch.Tensor, t: torch.Tensor, kernel: bool | None = None,
                   offset2: float = OFFSET2) -> torch.Tensor:
    """(h_i . w_{t_i}) log2 e + offset2 per row, fp32 from exact products of the operands as given. `kernel`:
    the Triton path (default: on CUDA; the tests force it on CPU tensors under Triton's interpreter)."""
    if use_kernels(hb) if kernel is None else kernel:
        out = torch.empty(hb.size(0), device=hb.device, dtype=torch.float32)
        _target_logit_kernel[(triton.cdiv(hb.size(0), 64),)](hb, wb, t, out, hb.size(0), hb.size(1), offset2,
                                                            BR=64, BK=64, num_warps=4)
        return out
    return (hb.float() * wb.float()[t]).sum(1) * LOG2E + offset2


def exp_logits(hb: torch.Tensor, wb: torch.Tensor, t: torch.Tensor, vocab_size: int,
               config: dict | None = None, kernel: bool | None = None,
               offset2: float = OFFSET2) -> tuple[torch.Tensor, torch.Tensor]:
    """E = 2^((h w^T - z_target) log2 e - offset2) as hb's dtype, 0 in the target's and padded columns and where
    under 2^-126 (exp2 flushes there on the GPU; the torch path does the same), and S_rest = sum of each row's E
    in fp32 (from the unrounded values). `hb` [N, K], `wb` [VP, K] contiguous. Under Triton's interpreter
    (CPU tests) the kernel's exp2 keeps values under 2^-126 as subnormals instead."""
    n, k = hb.shape
    vp = wb.size(0)
    kernel = use_kernels(hb) if kernel is None else kernel
    ref = target_logits2(hb, wb, t, kernel, offset2)
    if kernel:
        c = {**GEMM_CONFIG, **(config or {})}
        n_tiles_n = triton.cdiv(vp, c["BN"])
        e = torch.empty(n, vp, device=hb.device, dtype=hb.dtype)
        part = torch.empty(n, n_tiles_n, device=hb.device, dtype=torch.float32)
        if c.get("tma") and has_tma(hb.device):
            sms = c.get("sms") or (torch.cuda.get_device_properties(hb.device).multi_processor_count
                                   if hb.is_cuda else 4)
            descs = (TensorDescriptor.from_tensor(hb, [c["BM"], c["BK"]]),
                     TensorDescriptor.from_tensor(wb, [c["BN"], c["BK"]]),
                     TensorDescriptor.from_tensor(e, [c["BM"], c["BN"] // (2 if c.get("split") else 1)]))
            _logits_exp_tma_kernel[(sms,)](*descs, ref, t, part, n, vocab_size, vp, k, n_tiles_n, BM=c["BM"],
                                           BN=c["BN"], BK=c["BK"], GROUP=c["GROUP"], NUM_SMS=sms,
                                           SPLIT=bool(c.get("split")), UPCAST=not hb.is_cuda,
                                           num_warps=c["warps"], num_stages=c["stages"])
        else:
            grid = (triton.cdiv(n, c["BM"]) * n_tiles_n,)
            _logits_exp_kernel[grid](hb, wb, ref, t, e, part, n, vocab_size, vp, k, n_tiles_n, BM=c["BM"],
                                     BN=c["BN"], BK=c["BK"], GROUP=c["GROUP"], UPCAST=not hb.is_cuda,
                                     num_warps=c["warps"], num_stages=c["stages"])
        return e, part.sum(1)
    x = (hb.float() @ wb.float().t()) * LOG2E - ref[:, None]
    e = torch.exp2(x).masked_fill_(x < FLUSH2, 0.0)
    e[:, vocab_size:] = 0
    e[torch.arange(n), t] = 0
    return e.to(hb.dtype), e.sum(1)


def rows_loss(s_rest: torch.Tensor, offset2: float = OFFSET2) -> torch.Tensor:
    """Each row's cross-entropy: lse - z_t = ln(2^-offset2 + S_rest) + offset2 ln 2 = ln(1 + S_rest 2^offset2),
    exact near 0 (a confident row) where lse - z_t would cancel; in float64 (one value per row), where the
    product cannot overflow before E itself does."""
    return torch.log1p(s_rest.double() * 2.0 ** offset2).float()


class GemmHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of h @ weight.T over the first `vocab_size` columns. With p = E / S (S = S_rest +
    2^-offset2), the target's p - 1 = -S_rest / S: E's target column is set to -S_rest, and the gradient is
    r E @ W for h and E^T @ (r h) for W with r = g / (N S), the 1/S scale riding on 512-wide operands. With a
    floor (offset2 = 126 + F) the values flushed to 0 are left out of S too (at most V 2^F of the target's
    term), and W enters grad-x scaled by 2^(offset2 - OFFSET2), so its products with E stay fp32 normals."""

    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size: int, floor_log2: float | None = None):
        dtype = torch.bfloat16 if h.is_cuda else h.dtype
        hb = h.reshape(-1, h.size(-1)).to(dtype).contiguous()
        wb = weight.to(dtype)
        t = targets.reshape(-1)
        offset2 = offset2_for(floor_log2)
        e, s_rest = exp_logits(hb, wb, t, vocab_size, offset2=offset2)
        # -S_rest is accurate to bf16's 8 bits relative, as every other value of E: no 1 - p cancels in it
        e[torch.arange(t.numel(), device=t.device), t] = (-s_rest).to(e.dtype)
        ctx.save_for_backward(hb, wb, e, s_rest)
        ctx.h_shape, ctx.h_dtype, ctx.w_dtype, ctx.offset2 = h.shape, h.dtype, weight.dtype, offset2
        return rows_loss(s_rest, offset2).sum() / t.numel()

    @staticmethod
    def backward(ctx, g):
        hb, wb, e, s_rest = ctx.saved_tensors
        r = (g.float() / (e.size(0) * (s_rest + 2.0 ** -ctx.offset2)))[:, None]  # [N, 1]
        lift = 2.0 ** (ctx.offset2 - OFFSET2)  # a power of two: W * lift is exact in bf16
        wl = wb if lift == 1.0 else wb * lift
        gx = torch.mul(e @ wl, r / lift, out=torch.empty(hb.shape, dtype=ctx.h_dtype, device=hb.device))
        gw = matmul_f32(e.t(), torch.mul(hb, r, out=torch.empty_like(hb)), ctx.w_dtype)
        return gx.view(ctx.h_shape), gw, None, None, None


def make_gemm_head_loss(grad_floor: float | None = None):
    """`grad_floor` F: values of E where exp(z - z_target) < 2^F (so p < 2^F) enter the backward as zeros."""
    @torch.compiler.disable
    def head_loss(h, weight, targets, vocab_size):
        return GemmHeadLoss.apply(h, weight, targets, vocab_size, grad_floor)

    return head_loss
