"""The training loop, runnable alone as `python -m model.train` (or under torchrun) with torch + numpy.
Rank 0 appends one metrics row per step to the run's JSONL and prints JSON events on stdout for the
parent; on CUDA the host syncs only every `log_every` steps, so rows arrive in small bursts."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from model import args as cli_args
from model import checkpoint as ckpts
from model import runtime as rt
from model.data import Prefetcher, TokenWindows, load_shard_list
from model.gpt import GPT
from model.head import make_head_loss, resolve_grad_floor, resolve_head
from model.optim import WarmupCosine, make_optimizer
from model.sampler import BackgroundSampler
from model.step import autocast_for, train_step
from storage.paths import Home

EXIT_BAD_INPUT, EXIT_NAN, EXIT_OOM, EXIT_CKPT = 2, 3, 4, 5


class NonFiniteLoss(RuntimeError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.train", description="train the LangPWT GPT")
    p.add_argument("--home", help="state folder (default $LANGPWT_HOME or ./.langpwt)")
    p.add_argument("--run-id", help="run folder name under HOME/runs (default: preset-timestamp)")
    p.add_argument("--resume", action="store_true", help="continue the newest run (or --run-id)")
    p.add_argument("--shard-list", type=Path, help="JSON {train: [...], val: [...]} (default: glob HOME/shards)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json (default HOME/tokenizer/tokenizer.json)")
    cli_args.add_config_args(p)
    return p


def evaluate(model: GPT, val: torch.Tensor, micro: int, device, autocast) -> float:
    was = model.training
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad(), autocast():
        for i in range(0, val.size(0), micro):
            b = val[i:i + micro].to(device)
            total += float(model(b[:, :-1], b[:, 1:])) * b.size(0)
            n += b.size(0)
    model.train(was)
    return total / max(n, 1)


def train(ns: argparse.Namespace) -> int:
    home = Home.from_env(ns.home)
    startup = {"imports": rt.process_age_s()}  # where start-up goes, in seconds since the process began
    d = rt.setup_dist()
    tok_path = ns.tokenizer or home.tokenizer
    tok, tok_sha, tok_vocab = rt.load_tokenizer(tok_path)
    cfg, run_id, resume_from = rt.resolve_config(ns, home, tok_vocab, tok_sha, tok_path)
    device = rt.pick_device(cfg.device, d)
    cfg.model.resolve_dropout_rng(device.type == "cuda")
    startup["config"] = rt.process_age_s()
    if device.type != "cuda":  # FP8 matmuls and Triton kernels; LayerNorm's fp32 weights meet bf16 only under autocast
        if cfg.head in ("fp8", "fp8all"):
            raise ValueError(f"--head {cfg.head} needs CUDA (FP8 matmuls); use fused, plain or auto on CPU")
        if cfg.stream_dtype == "bfloat16":
            raise ValueError("--stream-dtype bfloat16 needs CUDA (bf16 autocast); use float32 or auto on CPU")
    is_cuda = device.type == "cuda"
    # fp8 is faster still, but its val loss trailed the plain step's at equal tokens (RESULTS.md)
    head = resolve_head(cfg.head, device)
    grad_floor = resolve_grad_floor(cfg.grad_floor, head, device)  # before the run folder exists, as above
    run_dir = home.run_dir(run_id)
    emit = rt.Emitter(run_dir, d.rank == 0)
    T, micro = cfg.model.block_size, cfg.micro_batch
    accum = rt.accum_steps(cfg, d.world)

    shards = load_shard_list(ns.shard_list, home.shards)
    train_w = TokenWindows(shards["train"], T, cfg.model.vocab_size, "train")
    val_w = TokenWindows(shards["val"], T, cfg.model.vocab_size, "val")
    val = torch.from_numpy(val_w.fixed(cfg.eval_batches * micro))
    startup["data"] = rt.process_age_s()

    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
    # the weights drawn where they will live: on the H200's host the CPU's init of the seed model took ~1.1 s of
    # start-up, the CUDA context ~0.15 s (RESULTS.md, twelfth pass); on CUDA from its generator
    with torch.device(device):
        raw = GPT(cfg.model)
    startup["model"] = rt.process_age_s()  # on CUDA: the context's creation and the weights' init
    opt = make_optimizer(raw, cfg, device)
    sched = WarmupCosine(opt, cfg.lr, cfg.warmup_steps, cfg.schedule_steps or cfg.max_steps, cfg.min_lr_ratio)
    start = 0
    best = None
    torch.manual_seed(cfg.seed + d.rank)
    if resume_from is not None:
        st = ckpts.load_train_state(resume_from, map_location=device)
        raw.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["state"]["scheduler"])
        start, best = int(st["state"]["step"]), st["state"].get("best_val")
        rt.set_rng(st["state"]["rng"], d.rank, cfg.seed, start)
    # --dropout-rng hash: seeds from (seed, rank) and the forwards already taken, so a resumed run goes on as one
    raw.reseed_dropout(cfg.seed * 2654435761 + d.rank * 97_000_003, start * accum)
    if is_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    stream = cfg.stream_dtype if cfg.stream_dtype != "auto" else ("bfloat16" if is_cuda else "float32")
    raw.stream_dtype = torch.bfloat16 if stream == "bfloat16" else None
    train_head = raw.head_loss = make_head_loss(head, grad_floor)  # one object: compile guards on its identity
    eval_head = make_head_loss("fused" if is_cuda else "plain")
    startup["head"] = rt.process_age_s()  # on CUDA: Triton and Dynamo imported
    model = raw
    caches = rt.use_compile_cache(home.compile_cache) if is_cuda else {}  # Triton runs uncompiled too
    scope = cfg.resolved_compile_scope if (is_cuda and cfg.compile) else None
    if scope:
        rt.tune_inductor(cfg.model.dropout)
        if scope == "regions":
            raw.compile_regions()
        else:
            model = torch.compile(raw)
    startup["compile_setup"] = rt.process_age_s()
    if d.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # no buffer broadcast: the model's only buffers are hash dropout's seeds, which differ by rank on purpose
        model = DDP(model, device_ids=[d.local_rank] if is_cuda else None, broadcast_buffers=False)
    autocast = autocast_for(device)
    params = list(raw.parameters())
    peak = cfg.peak_tflops or (rt.measure_peak_tflops(device) if is_cuda else None)
    startup["peak_probe"] = rt.process_age_s()
    flops_tok = raw.flops_per_token(T)
    step_tokens = micro * T * accum * d.world
    prompt_ids = tok.encode(cfg.sample_prompt).ids if tok is not None else [0]

    emit.event("start", run_id=run_id, run_dir=str(run_dir), step=start, max_steps=cfg.max_steps,
               device=rt.device_name(device), world=d.world, accum=accum, head=head, grad_floor=grad_floor,
               stream_dtype=stream, compile=scope or False, peak_tflops=peak, params=raw.num_params(),
               tokenizer_sha256=tok_sha, config=cfg.to_dict(), resumed_from=str(resume_from) if resume_from else None,
               process_s=rt.process_age_s(), startup_s=startup, compile_cache=caches)
    if d.rank == 0:
        rt.write_run_config(run_dir, cfg, run_id, tok_sha)
    emit.say(f"run {run_id}: {raw.num_params() / 1e6:.1f}M params, {rt.device_name(device)} x{d.world}, "
             f"{step_tokens} tokens/step ({micro}x{T}x{accum} accum x{d.world} ranks), head={head}")

    # seconds outside the steps, for the `done` event: what the seed run's wall clock spends besides training
    spent = dict(eval=0.0, sample=0.0, checkpoint=0.0, final_wait=0.0)
    pf = Prefetcher(train_w, cfg.seed, micro, d.world, d.rank, accum, start, device)
    pending: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []
    t_window, t0 = time.perf_counter(), time.perf_counter()
    last_ckpt = ckpts.latest(ckpts.checkpoint_root(home, run_id))
    saver = ckpts.BackgroundSaver(cfg.keep_last)  # the loop goes on while a checkpoint is written
    # and while each evaluation's text sample is drawn (on CUDA; in line on the CPU)
    sampler = BackgroundSampler(raw, lambda ids: tok.decode(ids) if tok is not None else "", prompt_ids,
                                cfg.sample_tokens if tok is not None else 0, background=is_cuda)

    def landed(done: list) -> None:
        nonlocal last_ckpt
        for info, removed in done:
            last_ckpt = info
            emit.event("checkpoint", **info.to_dict(), removed=removed)

    def flush() -> None:
        nonlocal t_window
        if not pending:
            return
        vals = torch.stack([torch.stack([l, g]) for _, l, g, _ in pending]).float().tolist()
        now = time.perf_counter()
        tps = step_tokens * len(pending) / max(now - t_window, 1e-9)
        mem = rt.memory_gb(device)
        rows = []
        for (s, _, _, lr), (loss, gnorm) in zip(pending, vals):
            rows.append(dict(step=s, train_loss=loss, lr=lr, grad_norm=gnorm, tokens_per_s=tps,
                             mfu=(tps * flops_tok / (peak * 1e12 * d.world)) if peak else None,
                             memory_gb=mem, tokens=s * step_tokens, elapsed_s=now - t0))
        pending.clear()
        t_window = now
        emit.rows(rows)
        bad = next((r for r in rows if not rt.finite(r["train_loss"]) or not rt.finite(r["grad_norm"])), None)
        if bad:
            raise NonFiniteLoss(f"step {bad['step']}: loss {bad['train_loss']}, grad norm {bad['grad_norm']}")
        last = rows[-1]
        if d.rank == 0 and (last["step"] % max(cfg.log_every, 1) == 0 or last["step"] == cfg.max_steps):
            emit.event("step", **last)

    try:
        for it in range(start, cfg.max_steps):
            step = it + 1
            lr = sched.apply()
            loss_acc, gnorm = train_step(model, params, opt, pf.next, accum, d.ddp, autocast, cfg.grad_clip)
            sched.step()
            pending.append((step, loss_acc, gnorm, lr))
            if it == start:  # one sync: how long start-up and the compile took, apart from the steps
                if is_cuda:
                    torch.cuda.synchronize(device)
                emit.event("first_step", step=step, seconds=time.perf_counter() - t0, process_s=rt.process_age_s())
            landed(saver.poll())
            do_eval = step % cfg.eval_every == 0 or step == cfg.max_steps
            do_ckpt = step % cfg.ckpt_every == 0 or step == cfg.max_steps
            if step % cfg.log_every == 0 or do_eval or do_ckpt or not is_cuda:
                flush()
            if d.rank == 0 and (do_eval or do_ckpt):
                val_loss = None
                t_out = time.perf_counter()
                if do_eval:
                    sampler.wait()  # the previous sample's event first: evals reach the parent in order
                    raw.head_loss = eval_head
                    val_loss = evaluate(raw, val, micro, device, autocast)
                    raw.head_loss = train_head
                    best = val_loss if best is None else min(best, val_loss)
                    t_eval = time.perf_counter()
                    spent["eval"] += t_eval - t_out
                    sampler.submit(raw, cfg.seed + step,
                                   lambda text, s=step, v=val_loss: emit.eval_row(s, v, cfg.sample_prompt, text))
                    spent["sample"] += time.perf_counter() - t_eval  # on CUDA: the weights' copy, the thread's start
                t_ckpt = time.perf_counter()
                if do_ckpt:  # the state is copied now (on CUDA on the device), written meanwhile
                    landed(saver.submit(ckpts.checkpoint_root(home, run_id), step,
                                        model_state=raw.state_dict(), optim_state=opt.state_dict(),
                                        train_state=rt.train_state(step, sched, cfg, best, shards),
                                        config=rt.ckpt_config(cfg, run_id, tok_sha, step, d.world),
                                        val_loss=val_loss, run_id=run_id))
                t_window = time.perf_counter()  # eval and saving are not training throughput
                spent["checkpoint"] += t_window - t_ckpt
        t_wait = time.perf_counter()
        sampler.wait()
        landed(saver.wait())
        spent["final_wait"] = time.perf_counter() - t_wait
    except NonFiniteLoss as e:
        with contextlib.suppress(ckpts.CheckpointWriteError):
            landed(saver.wait())  # a good state taken before the bad step may still be landing
        where = last_ckpt.path if last_ckpt else "none written"
        emit.fail("nan", f"non-finite loss, training stopped ({e}); last good checkpoint: {where}")
        return EXIT_NAN
    except ckpts.CheckpointWriteError as e:
        emit.fail("checkpoint", str(e))
        return EXIT_CKPT
    except torch.cuda.OutOfMemoryError:
        emit.fail("oom", f"CUDA out of memory with --micro-batch {micro} (x {T} tokens); lower --micro-batch: "
                         f"--batch-tokens {cfg.batch_tokens} is kept by gradient accumulation")
        return EXIT_OOM
    finally:
        with contextlib.suppress(Exception):
            sampler.wait()
        with contextlib.suppress(Exception):
            saver.wait()  # an error on the way out: still let a write in flight finish
        pf.close()
        emit.close()
    emit.event("done", run_id=run_id, step=cfg.max_steps, elapsed_s=time.perf_counter() - t0,
               checkpoint=last_ckpt.path if last_ckpt else None, best_val=best, process_s=rt.process_age_s(),
               outside_steps_s={k: round(v, 3) for k, v in spent.items()})
    if d.ddp:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return train(ns)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        print(rt.json_event("error", kind="bad_input", message=str(e)), flush=True)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    code = main()
    # everything is written, fsynced and closed by now, so leave without the interpreter's teardown: on
    # CUDA it took 3.2 s after the `done` event of a seed run (the CUDA context, Inductor's compile
    # workers), and under torchrun c10d/gloo threads could abort it after a clean run ("terminate called
    # without an active exception", SIGABRT; pytorch#179291)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
