"""Training throughput of a preset (seed, gpt2) on one GPU: the project's default step (the trainer's own set-up)
against a plain nanoGPT-style step, side by side, on real shards; `make-data` builds those shards here with the pipeline.
Trade-off: each variant is timed over a few dozen steps after compile, not a whole run (gpu_session.sh's `seed`).

Variants: `default` (model.step's set-up: `--head auto`, its gradient floor, bf16 residual stream and hash dropout on
CUDA, compiled as the trainer compiles), `fused` / `gemm` (the same with that head), `plain` (nanoGPT:
F.cross_entropy, float32 residual stream, torch's dropout, torch.compile of the whole model); `NAME:synthetic` feeds
in-GPU tokens.

    python benchmarks/train_bench.py make-data                # here: docstrings -> parquet -> prepare
    python benchmarks/train_bench.py speed --home benchmarks/out/home --json $OUT/speed.json
    python benchmarks/train_bench.py speed --preset gpt2 --variants plain,default --json $OUT/gpt2.json
    python benchmarks/train_bench.py speed --preset gpt2 --smoke --device cpu --home HOME   # the script's CPU check
    python benchmarks/train_bench.py quality --home benchmarks/out/home --steps 400 --seeds 1,2,3
    python benchmarks/train_bench.py attention --preset gpt2 --micro-batch 16   # each causal attention kernel alone
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model.config import GPTConfig, preset  # noqa: E402
from model.data import Prefetcher, TokenWindows, find_shards  # noqa: E402
from model.evaluate import val_bpb  # noqa: E402
from model.gpt import GPT  # noqa: E402
from model.head import resolve_grad_floor, resolve_head  # noqa: E402
from model.optim import WarmupCosine, make_optimizer  # noqa: E402
from model.runtime import (Dist, accum_steps, device_name, load_tokenizer, measure_peak_tflops,  # noqa: E402
                           resolve_micro_batch)
from model.step import autocast_for, compile_step, prepare_step, train_step  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
VARIANTS = ("default", "plain", "fused", "gemm")
# --smoke: the preset shrunk to run a few steps on the CPU (the script's own check, not a measurement)
SMOKE = dict(n_layer=2, n_embd=64, n_head=2, block_size=64, batch_tokens=512, micro_batch=2)


def make_data(out: Path, vocab: int, val_fraction: float) -> None:
    """Real English text for the GPU runs: docstrings of every installed package, run through the
    project's own pipeline (filter, dedup, BPE, shards). Runs here; the GPU machine lacks Prefect."""
    import ast
    import hashlib
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    # as the Makefile does: on 2 busy cores Prefect's 20 s default for its temporary server is too short
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.prepare import PrepareParams, prepare

    roots = [Path(sys.prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages",
             Path(os.__file__).parent]
    docs = []
    for r in roots:
        for p in sorted(r.rglob("*.py")):
            try:
                tree = ast.parse(p.read_bytes())
            except (SyntaxError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    d = ast.get_docstring(node)
                    if d and len(d) >= 200:
                        docs.append((f"file://{p.relative_to(r)}#{getattr(node, 'name', '')}", d))
    src = out / "src"
    src.mkdir(parents=True, exist_ok=True)
    per = (len(docs) + 3) // 4
    for i in range(4):
        part = docs[i * per:(i + 1) * per]
        ids = [hashlib.md5(u.encode()).hexdigest() for u, _ in part]
        tbl = pa.table({"text": [t for _, t in part], "id": ids, "dump": ["CC-MAIN-2024-10"] * len(part),
                        "url": [u for u, _ in part], "file_path": ["docstrings"] * len(part),
                        "language": ["en"] * len(part), "language_score": [0.9] * len(part),
                        "score": [3.0] * len(part), "token_count": [len(t) // 4 for _, t in part],
                        "int_score": [3] * len(part)})
        pq.write_table(tbl, src / f"{i:03d}_00000.parquet")
    print(f"{len(docs)} documents, {sum(len(t) for _, t in docs) / 1e6:.1f}M characters")
    summary = prepare(PrepareParams(source=str(src), home=str(out / "home"), vocab_size=vocab, val_fraction=val_fraction))
    print({k: v for k, v in summary.items() if k != "table"})


def setup(home: Path, dropout: float | None, name: str = "seed", smoke: bool = False, micro: int | None = None,
          device: torch.device | None = None, batch_tokens: int | None = None):
    """(config, train windows, tokenizer): the preset (shrunk with `smoke`) at `dropout` (None: the preset's),
    its micro-batch `micro` or, unset, the preset's or the one the trainer would choose on `device`."""
    tok, _, vocab = load_tokenizer(home / "tokenizer" / "tokenizer.json")
    given = {"batch_tokens": batch_tokens} if batch_tokens else {}  # over --smoke's too
    cfg = preset(name, vocab).override({"dropout": dropout, "micro_batch": micro, **(SMOKE if smoke else {}), **given})
    if cfg.micro_batch is None:
        resolve_micro_batch(cfg, device or torch.device("cuda"), Dist())
    T = cfg.model.block_size
    return cfg, TokenWindows(find_shards(home / "shards", "train"), T, vocab, "train"), tok


def build(cfg, name: str, device, total_steps: int, grad_floor: str = "auto"):
    """(raw model, the module to step, optimizer, schedule) of variant `name` (see the module's docstring)."""
    if name not in VARIANTS:
        raise SystemExit(f"--variants {name}: expected one of {', '.join(VARIANTS)} (with :synthetic)")
    torch._dynamo.reset()
    torch.manual_seed(cfg.seed)
    mcfg = GPTConfig(**cfg.model.__dict__)
    if name == "plain":
        mcfg.dropout_rng = "torch"
        raw = GPT(mcfg).to(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        model = torch.compile(raw) if device.type == "cuda" else raw
    else:
        mcfg.resolve_dropout_rng(device.type == "cuda")  # as the trainer does
        raw = GPT(mcfg).to(device)
        head = resolve_head("auto" if name == "default" else name, device)
        prepare_step(raw, head, resolve_grad_floor(grad_floor, head, device), device)
        model, _ = compile_step(raw, cfg, device)
    opt = make_optimizer(raw, cfg, device)
    sched = WarmupCosine(opt, cfg.lr, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    return raw, model, opt, sched


def variant(spec: str) -> tuple[str, str]:
    """NAME[:synthetic] -> (name, data)."""
    name, _, data = spec.partition(":")
    return name, data


def sync(device, reset: bool = False) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        if reset:
            torch.cuda.reset_peak_memory_stats()


def speed(args) -> list[dict]:
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    # MFU's denominator measured in this call, on this card (1.0 on the CPU: no such peak, the smoke run only)
    peak = measure_peak_tflops(device) if device.type == "cuda" else 1.0
    print(f"device {device_name(device)} torch {torch.__version__} bf16 matmul peak {peak:.0f} TFLOP/s")
    if args.micro_batch is None:  # chosen once, on the empty GPU, as the trainer would: every variant gets the same
        args.micro_batch = setup(args.home, dropouts(args)[0], args.preset, args.smoke, None, device)[0].micro_batch
        print(f"micro-batch {args.micro_batch} for every variant (the trainer's choice for this preset and device)")
    results = []
    for spec in args.variants.split(","):
        head, data = variant(spec)
        for dropout in dropouts(args):
            cfg, train, _ = setup(args.home, dropout, args.preset, args.smoke, args.micro_batch, device)
            T, micro = cfg.model.block_size, cfg.micro_batch
            accum = accum_steps(cfg, 1)
            raw, model, opt, sched = build(cfg, head, device, 10 ** 6, args.grad_floor)
            params = list(raw.parameters())
            if data == "synthetic":  # in-GPU random tokens: the loader's ceiling
                pool = torch.randint(0, cfg.model.vocab_size, (8, micro, T + 1), device=device)
                it = iter(range(10 ** 9))

                def nb():
                    b = pool[next(it) % 8]
                    return b[:, :-1], b[:, 1:]
                pf = None
            else:
                pf = Prefetcher(train, cfg.seed, micro, 1, 0, accum, 0, device)
                nb = pf.next
            autocast = autocast_for(device)
            sync(device, reset=True)
            t0 = time.perf_counter()
            try:
                for _ in range(args.warmup):
                    sched.apply()
                    loss, _ = train_step(model, params, opt, nb, accum, False, autocast, 1.0)
                    sched.step()
                first_loss = float(loss)
                warm_s = time.perf_counter() - t0
                t1 = time.perf_counter()
                for _ in range(args.steps):
                    sched.apply()
                    loss, _ = train_step(model, params, opt, nb, accum, False, autocast, 1.0)
                    sched.step()
                sync(device)
                dt = time.perf_counter() - t1
            except Exception as e:  # one broken variant (an out-of-memory) must not lose the others' numbers
                raw = model = opt = sched = None  # its memory goes back before the next variant builds
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                print(f"{spec} dropout={dropout}: FAILED {type(e).__name__}: {str(e)[:400]}")
                results.append(dict(variant=spec, dropout=dropout, error=f"{type(e).__name__}: {str(e)[:400]}"))
                continue
            finally:
                if pf:
                    pf.close()
            fpt, mem = raw.flops_per_token(T), torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else 0.0
            raw = model = opt = sched = None  # the next variant starts on an empty GPU
            if device.type == "cuda":
                torch.cuda.empty_cache()
            tps = args.steps * cfg.batch_tokens / dt
            r = dict(variant=spec or "plain", head=head, data=data or "real", dropout=cfg.model.dropout,
                     preset=args.preset, micro_batch=micro, accum=accum, tokens_per_s=tps, step_ms=1000 * dt / args.steps,
                     mfu=tps * fpt / (peak * 1e12), peak_tflops=peak, warmup_s=warm_s, memory_gb=mem,
                     loss_after_warmup=first_loss, loss_end=float(loss))
            results.append(r)
            print(f"{spec:18s} dropout={cfg.model.dropout:<4} {micro}x{T}x{accum} {tps / 1e6:6.3f}M tok/s  {r['step_ms']:6.2f} ms/step  "
                  f"MFU {100 * r['mfu']:5.1f}%  warmup+compile {warm_s:5.1f}s  mem {r['memory_gb']:5.1f} GB  "
                  f"loss {first_loss:.3f}->{r['loss_end']:.3f}", flush=True)
            del raw, model, opt
    return results + ratios(results)


def dropouts(args) -> list[float | None]:
    return [float(x) for x in args.dropouts.split(",")] if args.dropouts else [None]


def ratios(results: list[dict]) -> list[dict]:
    """Each variant's tokens/s over the plain step's at the same dropout, measured in the same call."""
    plain = {r["dropout"]: r["tokens_per_s"] for r in results if r.get("variant") == "plain" and "tokens_per_s" in r}
    out = []
    for r in results:
        base = plain.get(r.get("dropout"))
        if base and r.get("variant") != "plain" and "tokens_per_s" in r:
            out.append(dict(ratio=f"{r['variant']}/plain", dropout=r["dropout"], value=r["tokens_per_s"] / base))
            print(f"{r['variant']} / plain at dropout {r['dropout']}: {out[-1]['value']:.3f}x tokens/s", flush=True)
    return out


def quality(args) -> list[dict]:
    """Equal tokens, same data: each variant trained `steps` from each seed, then its loss and bpb over the whole
    val split (every token once, the trainer's own measure); per variant the mean and spread over the seeds, and
    each variant's mean against the plain step's with the standard error of that difference."""
    device = torch.device(args.device)
    # one set-up for every run: the same windows, and one micro-batch (given, or the trainer's choice, which divides
    # the step's sequences) for all of them
    cfg, train, tok = setup(args.home, dropouts(args)[0], args.preset, args.smoke, args.micro_batch, device,
                            args.batch_tokens)
    results = []
    for seed in [int(x) for x in args.seeds.split(",")] if args.seeds else [None]:
        for head in args.variants.split(","):
            results.append(train_and_score(args, cfg.override({"seed": seed}), train, head, tok, device))
    return results + seed_summary(results)


def train_and_score(args, cfg, train, head: str, tok, device) -> dict:
    micro = cfg.micro_batch
    accum = accum_steps(cfg, 1)
    raw, model, opt, sched = build(cfg, head, device, args.steps, args.grad_floor)
    pf = Prefetcher(train, cfg.seed, micro, 1, 0, accum, 0, device)
    autocast = autocast_for(device)
    t0 = time.perf_counter()
    losses = []
    for _ in range(args.steps):
        sched.apply()
        loss, _ = train_step(model, list(raw.parameters()), opt, pf.next, accum, False, autocast, 1.0)
        sched.step()
        losses.append(loss)
    pf.close()
    v = val_bpb(raw, tok, find_shards(args.home / "shards", "val"), batch_size=micro)
    tl = torch.stack(losses[-20:]).mean().item()
    r = dict(head=head, seed=cfg.seed, steps=args.steps, batch_tokens=cfg.batch_tokens, micro_batch=micro,
             tokens=args.steps * cfg.batch_tokens, val_loss=v["loss"], val_bpb=v["bpb"], val_tokens=v["n_tokens"],
             train_loss_last20=tl, train_loss_every_100=[round(float(x), 4) for x in losses[99::100]],
             seconds=time.perf_counter() - t0)
    print(f"quality {head:9s} seed {cfg.seed} {args.steps} steps: val {v['loss']:.4f} (bpb {v['bpb']:.4f}, "
          f"{v['n_tokens']:,} tokens) train(last 20) {tl:.4f} ({r['seconds']:.0f}s incl. compile and eval)", flush=True)
    return r


def seed_summary(runs: list[dict]) -> list[dict]:
    """Per variant: mean and sample standard deviation of the val loss over its seeds; against plain: the
    difference of the means and its standard error (None with a single run on either side)."""
    by: dict[str, list[float]] = {}
    for r in runs:
        by.setdefault(r["head"], []).append(r["val_loss"])
    stats = {h: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else None, len(v)) for h, v in by.items()}
    out = []
    for h, (mean, sd, n) in stats.items():
        row = dict(summary=h, runs=n, val_loss_mean=mean, val_loss_sd=sd)
        if "plain" in stats and h != "plain":
            pm, psd, pn = stats["plain"]
            row["minus_plain"] = mean - pm
            row["minus_plain_se"] = (sd ** 2 / n + psd ** 2 / pn) ** 0.5 if sd is not None and psd is not None else None
        out.append(row)
        se = row.get("minus_plain_se")
        print(f"{h:9s} {n} run(s): val {mean:.4f}" + (f" ± {sd:.4f}" if sd is not None else "")
              + (f", {row['minus_plain']:+.4f} against plain" if "minus_plain" in row else "")
              + (f" (standard error {se:.4f})" if se is not None else ""), flush=True)
    return out


def micro(args) -> list[dict]:
    """The output layer's pieces alone at the seed shape: the bf16 matmuls and the CE kernel."""
    import triton.testing as tt

    import model.head as H

    dev = torch.device("cuda")
    n, c, vp, v = 65536, 512, 49152, 48951
    h = torch.randn(n, c, device=dev, dtype=torch.bfloat16)
    w = torch.randn(vp, c, device=dev, dtype=torch.bfloat16) * 0.02
    g = torch.randn(n, vp, device=dev, dtype=torch.bfloat16) * 1e-5
    t = torch.randint(0, v, (n,), device=dev)
    flops = 2 * n * c * vp
    out = []

    def rec(name, ms, nflop=0, nbytes=0):
        r = dict(name=name, ms=ms, tflops=nflop / ms / 1e9 if nflop else None, gbps=nbytes / ms / 1e6 if nbytes else None)
        out.append(r)
        print(f"{name:34s} {ms:7.3f} ms" + (f"  {r['tflops']:6.0f} TFLOP/s" if nflop else "")
              + (f"  {r['gbps']:6.0f} GB/s" if nbytes else ""), flush=True)

    rec("copy 2 GiB", tt.do_bench(torch.empty(2 * 2 ** 30, device=dev, dtype=torch.uint8).clone,
                                  return_mode="median"), nbytes=4 * 2 ** 30)
    rec("logits h@W^T bf16", tt.do_bench(lambda: h @ w.t(), return_mode="median"), flops)
    rec("grad_x dlogits@W bf16", tt.do_bench(lambda: g @ w, return_mode="median"), flops)
    rec("grad_W dlogits^T@h bf16", tt.do_bench(lambda: g.t() @ h, return_mode="median"), flops)
    best = (H.CE_BLOCK, H.CE_WARPS, 1e9)
    logits = torch.randn(n, vp, device=dev, dtype=torch.bfloat16)
    for blk, nw in [(4096, 8), (8192, 16), (8192, 32), (16384, 32), (4096, 16)]:
        H.CE_BLOCK, H.CE_WARPS = blk, nw
        ms = tt.do_bench(lambda: H.ce_grad_inplace(logits, t, v, 1.0 / n), return_mode="median")
        rec(f"CE bf16 in place BLOCK={blk} warps={nw}", ms, nbytes=2 * n * vp * 2)
        best = min(best, (blk, nw, ms), key=lambda b: b[2])
    H.CE_BLOCK, H.CE_WARPS = best[0], best[1]
    print(f"chosen: bf16 CE BLOCK={best[0]} warps={best[1]}")
    # correctness at the real vocabulary on fresh random inputs, against float64
    m = 2048
    hh = torch.randn(m, c, device=dev, dtype=torch.float64)
    ww = torch.randn(vp, c, device=dev, dtype=torch.float64) * 0.05
    tt_ = torch.randint(0, v, (m,), device=dev)
    hr, wr = hh.clone().requires_grad_(), ww.clone().requires_grad_()
    col = torch.arange(vp, device=dev)
    ref = torch.nn.functional.cross_entropy((hr @ wr.t()).masked_fill(col >= v, float("-inf")), tt_)
    ref.backward()
    for name, fn in [("fused", lambda a, b: H.FusedHeadLoss.apply(a, b, tt_, v))]:
        a, b = hh.float().requires_grad_(), ww.float().requires_grad_()
        loss = fn(a, b)
        loss.backward()
        loss = loss.detach()
        e = lambda x, y: float((x.double() - y).norm() / y.norm())
        r = dict(name=f"check {name}", loss_rel=abs(float(loss) - float(ref)) / float(ref),
                 grad_h_rel=e(a.grad, hr.grad), grad_w_rel=e(b.grad, wr.grad))
        out.append(r)
        print(f"check {name:7s} loss rel {r['loss_rel']:.2e}  grad_h rel {r['grad_h_rel']:.2e}  "
              f"grad_W rel {r['grad_w_rel']:.2e}", flush=True)
    out.append(dict(name="chosen", ce_block=best[0], ce_warps=best[1]))
    return out


def attention(args) -> list[dict]:
    """Causal attention alone at the preset's shape, forward and backward: each SDPA backend torch has here, and
    compiled flex_attention; TFLOP/s count the causal half only (the convention FlashAttention's papers use)."""
    import triton.testing as tt
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev = torch.device("cuda")
    m = preset(args.preset, 48_951).model
    b, h, t, d = args.micro_batch or 16, m.n_head, m.block_size, m.n_embd // m.n_head
    q, k, v = (torch.randn(b, h, t, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    go = torch.randn(b, h, t, d, device=dev, dtype=torch.bfloat16)
    fwd_flop = 4 * b * h * t * t * d / 2
    mask = create_block_mask(lambda _b, _h, qi, ki: qi >= ki, None, None, t, t, device=dev)
    flex = torch.compile(flex_attention)
    runs = [(n.lower(), lambda n=n: sdpa_kernel(getattr(SDPBackend, n))) for n in
            ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION")]
    out = []
    for name, ctx in runs + [("flex", None)]:  # flex: no context, the compiled function itself
        def fwd():
            if ctx is None:
                return flex(q, k, v, block_mask=mask)
            with ctx():
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        try:
            f_ms = tt.do_bench(fwd, return_mode="median")
            fb_ms = tt.do_bench(lambda: torch.autograd.grad(fwd(), (q, k, v), go), return_mode="median")
        except RuntimeError as e:  # a backend torch was built without, or one that refuses this shape
            print(f"attention {name:20s} unavailable: {str(e).splitlines()[0][:160]}")
            continue
        r = dict(name=name, shape=[b, h, t, d], fwd_ms=f_ms, fwd_bwd_ms=fb_ms, fwd_tflops=fwd_flop / f_ms / 1e9,
                 fwd_bwd_tflops=3.5 * fwd_flop / fb_ms / 1e9)
        out.append(r)
        print(f"attention {name:20s} {b}x{h}x{t}x{d}: forward {f_ms:6.3f} ms ({r['fwd_tflops']:4.0f} TFLOP/s), "
              f"forward+backward {fb_ms:6.3f} ms ({r['fwd_bwd_tflops']:4.0f} TFLOP/s)", flush=True)
    return out


def profile(args) -> list[dict]:
    """Where one step's GPU time goes: the top kernels over 5 steps of each variant."""
    from torch.profiler import ProfilerActivity, profile as prof

    device = torch.device("cuda")
    for spec in args.variants.split(","):
        dropout = dropouts(args)[0]
        head, _ = variant(spec)
        cfg, train, _ = setup(args.home, dropout, args.preset, args.smoke, args.micro_batch, device)
        micro = cfg.micro_batch
        raw, model, opt, sched = build(cfg, head, device, 10 ** 6)
        pf = Prefetcher(train, cfg.seed, micro, 1, 0, 1, 0, device)
        autocast, params = autocast_for(device), list(raw.parameters())
        for _ in range(args.warmup):
            train_step(model, params, opt, pf.next, 1, False, autocast, 1.0)
        sync(device)
        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for _ in range(5):
                train_step(model, params, opt, pf.next, 1, False, autocast, 1.0)
            sync(device)
        pf.close()
        print(f"=== {spec} dropout={dropout}: 5 steps")
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=int(args.steps)))
        (args.out / f"profile_{spec}.txt").write_text(p.key_averages().table(sort_by="cuda_time_total", row_limit=80))
        trace = args.out / f"trace_{spec}.json"
        p.export_chrome_trace(str(trace))
        gpu_gaps(trace)
    return []


def gpu_gaps(trace: Path, top: int = 12) -> None:
    """Is the GPU ever idle within the profiled steps? Busy time against the span, and the largest gaps
    with the kernels around them and the CUDA runtime calls the host made meanwhile (a sync shows here)."""
    ev = json.loads(trace.read_text())["traceEvents"]
    ks = sorted((e for e in ev if e.get("cat") == "kernel" or e.get("cat") == "gpu_memcpy"), key=lambda e: e["ts"])
    rt = [e for e in ev if e.get("cat") == "cuda_runtime" and e.get("dur", 0) > 50]
    if not ks:
        print("no kernels in the trace")
        return
    span = ks[-1]["ts"] + ks[-1]["dur"] - ks[0]["ts"]
    busy, end, gaps = 0.0, ks[0]["ts"], []
    for a, b in zip(ks, ks[1:] + [None]):
        s0, e0 = max(a["ts"], end), a["ts"] + a["dur"]
        busy += max(0.0, e0 - s0)
        end = max(end, e0)
        if b is not None and b["ts"] > end:
            gaps.append((b["ts"] - end, end, a["name"][:50], b["name"][:50]))
    print(f"GPU busy {busy / 1e3:.2f} ms of a {span / 1e3:.2f} ms span ({100 * busy / span:.1f} %), "
          f"{len(gaps)} gaps, {sum(g[0] for g in gaps) / 1e3:.2f} ms idle")
    for g, at, before, after in sorted(gaps, reverse=True)[:top]:
        calls = sorted({e["name"] for e in rt if e["ts"] < at + g and e["ts"] + e["dur"] > at})
        print(f"  gap {g / 1e3:6.3f} ms after {before!r} before {after!r}; host in: {', '.join(calls)[:160]}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["make-data", "speed", "quality", "micro", "attention", "profile"],
                   help="make-data: shards here; speed: step rate; quality: val loss at equal tokens; micro: the "
                        "output layer's pieces; attention: each attention kernel alone; profile: top kernels and "
                        "GPU gaps")
    p.add_argument("--home", type=Path, default=OUT / "home", help="home with shards and tokenizer (default: %(default)s)")
    p.add_argument("--out", type=Path, default=OUT, help="make-data's and profile's output folder (default: %(default)s)")
    p.add_argument("--vocab", type=int, default=48_951, help="make-data's BPE vocabulary (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="make-data's share of documents held out for validation (default: %(default)s)")
    p.add_argument("--variants", default="plain,default,default:synthetic",
                   help=f"comma-separated: {', '.join(VARIANTS)}, each optionally NAME:synthetic")
    p.add_argument("--dropouts", help="comma-separated dropout rates (default: the preset's)")
    p.add_argument("--steps", type=int, default=30, help="timed steps (quality: trained steps) (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps first, compile included (default: %(default)s)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--device", default="cuda", help="cpu only to dry-run the script (with --preset tiny)")
    p.add_argument("--preset", default="seed", help="the trainer's preset: seed, tiny or gpt2 (default: %(default)s)")
    p.add_argument("--micro-batch", type=int, help="sequences per forward pass, the same for every variant; "
                                                   "batch-tokens is kept by accumulation (default: the preset's, "
                                                   "or the trainer's choice from the free memory)")
    p.add_argument("--grad-floor", default="auto", help="the head's gradient floor for every variant but plain: "
                   "auto (the trainer's), off, or a number (default: %(default)s)")
    p.add_argument("--batch-tokens", type=int, help="quality: tokens per optimizer step for every variant "
                   "(default: the preset's)")
    p.add_argument("--seeds", help="quality: comma-separated seeds (initialisation and data order), each variant "
                   "trained from each (default: the preset's seed)")
    p.add_argument("--smoke", action="store_true", help="the preset shrunk to a few tiny steps (a CPU check of the "
                                                        "script, not a measurement)")
    p.add_argument("--tuned", type=Path, help="micro's JSON: use the kernel tile sizes it chose")
    p.add_argument("--gemm-config", type=Path, help="head_bench --gemm-best's JSON: --head gemm's tile configuration")
    args = p.parse_args()
    if args.tuned and args.tuned.exists():
        import model.head as H
        chosen = next(r for r in json.loads(args.tuned.read_text())["results"] if r["name"] == "chosen")
        H.CE_BLOCK, H.CE_WARPS = chosen["ce_block"], chosen["ce_warps"]
        print(f"tuned tiles: {chosen}")
    if args.gemm_config and args.gemm_config.exists():
        import model.head_gemm as G
        G.GEMM_CONFIG.update(json.loads(args.gemm_config.read_text()))
        print(f"gemm tiles: {G.GEMM_CONFIG}")
    if args.mode == "make-data":
        make_data(args.out, args.vocab, args.val_fraction)
        return 0
    res = dict(speed=speed, quality=quality, micro=micro, attention=attention, profile=profile)[args.mode](args)
    if args.json:
        args.json.write_text(json.dumps(dict(device=device_name(torch.device(args.device)), torch=torch.__version__,
                                             date=time.strftime("%Y-%m-%d"), results=res), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
