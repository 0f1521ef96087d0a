"""Training throughput of the seed model on one GPU: the plain compiled step against the fused/FP8
output layer, side by side, on real shards; `make-data` builds those shards here with the pipeline.
Trade-off: each variant is timed over a few dozen steps after compile, not a whole run (see `seed`).

    python benchmarks/train_bench.py make-data                # here: docstrings -> parquet -> prepare
    python benchmarks/train_bench.py speed --home benchmarks/out/home --json $OUT/speed.json
    python benchmarks/train_bench.py quality --home benchmarks/out/home --steps 400
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

from model.config import GPTConfig, preset  # noqa: E402
from model.data import Prefetcher, TokenWindows, find_shards  # noqa: E402
from model.gpt import GPT  # noqa: E402
from model.head import make_head_loss  # noqa: E402
from model.optim import WarmupCosine, make_optimizer  # noqa: E402
from model.runtime import device_name, load_tokenizer, measure_peak_tflops  # noqa: E402
from model.step import autocast_for, train_step  # noqa: E402

OUT = ROOT / "benchmarks" / "out"


def make_data(out: Path, vocab: int) -> None:
    """Real English text for the GPU runs: docstrings of every installed package, run through the
    project's own pipeline (filter, dedup, BPE, shards). Runs here; the GPU machine lacks Prefect."""
    import ast
    import hashlib
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

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
    summary = prepare(PrepareParams(source=str(src), home=str(out / "home"), vocab_size=vocab, val_fraction=0.005))
    print({k: v for k, v in summary.items() if k != "table"})


def setup(home: Path, dropout: float, name: str = "seed"):
    tok, _, vocab = load_tokenizer(home / "tokenizer" / "tokenizer.json")
    cfg = preset(name, vocab).override({"dropout": dropout})
    T = cfg.model.block_size
    train = TokenWindows(find_shards(home / "shards", "train"), T, vocab, "train")
    val = TokenWindows(find_shards(home / "shards", "val"), T, vocab, "val")
    return cfg, train, val


def build(cfg, head: str, device, total_steps: int):
    torch._dynamo.reset()
    torch.manual_seed(cfg.seed)
    raw = GPT(GPTConfig(**cfg.model.__dict__)).to(device)
    raw.head_loss = make_head_loss(head)
    model = torch.compile(raw) if device.type == "cuda" else raw
    opt = make_optimizer(raw, cfg, device)
    sched = WarmupCosine(opt, cfg.lr, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    return raw, model, opt, sched


def sync(device, reset: bool = False) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        if reset:
            torch.cuda.reset_peak_memory_stats()


def speed(args) -> list[dict]:
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = measure_peak_tflops(device) if device.type == "cuda" else 1.0
    print(f"device {device_name(device)} torch {torch.__version__} bf16 matmul peak {peak:.0f} TFLOP/s")
    results = []
    for spec in args.variants.split(","):
        head, _, data = spec.partition(":")
        for dropout in [float(x) for x in args.dropouts.split(",")]:
            cfg, train, _ = setup(args.home, dropout, args.preset)
            T, micro = cfg.model.block_size, cfg.micro_batch
            accum = cfg.batch_tokens // (micro * T)
            raw, model, opt, sched = build(cfg, head, device, 10 ** 6)
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
            except Exception as e:  # one broken variant must not lose the others' numbers
                print(f"{spec} dropout={dropout}: FAILED {type(e).__name__}: {str(e)[:400]}")
                results.append(dict(variant=spec, dropout=dropout, error=f"{type(e).__name__}: {str(e)[:400]}"))
                continue
            finally:
                if pf:
                    pf.close()
            tps = args.steps * cfg.batch_tokens / dt
            r = dict(variant=spec or "plain", head=head, data=data or "real", dropout=dropout,
                     tokens_per_s=tps, step_ms=1000 * dt / args.steps,
                     mfu=tps * raw.flops_per_token(T) / (peak * 1e12), peak_tflops=peak,
                     warmup_s=warm_s, memory_gb=torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else 0.0,
                     loss_after_warmup=first_loss, loss_end=float(loss))
            results.append(r)
            print(f"{spec:18s} dropout={dropout:<4} {tps / 1e6:6.3f}M tok/s  {r['step_ms']:6.2f} ms/step  "
                  f"MFU {100 * r['mfu']:5.1f}%  warmup+compile {warm_s:5.1f}s  mem {r['memory_gb']:5.1f} GB  "
                  f"loss {first_loss:.3f}->{r['loss_end']:.3f}", flush=True)
            del raw, model, opt
    return results


def quality(args) -> list[dict]:
    """Equal tokens, same data and seed: val loss after `steps` for each head."""
    device = torch.device(args.device)
    results = []
    for head in args.variants.split(","):
        cfg, train, val = setup(args.home, float(args.dropouts.split(",")[0]), args.preset)
        T, micro = cfg.model.block_size, cfg.micro_batch
        accum = cfg.batch_tokens // (micro * T)
        raw, model, opt, sched = build(cfg, head, device, args.steps)
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
        vb = torch.from_numpy(val.fixed(20 * micro))
        raw.head_loss = make_head_loss("fused")  # the same evaluation for every variant
        raw.eval()
        with torch.no_grad(), autocast():
            vl = sum(float(raw(b[:, :-1].to(device), b[:, 1:].to(device))) * b.size(0)
                     for b in vb.split(micro)) / vb.size(0)
        tl = torch.stack(losses[-20:]).mean().item()
        r = dict(head=head, steps=args.steps, tokens=args.steps * cfg.batch_tokens, val_loss=vl,
                 train_loss_last20=tl, seconds=time.perf_counter() - t0)
        print(f"quality {head:6s} {args.steps} steps: val {vl:.4f} train(last 20) {tl:.4f} "
              f"({r['seconds']:.0f}s incl. compile)", flush=True)
        results.append(r)
        del raw, model, opt
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["make-data", "speed", "quality"])
    p.add_argument("--home", type=Path, default=OUT / "home")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--vocab", type=int, default=48_951)
    p.add_argument("--variants", default="plain,fused,fp8,fp8:synthetic")
    p.add_argument("--dropouts", default="0.1,0.0")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--json", type=Path)
    p.add_argument("--device", default="cuda", help="cpu only to dry-run the script (with --preset tiny)")
    p.add_argument("--preset", default="seed")
    args = p.parse_args()
    if args.mode == "make-data":
        make_data(args.out, args.vocab)
        return 0
    res = speed(args) if args.mode == "speed" else quality(args)
    if args.json:
        args.json.write_text(json.dumps(dict(device=device_name(torch.device(args.device)), torch=torch.__version__,
                                             date=time.strftime("%Y-%m-%d"), results=res), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
