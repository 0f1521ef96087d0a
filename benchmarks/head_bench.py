"""The output layer's pieces at the seed shape (65,536 tokens x 512 -> 49,152), timed alone on the GPU:
the CE kernels, the head's matmuls, the gemm head's tile configurations, and each whole head against float64.
Trade-off: pieces alone ignore how they share L2 and clocks inside a step; `train_bench speed` decides.

    python benchmarks/head_bench.py --json $OUT/head.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton.testing as tt  # noqa: E402

import model.head as H  # noqa: E402
import model.head_gemm as G  # noqa: E402

N, C, VP, V = 65536, 512, 49152, 48951
OUT: list[dict] = []

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _ce_v1_kernel(logits_ptr, stride, targets_ptr, loss_ptr, V, VP, scale, BLOCK: tl.constexpr):
    """The first CE kernel, kept to time the current one against: a rescale exp per value, loads masked at V
    (not a multiple of 16, so not vectorised), the one-hot as a select per value."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    offs = tl.arange(0, BLOCK)
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
    tl.store(loss_ptr + row, (lse - tl.load(base + tgt).to(tl.float32)) * scale)
    for start in tl.range(0, VP, BLOCK):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < VP, other=0.0).to(tl.float32)
        p = tl.where(cols < V, tl.exp(x - lse), 0.0)
        p = tl.where(cols == tgt, p - 1.0, p)
        tl.store(base + cols, (p * scale).to(logits_ptr.dtype.element_ty), mask=cols < VP)


def ce_v1(logits, t, v, scale):
    loss = torch.empty(logits.size(0), device=logits.device, dtype=torch.float32)
    _ce_v1_kernel[(logits.size(0),)](logits, logits.stride(0), t, loss, v, logits.size(1), scale, BLOCK=8192,
                                     num_warps=32)
    return loss


def layouts() -> None:
    """The head's three matmuls in every operand layout cuBLAS can be handed (a transposed copy of W or h is
    cheap next to them): the same product, different kernels."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(3)
    h = torch.randn(N, C, device=dev, dtype=torch.bfloat16, generator=g)
    w = torch.randn(VP, C, device=dev, dtype=torch.bfloat16, generator=g) * 0.05
    d = torch.randn(N, VP, device=dev, dtype=torch.bfloat16, generator=g) * 1e-5
    wT, hT = w.t().contiguous(), h.t().contiguous()
    f = 2 * N * C * VP
    rec("logits h @ w.T", lambda: h @ w.t(), f)
    rec("logits h @ wT", lambda: h @ wT, f)
    rec("logits (w @ h.T).T", lambda: (w @ h.t()).t(), f)
    rec("grad_x d @ w", lambda: d @ w, f)
    rec("grad_x d @ wT.T (K-major W)", lambda: d @ wT.t(), f)
    rec("grad_x (wT @ d.T).T", lambda: (wT @ d.t()).t(), f)
    rec("grad_x (w.T @ d.T).T", lambda: (w.t() @ d.t()).t(), f)
    rec("grad_W d.T @ h", lambda: d.t() @ h, f)
    rec("grad_W d.T @ hT.T", lambda: d.t() @ hT.t(), f)
    rec("grad_W (h.T @ d).T", lambda: (h.t() @ d).t(), f)
    rec("grad_W (hT @ d).T", lambda: (hT @ d).t(), f)


def ce_kernels() -> None:
    """The CE kernel against its previous version, several tile shapes, and both against float64."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(1)
    t = torch.randint(0, V, (N,), device=dev, generator=g)
    logits = torch.randn(N, VP, device=dev, dtype=torch.bfloat16, generator=g) * 3
    rec("CE v1 8192 x 32 warps", lambda: ce_v1(logits, t, V, 1.0 / N), nbytes=2 * N * VP * 2)
    for blk, nw in [(8192, 32), (4096, 16), (2048, 8), (8192, 16), (4096, 8), (16384, 32)]:
        H.CE_BLOCK, H.CE_WARPS = blk, nw
        rec(f"CE v2 BLOCK={blk} w={nw}", lambda: H.ce_grad_inplace(logits, t, V, 1.0 / N), nbytes=2 * N * VP * 2)
    H.CE_BLOCK, H.CE_WARPS = 8192, 32
    m = 4096
    x = torch.randn(m, VP, device=dev, dtype=torch.bfloat16, generator=g) * 3
    tm = t[:m]
    xd = x[:, :V].double()
    lse = torch.logsumexp(xd, 1)
    loss_ref = (lse - xd.gather(1, tm[:, None]).squeeze(1)) / m
    p = torch.exp(xd - lse[:, None])
    p[torch.arange(m, device=dev), tm] -= 1
    for name, fn in [("v1", ce_v1), ("v2", H.ce_grad_inplace)]:
        lg = x.clone()
        loss = fn(lg, tm, V, 1.0 / m)
        r = dict(name=f"check CE {name}", loss_abs=float((loss.double() - loss_ref).abs().max()),
                 grad_rel=float((lg[:, :V].double() * m - p).norm() / p.norm()),
                 pad_zero=bool((lg[:, V:] == 0).all()))
        OUT.append(r)
        print(f"check CE {name}: loss abs {r['loss_abs']:.2e}  grad rel {r['grad_rel']:.2e}  pad zero {r['pad_zero']}",
              flush=True)
    # --grad-floor's compiled kernel (FLOOR on) against the torch path CPU training takes: the same zeros
    lg, cpu = x.clone(), x.cpu()
    loss = H.ce_grad_inplace(lg, tm, V, 1.0 / m, floor_log2=-24.0)
    H.ce_grad_inplace(cpu, tm.cpu(), V, 1.0 / m, floor_log2=-24.0)
    zeros, zeros_cpu = lg[:, :V] == 0, cpu[:, :V] == 0
    r = dict(name="check CE v2 floor -24", loss_abs=float((loss.double() - loss_ref).abs().max()),
             zeros=float(zeros.float().mean()), zeros_differ=int((zeros.cpu() != zeros_cpu).sum()),
             grad_rel_cpu=float((lg.double().cpu() - cpu.double()).norm() / cpu.double().norm()))
    OUT.append(r)
    print(f"check CE v2 floor -24: loss abs {r['loss_abs']:.2e}  zeros {r['zeros']:.3f} (torch path differs at "
          f"{r['zeros_differ']})  grad rel to torch path {r['grad_rel_cpu']:.2e}", flush=True)


def rec(name, fn, nflop=0, nbytes=0):
    try:
        ms = tt.do_bench(fn, warmup=50, rep=300, return_mode="median")
    except Exception as e:  # one failing variant must not lose the others
        print(f"{name:44s} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        OUT.append(dict(name=name, error=f"{type(e).__name__}: {str(e)[:300]}"))
        return None
    r = dict(name=name, ms=ms, tflops=nflop / ms / 1e9 if nflop else None, gbps=nbytes / ms / 1e6 if nbytes else None)
    OUT.append(r)
    print(f"{name:44s} {ms:7.3f} ms" + (f"  {r['tflops']:6.0f} TFLOP/s" if nflop else "")
          + (f"  {r['gbps']:6.0f} GB/s" if nbytes else ""), flush=True)
    return ms


def pieces() -> None:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(1)
    h = torch.randn(N, C, device=dev, dtype=torch.bfloat16, generator=g)
    w = torch.randn(VP, C, device=dev, dtype=torch.bfloat16, generator=g) * 0.05
    t = torch.randint(0, V, (N,), device=dev, generator=g)
    flops = 2 * N * C * VP
    logits = torch.randn(N, VP, device=dev, dtype=torch.bfloat16, generator=g) * 3
    for blk, nw in [(8192, 32)]:
        H.CE_BLOCK, H.CE_WARPS = blk, nw
        rec(f"CE bf16 two reads BLOCK={blk} w={nw}", lambda: H.ce_grad_inplace(logits, t, V, 1.0 / N),
            nbytes=2 * N * VP * 2)
    H.CE_BLOCK, H.CE_WARPS = 8192, 32
    rec("logits bf16", lambda: h @ w.t(), flops)
    g16 = (torch.randn(N, VP, device=dev, dtype=torch.bfloat16, generator=g) * 1e-5)
    rec("grad_x bf16", lambda: g16 @ w, flops)
    rec("grad_W bf16", lambda: g16.t() @ h, flops)


def backward_glue() -> None:
    """The fused head's backward on a gradient the head itself produced (not random bits, which draw
    more power): the first glue (casts and scales as passes of their own) against the current one
    (g folded into the operand copies, grad-W written fp32 by cuBLAS), and grad-x at other widths: cuBLAS
    picks 192 x 192 tiles for it, which leave a third of the last column of tiles idle at N = 512."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(4)
    h = torch.randn(N, C, device=dev, dtype=torch.bfloat16, generator=gen)
    w32 = torch.randn(VP, C, device=dev, generator=gen) * 0.05
    t = torch.randint(0, V, (N,), device=dev, generator=gen)
    G = h @ w32.to(torch.bfloat16).t()
    H.ce_grad_inplace(G, t, V, 1.0 / N)
    g = torch.ones((), device=dev)
    f = 2 * N * C * VP

    def old():
        wb = w32.to(torch.bfloat16)
        gx = (G @ wb).mul_(g.to(torch.bfloat16))
        gw = (G.t() @ h).to(torch.float32).mul_(g)
        return gx, gw

    def new():
        wg = torch.mul(w32, g, out=torch.empty(w32.shape, dtype=torch.bfloat16, device=dev))
        return G @ wg, H.matmul_f32(G.t(), h * g.to(torch.bfloat16), torch.float32)

    rec("backward, old glue (2 matmuls + 5 passes)", old, 2 * f)
    rec("backward, new glue (2 matmuls + 2 passes)", new, 2 * f)
    (ox, ow), (nx, nw) = old(), new()
    ref_w = (G.t().double() @ h.double())
    r = dict(name="check glue", gx_rel=float((nx.double() - ox.double()).norm() / ox.double().norm()),
             gw_old_rel=float((ow.double() - ref_w).norm() / ref_w.norm()),
             gw_new_rel=float((nw.double() - ref_w).norm() / ref_w.norm()))
    OUT.append(r)
    print(f"check glue: grad-x new vs old {r['gx_rel']:.2e}; grad-W vs float64: old {r['gw_old_rel']:.2e}, "
          f"new {r['gw_new_rel']:.2e}", flush=True)
    wb = w32.to(torch.bfloat16)
    rec("grad_x G @ W (N=512)", lambda: G @ wb, f)
    for n in (256, 384, 128):
        ws = wb[:, :n].contiguous()
        rec(f"grad_x G @ W[:, :{n}]", lambda: G @ ws, f * n // C)
    rec("grad_W G.T @ h -> bf16", lambda: G.t() @ h, f)
    rec("grad_W G.T @ h -> fp32 (mm out_dtype)", lambda: torch.mm(G.t(), h, out_dtype=torch.float32), f)
    torch.backends.cuda.preferred_blas_library("cublaslt")
    rec("grad_x G @ W, cuBLASLt", lambda: G @ wb, f)
    rec("grad_W G.T @ h, cuBLASLt", lambda: G.t() @ h, f)
    torch.backends.cuda.preferred_blas_library("cublas")


def whole_heads() -> None:
    """Each head's forward + backward alone, then its loss and gradients against float64."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(2)
    h = (torch.randn(N, C, device=dev, generator=g)).requires_grad_()
    w = (torch.randn(VP, C, device=dev, generator=g) * 0.05).requires_grad_()
    t = torch.randint(0, V, (N,), device=dev, generator=g)
    heads = {k: H.make_head_loss(k) for k in ("fused", "gemm")}
    heads["gemm floor -24"] = H.make_head_loss("gemm", -24.0)
    for name, fn in heads.items():
        def step():
            fn(h, w, t, V).backward()
        rec(f"whole head fwd+bwd {name}", step, 3 * 2 * N * C * VP)
    m = 4096
    hh = torch.randn(m, C, device=dev, dtype=torch.float64, generator=g)
    ww = torch.randn(VP, C, device=dev, dtype=torch.float64, generator=g) * 0.05
    tt_ = torch.randint(0, V, (m,), device=dev, generator=g)
    hr, wr = hh.clone().requires_grad_(), ww.clone().requires_grad_()
    col = torch.arange(VP, device=dev)
    ref = torch.nn.functional.cross_entropy((hr @ wr.t()).masked_fill(col >= V, float("-inf")), tt_)
    ref.backward()
    for name, fn in heads.items():
        a, b = hh.float().requires_grad_(), ww.float().requires_grad_()
        loss = fn(a, b, tt_, V)
        loss.backward()
        e = lambda x, y: float((x.double() - y).norm() / y.norm())
        r = dict(name=f"check {name}", loss_rel=abs(float(loss) - float(ref)) / float(ref),
                 grad_h_rel=e(a.grad, hr.grad), grad_w_rel=e(b.grad, wr.grad),
                 finite=bool(torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()))
        OUT.append(r)
        print(f"check {name:10s} loss rel {r['loss_rel']:.2e}  grad_h rel {r['grad_h_rel']:.2e}  "
              f"grad_W rel {r['grad_w_rel']:.2e}  finite {r['finite']}", flush=True)


def round_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """bf16 `x` rounded to nearest with `bits` of its 7 mantissa bits kept (the rest zero)."""
    drop = 7 - bits
    if drop <= 0:
        return x
    u = x.view(torch.int16).to(torch.int32) & 0xFFFF
    u = (u + (1 << (drop - 1))) & ~((1 << drop) - 1) & 0xFFFF
    return torch.where(u >= 32768, u - 65536, u).to(torch.int16).view(torch.bfloat16)


def power() -> None:
    """A power-capped card runs a matmul at a speed that depends on the bits it multiplies (random data runs slower
    than a real step's): the backward matmuls timed on the gradient the CE kernel writes, on that gradient with
    fewer mantissa bits, on zeros; each variant twice, interleaved, against drift."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(5)
    h = torch.randn(N, C, device=dev, dtype=torch.bfloat16, generator=g)
    w = torch.randn(VP, C, device=dev, dtype=torch.bfloat16, generator=g) * 0.02
    t = torch.randint(0, V, (N,), device=dev, generator=g)
    d = h @ w.t()
    H.ce_grad_inplace(d, t, V, 1.0 / N)  # the gradient as the fused head hands it to the backward matmuls
    f = 2 * N * C * VP
    variants = {"CE gradient (bf16, 7 mantissa bits)": d}
    for bits in (4, 3, 2):
        r = variants[f"CE gradient rounded to {bits} mantissa bits"] = round_mantissa(d, bits)
        print(f"  rounded to {bits} bits: relative error {float((r.float() - d.float()).norm() / d.float().norm()):.2e}")
    variants["zeros"] = torch.zeros_like(d)
    for rnd in range(2):
        for name, dd in variants.items():
            rec(f"grad_x  {name} [{rnd}]", lambda: dd @ w, f)
            rec(f"grad_W  {name} [{rnd}]", lambda: dd.t() @ h, f)
    hr = {"h N(0,1)": h, "h rounded to 3 bits": round_mantissa(h, 3)}
    for rnd in range(2):
        for name, hh in hr.items():
            rec(f"logits {name} [{rnd}]", lambda: hh @ w.t(), f)
    del variants, hr
    sparsity(h, w, d)


def sparsity(h, w, d) -> None:
    """The backward matmuls against the share of exact zeros in the gradient, chosen at random (what a gradient
    floor, --grad-floor, produces)."""
    f = 2 * N * C * VP
    g = torch.Generator(device=d.device).manual_seed(9)
    for frac in (0.5, 0.9, 0.99):
        dd = d * (torch.rand(d.shape, device=d.device, generator=g) >= frac).to(d.dtype)
        rec(f"grad_x  {int(frac * 100)} % zeros at random", lambda: dd @ w, f)
        rec(f"grad_W  {int(frac * 100)} % zeros at random", lambda: dd.t() @ h, f)


# --head gemm's configurations: the chosen one (model.head_gemm.GEMM_CONFIG) and its nearest rivals (4 stages
# unsplit do not fit in shared memory, hence 3 there)
_BEST = dict(BM=128, BN=256, BK=64, GROUP=16, warps=8, stages=4, tma=True, split=True)
GEMM_CONFIGS = [_BEST, {**_BEST, "GROUP": 8}, {**_BEST, "split": False, "stages": 3}, {**_BEST, "tma": False, "split": False, "stages": 3}]


def gemm_head(best_path: Path | None) -> None:
    """--head gemm's forward (the target logits, the logits GEMM writing exp with its row sums, their sum) per
    tile configuration, against cuBLAS's logits + the CE kernel, interleaved; the fastest is checked against
    the torch path on 2,048 rows and written to `best_path` (train_bench --gemm-config reads it)."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(3)
    h = torch.randn(N, C, device=dev, dtype=torch.bfloat16, generator=g)
    w = torch.randn(VP, C, device=dev, dtype=torch.bfloat16, generator=g) * 0.2  # logits with std ~4.5
    t = torch.randint(0, V, (N,), device=dev, generator=g)
    f = 2 * N * C * VP

    def base():
        lg = h @ w.t()
        H.ce_grad_inplace(lg, t, V, 1.0 / N)

    times = {}
    for rnd in range(2):
        rec(f"cuBLAS logits + CE kernel [{rnd}]", base, f)
        rec(f"cuBLAS logits alone [{rnd}]", lambda: h @ w.t(), f)
        for c in GEMM_CONFIGS:
            name = (f"gemm {'tma ' if c['tma'] else ''}{'split ' if c.get('split') else ''}"
                    f"{c['BM']}x{c['BN']}x{c['BK']} g{c['GROUP']} w{c['warps']} s{c['stages']}")
            ms = rec(f"{name} [{rnd}]", lambda: G.exp_logits(h, w, t, V, c), f)
            if ms:
                times.setdefault(name, (c, []))[1].append(ms)
    if not times:
        return
    name, (best, ms) = min(times.items(), key=lambda kv: min(kv[1][1]))
    m = 2048
    e, s = G.exp_logits(h[:m], w, t[:m], V, best)
    e_ref, s_ref = G.exp_logits(h[:m], w, t[:m], V, kernel=False)
    err_e = float(((e.float() - e_ref.float()).abs() / e_ref.float().abs().clamp_min(1e-30)).max())
    err_s = float(((s - s_ref).abs() / s_ref).max())
    OUT.append(dict(name="best gemm", config=best, ms=min(ms), e_rel_max=err_e, s_rel_max=err_s))
    print(f"best: {name} {min(ms):.3f} ms; against the torch path: E within {err_e:.1e}, row sums {err_s:.1e}")
    # --grad-floor -24: the same kernel with the offset that makes exp2's flush the floor; against the torch path
    o24 = G.offset2_for(-24.0)
    e_f, s_f = G.exp_logits(h[:m], w, t[:m], V, best, offset2=o24)
    e_fr, _ = G.exp_logits(h[:m], w, t[:m], V, kernel=False, offset2=o24)
    left_out = float(((s - s_f * 2.0 ** (o24 - G.OFFSET2)) / s).abs().max())
    r = dict(name="check gemm floor -24", zeros=float((e_f[:, :V] == 0).float().mean()),
             zeros_differ=int(((e_f == 0) != (e_fr == 0)).sum()), sum_left_out_rel_max=left_out)
    OUT.append(r)
    print(f"floor -24: zeros {r['zeros']:.3f}, differing from the torch path at {r['zeros_differ']} entries, "
          f"row sums without the flushed values: at most {left_out:.1e} less", flush=True)
    for rnd in range(2):
        rec(f"best gemm [{rnd}]", lambda: G.exp_logits(h, w, t, V, best), f)
        rec(f"best gemm, floor -24 [{rnd}]", lambda: G.exp_logits(h, w, t, V, best, offset2=o24), f)
    if best_path:
        best_path.write_text(json.dumps(best))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--skip-pieces", action="store_true", help="the CE kernels and whole heads only")
    p.add_argument("--ce-only", action="store_true", help="only the CE kernels against their first version")
    p.add_argument("--layouts", action="store_true", help="only the head's matmuls in each operand layout")
    p.add_argument("--glue", action="store_true", help="only the fused head's backward: glue and grad-x widths")
    p.add_argument("--power", action="store_true", help="only the backward matmuls against their operands' mantissa bits and zeros (the card is power-capped)")
    p.add_argument("--gemm", action="store_true", help="only --head gemm's forward per tile configuration, then each whole head")
    p.add_argument("--gemm-best", type=Path, help="with --gemm: write the fastest configuration here (JSON)")
    args = p.parse_args()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    if args.gemm:
        gemm_head(args.gemm_best)
        torch.cuda.empty_cache()
        whole_heads()
    elif args.layouts or args.glue or args.power:
        (layouts if args.layouts else power if args.power else backward_glue)()
    else:
        ce_kernels()
        if not (args.ce_only or args.skip_pieces):
            pieces()
        torch.cuda.empty_cache()
        if not args.ce_only:
            whole_heads()
    if args.json:
        args.json.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                             date=time.strftime("%Y-%m-%d"), results=OUT), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
