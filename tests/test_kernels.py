"""The Triton kernels every CUDA training step runs (the fused head's cross-entropy, the gemm head's logits GEMM),
checked against float64: on the GPU when there is one, else in Triton's interpreter on the CPU."""
from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("CI"):
    import triton  # noqa: F401  (`make test` installs it: in CI a missing Triton is an error, not a skip)
else:
    pytest.importorskip("triton", reason="Triton not installed (`make test` installs it)")

from model import head as H  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":  # conftest sets it before anything imports Triton
    pytest.skip("TRITON_INTERPRET=1 must be set before Triton is imported", allow_module_level=True)


def _logits(n: int, vp: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, vp, generator=g) * 3
    x[0] = 0.0  # a flat row: every probability equal
    x[1, 5] = 60.0  # one dominant logit: exp would overflow without the max shift
    x[2] = -40.0 + torch.randn(vp, generator=g)  # all very negative
    return x.to(torch.bfloat16).to(DEV)


def _reference(x: torch.Tensor, t: torch.Tensor, v: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse, loss, p - onehot) in float64 over the first v columns."""
    xd = x[:, :v].double().cpu()
    lse = torch.logsumexp(xd, 1)
    loss = lse - xd.gather(1, t.cpu()[:, None]).squeeze(1)
    p = torch.exp(xd - lse[:, None])
    p[torch.arange(len(t)), t.cpu()] -= 1.0
    return lse, loss, p


@pytest.mark.parametrize("v, vp, block, warps", [
    (1000, 1024, 256, 4),  # unmasked blocks up to 768, then one masked block with padded columns
    (1024, 1024, 256, 2),  # no padding: the masked loop never runs
    (300, 512, 512, 4),  # a row shorter than one block: masked only
])
def test_ce_kernel_gives_float64_loss_and_gradient_in_place(v, vp, block, warps):
    n = 24
    x = _logits(n, vp, seed=v)
    t = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(1)).to(DEV)
    t[1] = 5  # the dominant logit is the target there: gradient ~0 except its own
    lse, loss_ref, p = _reference(x, t, v)
    scale = 1.0 / n
    logits, loss = x.clone(), torch.empty(n, device=DEV)
    H.launch_ce(logits, t, v, scale, loss, block, warps)
    # float32 loss = lse - x_t: near 0 for the dominant row, where one unit of float32 at 60 (3.8e-6) is the error
    torch.testing.assert_close(loss.double().cpu(), loss_ref * scale, rtol=2e-6, atol=1e-5 * scale)
    g = logits[:, :v].double().cpu()
    # stored in bf16: within one unit of its last place (8 significant bits) of the exact value (the GPU
    # rounds to nearest, Triton's interpreter truncates); the target's p - 1 where p ~ 1 (the dominant row)
    # is off by float32's rounding of that row's log-sum-exp, as the loss is
    torch.testing.assert_close(g, p * scale, rtol=2 ** -7, atol=1e-5 * scale)
    assert (logits[:, v:] == 0).all()  # padded columns: never predicted, no gradient
    assert torch.isfinite(logits).all()
    # and the torch path CPU training uses agrees with it
    fallback = x.clone().cpu()
    rows = H.ce_grad_inplace(fallback, t.cpu(), v, scale)
    torch.testing.assert_close(rows.double(), loss.double().cpu(), rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(fallback.double(), logits.double().cpu(), rtol=2 ** -6, atol=1e-5 * scale)


def test_ce_kernel_floor_writes_tiny_probabilities_as_zeros():
    """--grad-floor: probabilities under 2^floor become exact zeros (never the target's p - 1), the rest and the
    loss are unchanged, and the CPU path zeroes the same entries."""
    n, v, vp, floor = 24, 1000, 1024, -12.0
    x = _logits(n, vp, seed=11)
    t = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(3)).to(DEV)
    t[2] = int(x[2, :v].float().argmin())  # a target whose probability is under the floor: its p - 1 stays
    _, loss_ref, p = _reference(x, t, v)
    prob = p.clone()
    prob[torch.arange(n), t.cpu()] += 1.0
    below = prob < 2.0 ** floor
    below[torch.arange(n), t.cpu()] = False
    near = (prob.log2() - floor).abs() < 2 ** -6  # within exp2's rounding of the floor: either side will do
    assert below.sum() > n * v // 4 and (~below).sum() > n  # the floor bites, and keeps the large ones
    scale = 1.0 / n
    logits, loss = x.clone(), torch.empty(n, device=DEV)
    H.launch_ce(logits, t, v, scale, loss, 256, 4, floor_log2=floor)
    g = logits[:, :v].double().cpu()
    torch.testing.assert_close(loss.double().cpu(), loss_ref * scale, rtol=2e-6, atol=1e-5 * scale)
    assert ((g == 0) == below)[~near].all()
    torch.testing.assert_close(g[~below & ~near], (p * scale)[~below & ~near], rtol=2 ** -7, atol=1e-5 * scale)
    assert g[2, t[2]] == pytest.approx(-scale, rel=2 ** -7)
    fallback = x.clone().cpu()
    H.ce_grad_inplace(fallback, t.cpu(), v, scale, floor_log2=floor)
    fb = fallback[:, :v].double()
    assert ((fb == 0) == below)[~near].all()
    torch.testing.assert_close(fb, g, rtol=2 ** -6, atol=1e-5 * scale)


def exp_logits_reference(h, w, t, v: int):
    """float64 logits z, the targets' z_t, and the E the gemm kernel writes: 2^((z - z_t) log2 e - OFFSET), zero in
    the target's and the padded columns."""
    from model import head_gemm as G

    z = h.double() @ w.double().t()
    zt = z.gather(1, t[:, None])
    ref = torch.exp2((z - zt) * G.LOG2E - G.OFFSET2)
    ref[:, v:] = 0
    ref[torch.arange(len(t)), t] = 0
    return z, zt, ref


@pytest.mark.parametrize("config", [
    dict(BM=32, BN=64, BK=16, GROUP=2, warps=4, stages=2, tma=False),  # pointer loads (before Hopper)
    dict(BM=32, BN=64, BK=16, GROUP=2, warps=4, stages=2, tma=True, sms=3),  # persistent, TMA
    dict(BM=32, BN=64, BK=16, GROUP=2, warps=4, stages=2, tma=True, split=True, sms=3),  # halves stored apart
])
def test_gemm_head_kernel_writes_exp_of_logits_and_row_sums(config):
    """--head gemm's logits GEMM: E = 2^((z - z_t) log2 e - OFFSET2) against float64 from the same bf16 operands,
    0 in the target's and padded columns, row sums S_rest, for a row count no tile size divides."""
    from model import head_gemm as G

    n, k, v, vp = 90, 48, 300, 384
    g = torch.Generator().manual_seed(4)
    h = torch.randn(n, k, generator=g).to(torch.bfloat16)
    w = (torch.randn(vp, k, generator=g) * 0.5).to(torch.bfloat16)
    t = torch.randint(0, v, (n,), generator=g)
    h[3] = w[t[3]] * 6  # a confident row: the target far above the rest
    h[4] = -w[t[4]] * 6  # the target far below: large E values, large loss
    e, s = G.exp_logits(h.to(DEV), w.to(DEV), t.to(DEV), v, config=config, kernel=True)
    z, zt, ref = exp_logits_reference(h, w, t, v)
    e = e.double().cpu()
    # bf16: within one unit of the 8th significant bit; the exponent's fp32 rounding adds ~1e-5 relative. In the
    # confident row, values 2^94 below the target's term underflow (fp32/bf16 denormals): atol covers only those
    torch.testing.assert_close(e, ref, rtol=2 ** -7, atol=2.0 ** -120)
    assert (e[:, v:] == 0).all() and (e[torch.arange(n), t] == 0).all()
    torch.testing.assert_close(s.double().cpu(), ref.sum(1), rtol=1e-4, atol=0)
    loss = G.rows_loss(s.cpu()).double()
    torch.testing.assert_close(loss, torch.logsumexp(z[:, :v], 1) - zt.squeeze(1), rtol=1e-5, atol=1e-5)
    assert loss[3] < 1e-3 and loss[4] > 30
    # the torch path CPU training takes gives the same values
    e_cpu, s_cpu = G.exp_logits(h, w, t, v, kernel=False)
    torch.testing.assert_close(e_cpu.double(), e, rtol=2 ** -7, atol=2.0 ** -120)
    torch.testing.assert_close(s_cpu.double(), s.double().cpu(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("config", [
    dict(BM=32, BN=64, BK=16, GROUP=2, warps=4, stages=2, tma=False),
    dict(BM=32, BN=64, BK=16, GROUP=2, warps=4, stages=2, tma=True, split=True, sms=3),
])
def test_gemm_head_floor_is_exp2s_flush_at_the_offset_126_plus_f(config):
    """--grad-floor F with --head gemm: the same kernel with offset 126 + F, so E falls under 2^-126 exactly where
    z - z_t < F ln 2 (then p < 2^F) and the GPU's exp2 flushes it to 0 (the interpreter keeps a subnormal); the rest
    is E without the floor scaled by a power of two; the sums leave the flushed values out, as the torch path does."""
    from model import head_gemm as G

    n, k, v, vp, floor = 70, 48, 300, 384, -10.0
    o = G.offset2_for(floor)
    assert o == 116.0 and G.offset2_for(None) == G.OFFSET2 == G.offset2_for(-120.0)
    g = torch.Generator().manual_seed(9)
    h = torch.randn(n, k, generator=g).to(torch.bfloat16)
    w = (torch.randn(vp, k, generator=g) * 0.8).to(torch.bfloat16)
    t = torch.randint(0, v, (n,), generator=g)
    args = (h.to(DEV), w.to(DEV), t.to(DEV), v)
    e0, _ = G.exp_logits(*args, config=config, kernel=True)
    e1, s1 = G.exp_logits(*args, config=config, kernel=True, offset2=o)
    e0, e1, s1 = e0.double().cpu(), e1.double().cpu(), s1.double().cpu()
    z = h.double() @ w.double().t()
    gap = (z - z.gather(1, t[:, None])) * G.LOG2E  # log2 exp(z - z_t), the bound on log2 p/p_t the floor uses
    real = torch.arange(vp)[None, :] < v
    not_t = torch.ones(n, vp, dtype=torch.bool)
    not_t[torch.arange(n), t] = False
    below = (gap < floor) & real & not_t
    near = (gap - floor).abs() < 2 ** -10  # the kernel's fp32 exponent may round either side of the floor
    kept = ~below & ~near & real & not_t
    assert below.float().mean() > 0.1 and kept.float().mean() > 0.1  # the floor bites, and keeps the large ones
    if DEV == "cuda":
        assert (e1[below & ~near] == 0).all()
    else:
        assert (e1[below & ~near] < 2.0 ** -126).all()
    torch.testing.assert_close(e1[kept] * 2.0 ** (o - G.OFFSET2), e0[kept], rtol=2 ** -7, atol=0)
    p = torch.softmax(z[:, :v], 1)
    assert (p[(below & ~near)[:, :v]] < 2.0 ** floor).all()  # what the floor zeroes lies under 2^F
    # the torch path (CPU training) flushes as the GPU does, and sums what it keeps
    e_cpu, s_cpu = G.exp_logits(h, w, t, v, kernel=False, offset2=o)
    assert ((e_cpu == 0) != ~(kept | near)).logical_and(~near).sum() == 0
    want = torch.where(kept | near, torch.exp2(gap - o), torch.zeros(())).masked_fill(~real | ~not_t, 0).sum(1)
    torch.testing.assert_close(s_cpu.double(), want, rtol=1e-4, atol=0)
    extra = s1 - s_cpu.double()  # none on the GPU; the interpreter's subnormals, each under 2^-126
    assert (extra.abs() <= (1e-4 * want if DEV == "cuda" else want * 1e-4 + v * 2.0 ** -126)).all()


def _f64_ce(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, v: int):
    """(loss, grad h, grad w) of the mean cross-entropy over the first v columns, in float64 from h and w as given."""
    hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
    loss = torch.nn.functional.cross_entropy((hr @ wr.t())[:, :v], t)
    loss.backward()
    return loss.detach(), hr.grad, wr.grad


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm())


def test_gemm_head_with_floor_keeps_loss_and_gradients_on_the_torch_path():
    """GemmHeadLoss with --grad-floor -24 (offset 102, W lifted by 2^70 for grad-x) against float64 autograd CE:
    what the floor drops is under 2^-24 of the target's probability, so loss and gradients barely move."""
    from model import head_gemm as G

    n, k, v, vp = 64, 32, 1000, 1024
    g = torch.Generator().manual_seed(3)
    h = torch.randn(n, k, generator=g)
    w = torch.randn(vp, k, generator=g) * 1.5  # logits with std ~8: many values fall under the floor
    w[v:] = 0
    t = torch.randint(0, v, (n,), generator=g)
    ref, gh, gw = _f64_ce(h, w, t, v)
    for floor in (None, -24.0):
        a, b = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = G.GemmHeadLoss.apply(a, b, t, v, floor)
        loss.backward()
        assert abs(float(loss.detach()) - float(ref)) < 1e-5 * float(ref)
        assert _rel(a.grad, gh) < 1e-5 and _rel(b.grad, gw) < 1e-5, (floor, _rel(a.grad, gh))
    e, _ = G.exp_logits(h, w, t, v, kernel=False, offset2=G.offset2_for(-24.0))
    assert (e[:, :v] == 0).float().mean() > 0.05  # the floor did zero a share of the gradient


@pytest.mark.parametrize("spread", [0.5, 2.0, 4.0, 6.0])
def test_gemm_head_bf16_gradients_stay_at_bf16_rounding_as_the_logits_spread(spread):
    """The heads' gradients in bf16 as CUDA runs them, against float64 from the same bf16 operands, targets drawn
    from the model's own softmax: gemm (fp32 logits, E rounded to bf16, floor 2^-24) stays within bf16's rounding
    at every logit spread; the plain head (bf16 logits, fp32 cross-entropy) loses precision as the logits spread
    (their absolute rounding grows), and from a trained model's spread on its error is the larger of the two."""
    from model import head_gemm as G

    n, k, v, vp = 256, 128, 4000, 4096
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, k, generator=g).bfloat16()
    w = (torch.randn(vp, k, generator=g) * spread / k ** 0.5).bfloat16()  # logits with std ~spread
    z = h.double() @ w.double().t()
    t = torch.multinomial(torch.softmax(z[:, :v], 1), 1, generator=g).squeeze(1)
    _, gh, gw = _f64_ce(h, w, t, v)
    a, b = h.float().requires_grad_(), w.float().requires_grad_()
    torch.nn.functional.cross_entropy((a.bfloat16() @ b.bfloat16().t())[:, :v].float(), t).backward()
    plain = max(_rel(a.grad, gh), _rel(b.grad, gw))
    a, b = h.clone().requires_grad_(), w.float().requires_grad_()
    G.GemmHeadLoss.apply(a, b, t, v, -24.0).backward()
    gemm = max(_rel(a.grad, gh), _rel(b.grad, gw))
    assert gemm < 2 ** -8, (spread, gemm)
    if spread >= 4.0:
        assert gemm < plain / 2, (spread, gemm, plain)
    else:
        assert plain < 2 ** -8, (spread, plain)


def test_gemm_head_epilogue_compiles_for_hopper_flushing_exp2_without_64_bit_compares():
    """The logits GEMM compiled for sm_90 (no GPU needed): target ids are compared in 32 bits, which took the
    epilogue's 64-bit compares and sign extensions off every element."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "kernel_sass.py"), "--top", "200"], cwd=root,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "exp2 flushes subnormals: True" in out.stdout  # what --grad-floor's zeros are made of
    line = next(x for x in out.stdout.splitlines() if x.startswith("   "))
    ops = {op: int(n) for op, n in (x.rsplit(" ", 1) for x in line.strip().split(", "))}
    # 128 x 256 outputs over 256 threads: 128 exp2 per thread and tile, bf16 pairs packed for the store
    assert ops["MUFU.EX2"] >= 128 and ops["F2FP.BF16.F32.PACK_AB"] >= 64
    # with int64 ids: 256 ISETP.NE.U32.AND.EX and 130 SHF.R.S32.HI (one per element); now only address arithmetic
    assert ops.get("ISETP.NE.U32.AND.EX", 0) < 16 and ops.get("SHF.R.S32.HI", 0) < 16, ops


# --preset gpt2's shapes: width 768, sequences of 1024 tokens, a vocabulary padded to a multiple of 256. The kernels
# run with the constants training uses (CE_BLOCK/CE_WARPS, GEMM_CONFIG), on few rows so the interpreter keeps up
GPT2_WIDTH, GPT2_ROWS = 768, 1024


def test_ce_kernel_at_gpt2_shapes_with_the_training_block():
    """The CE kernel with training's block and warps over a row longer than one block (unmasked blocks, then the
    padded tail), its logits made from 768-wide bf16 operands as the fused head makes them."""
    from model.config import padded

    n, v = 48, 9000
    vp = padded(v)
    assert vp == 9216 and v > H.CE_BLOCK  # one unmasked block of 8192, then a masked one with padded columns
    g = torch.Generator().manual_seed(21)
    h = torch.randn(n, GPT2_WIDTH, generator=g).to(torch.bfloat16)
    w = (torch.randn(vp, GPT2_WIDTH, generator=g) * 0.1).to(torch.bfloat16)
    t = torch.randint(0, v, (n,), generator=g)
    x = (h.float() @ w.float().t()).to(torch.bfloat16).to(DEV)
    lse, loss_ref, p = _reference(x, t, v)
    scale = 1.0 / GPT2_ROWS  # as one 1024-token sequence's mean
    logits, loss = x.clone(), torch.empty(n, device=DEV)
    H.launch_ce(logits, t.to(DEV), v, scale, loss, H.CE_BLOCK, H.CE_WARPS)
    torch.testing.assert_close(loss.double().cpu(), loss_ref * scale, rtol=2e-6, atol=1e-5 * scale)
    torch.testing.assert_close(logits[:, :v].double().cpu(), p * scale, rtol=2 ** -7, atol=1e-6 * scale)
    assert (logits[:, v:] == 0).all()


@pytest.mark.parametrize("tma", [True, False])  # Hopper's persistent TMA kernel, and the pointer kernel elsewhere
def test_gemm_head_kernel_at_gpt2_shapes_with_the_training_tiles(tma):
    """The logits GEMM with training's tiles over one 1024-token sequence of 768-wide rows and a padded vocabulary
    that ends in a ragged tile: E and the row sums against float64 from the same bf16 operands."""
    from model import head_gemm as G
    from model.config import padded

    n, v = GPT2_ROWS, 1800
    vp = padded(v)
    assert vp == 2048 and vp % G.GEMM_CONFIG["BN"] == 0 and v % G.GEMM_CONFIG["BN"]
    g = torch.Generator().manual_seed(22)
    h = torch.randn(n, GPT2_WIDTH, generator=g).to(torch.bfloat16)
    w = (torch.randn(vp, GPT2_WIDTH, generator=g) * 0.05).to(torch.bfloat16)
    w[v:] = 0  # the padded rows are zero in the model
    t = torch.randint(0, v, (n,), generator=g)
    config = dict(G.GEMM_CONFIG, tma=tma, sms=4 if DEV == "cpu" else None)
    e, s = G.exp_logits(h.to(DEV), w.to(DEV), t.to(DEV), v, config=config, kernel=True)
    z, zt, ref = exp_logits_reference(h, w, t, v)
    torch.testing.assert_close(e.double().cpu(), ref, rtol=2 ** -7, atol=2.0 ** -120)
    torch.testing.assert_close(s.double().cpu(), ref.sum(1), rtol=1e-4, atol=0)
    loss = G.rows_loss(s.cpu()).double()
    torch.testing.assert_close(loss, torch.logsumexp(z[:, :v], 1) - zt.squeeze(1), rtol=1e-5, atol=1e-5)
