"""The training loop, runnable alone as `python -m model.train` (or under torchrun): rows to JSONL, events to stdout.
Trade-off: on CUDA the host syncs only every `log_every` steps, so metrics rows arrive in small bursts."""
from __future__ import annotations

import argparse
import contextlib
import math
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
from model.head import resolve_grad_floor, resolve_head, token_ce
from model.optim import WarmupCosine, make_optimizer
from model.sampler import BackgroundSampler
from model.step import autocast_for, compile_step, prepare_step, train_step
from storage.paths import Home

EXIT_BAD_INPUT, EXIT_NAN, EXIT_OOM, EXIT_CKPT = 2, 3, 4, 5


class NonFiniteLoss(RuntimeError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.train", description="train the LangPWT GPT",
                                epilog="Defaults shown are the seed preset's; --preset tiny and a resumed "
                                       "checkpoint's config replace them, and any flag given overrides both.")
    p.add_argument("--home", help="state folder (default: $LANGPWT_HOME or ./.langpwt)")
    p.add_argument("--run-id", help="run folder name under HOME/runs (default: preset-timestamp)")
    p.add_argument("--resume", action="store_true", help="continue the newest run (or --run-id) (default: off)")
    p.add_argument("--shard-list", type=Path,
                   help="JSON {train: [...], val: [...]} of shard paths (default: glob HOME/shards)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: HOME/tokenizer/tokenizer.json)")
    cli_args.add_config_args(p)
    return p


def eval_bytes(tok, device) -> tuple[torch.Tensor | None, int | None]:
    """(UTF-8 bytes of each token id on `device`, the id of <|endoftext|>) for bpb; no table for a tokenizer whose
    pieces are not byte-level BPE (its bytes per token are unknown)."""
    from model.evaluate import EvalError, token_bytes

    try:
        table = torch.from_numpy(token_bytes(tok)).to(device)
    except EvalError:
        table = None
    return table, tok.token_to_id("<|endoftext|>")


def evaluate(model: GPT, val: torch.Tensor, micro: int, device, autocast,
             byte_table: torch.Tensor | None = None, eot: int | None = None) -> tuple[float, float | None]:
    """(mean val loss in nats per target, val bpb) of the fixed sampled windows, in one pass: the bpb leaves
    <|endoftext|> targets out of both sums, as the whole-split number does (model.evaluate.val_bpb); None
    without a byte table (a tokenizer that is not byte-level BPE)."""
    was = model.training
    model.eval()
    nats = torch.zeros((), dtype=torch.float64, device=device)
    kept_nats, kept_bytes, n = torch.zeros_like(nats), torch.zeros((), dtype=torch.int64, device=device), 0
    with torch.no_grad(), autocast():
        for i in range(0, val.size(0), micro):
            b = val[i:i + micro].to(device)
            y = b[:, 1:].reshape(-1)
            ce = token_ce(model.hidden(b[:, :-1]), model.lm_head.weight, y, model.config.vocab_size).double()
            nats += ce.sum()
            n += y.numel()
            if byte_table is not None:
                keep = y != eot
                kept_nats += (ce * keep).sum()
                kept_bytes += (byte_table[y] * keep).sum()
    model.train(was)
    bpb = float(kept_nats) / math.log(2) / int(kept_bytes) if byte_table is not None and int(kept_bytes) else None
    return float(nats) / max(n, 1), bpb


class Trainer:
    """One training process: `setup` resolves the run and builds everything, `run` steps to max_steps, evaluating
    and checkpointing on the way. State the loop changes lives in fields, so each piece is a method of its own."""

    def __init__(self, ns: argparse.Namespace):
        self.ns = ns
        self.startup = {"imports": rt.process_age_s()}  # where start-up goes, in seconds since the process began

    # ---- set-up -------------------------------------------------------------------------------------------
    def setup(self) -> None:
        self._resolve_run()
        self._load_data()
        self._build_model()
        self._ready_model()
        self._announce()
        self._start_loop()

    def _resolve_run(self) -> None:
        ns = self.ns
        self.home = home = Home.from_env(ns.home)
        self.d = rt.setup_dist()
        tok_path = ns.tokenizer or home.tokenizer
        self.tok, self.tok_sha, tok_vocab = rt.load_tokenizer(tok_path)
        self.cfg, self.run_id, self.resume_from = rt.resolve_config(ns, home, tok_vocab, self.tok_sha, tok_path)
        cfg = self.cfg
        self.device = rt.pick_device(cfg.device, self.d)
        self.is_cuda = self.device.type == "cuda"
        cfg.model.resolve_dropout_rng(self.is_cuda)
        self.startup["config"] = rt.process_age_s()
        self.head = resolve_head(cfg.head, self.device)
        self.grad_floor = resolve_grad_floor(cfg.grad_floor, self.head, self.device)  # before the run folder exists
        self.micro_from = rt.resolve_micro_batch(cfg, self.device, self.d)  # an unset one, from the free memory
        self.run_dir = home.run_dir(self.run_id)
        self.emit = rt.Emitter(self.run_dir, self.d.rank == 0)
        self.T, self.micro = cfg.model.block_size, cfg.micro_batch
        self.accum = rt.accum_steps(cfg, self.d.world)

    def _load_data(self) -> None:
        cfg, T = self.cfg, self.T
        self.shards = load_shard_list(self.ns.shard_list, self.home.shards)
        self.train_w = TokenWindows(self.shards["train"], T, cfg.model.vocab_size, "train")
        val_w = TokenWindows(self.shards["val"], T, cfg.model.vocab_size, "val")
        self.val = torch.from_numpy(val_w.fixed(cfg.eval_batches * self.micro))
        self.byte_table, self.eot = eval_bytes(self.tok, self.device)
        self.startup["data"] = rt.process_age_s()

    def _build_model(self) -> None:
        cfg, d, device = self.cfg, self.d, self.device
        torch.manual_seed(cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
        # the weights drawn where they will live (on CUDA from its generator): no host init and copy
        with torch.device(device):
            self.raw = raw = GPT(cfg.model)
        self.startup["model"] = rt.process_age_s()  # on CUDA: the context's creation and the weights' init
        self.opt = make_optimizer(raw, cfg, device)
        self.sched = WarmupCosine(self.opt, cfg.lr, cfg.warmup_steps, cfg.schedule_steps or cfg.max_steps,
                                  cfg.min_lr_ratio)
        self.start, self.best = 0, None
        torch.manual_seed(cfg.seed + d.rank)
        if self.resume_from is not None:
            st = ckpts.load_train_state(self.resume_from, map_location=device)
            raw.load_state_dict(st["model"])
            self.opt.load_state_dict(st["optimizer"])
            self.sched.load_state_dict(st["state"]["scheduler"])
            self.start, self.best = int(st["state"]["step"]), st["state"].get("best_val")
            rt.set_rng(st["state"]["rng"], d.rank, cfg.seed, self.start)
        # hash dropout seeds from (seed, rank) and the forwards already taken, so a resumed run goes on as one
        raw.reseed_dropout(cfg.seed * 2654435761 + d.rank * 97_000_003, self.start * self.accum)

    def _ready_model(self) -> None:
        cfg, raw, d = self.cfg, self.raw, self.d
        self.train_head = prepare_step(raw, self.head, self.grad_floor, self.device)  # compile guards on its identity
        self.startup["head"] = rt.process_age_s()  # on CUDA: Triton and Dynamo imported
        self.caches = rt.use_compile_cache(self.home.compile_cache) if self.is_cuda else {}  # Triton runs uncompiled too
        self.model, self.scope = compile_step(raw, cfg, self.device)
        self.startup["compile_setup"] = rt.process_age_s()
        if d.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP
            # no buffer broadcast: the model's only buffers are hash dropout's seeds, which differ by rank on purpose
            self.model = DDP(self.model, device_ids=[d.local_rank] if self.is_cuda else None, broadcast_buffers=False)
        self.autocast = autocast_for(self.device)
        self.params = list(raw.parameters())
        self.peak = rt.measure_peak_tflops(self.device) if self.is_cuda else None
        self.startup["peak_probe"] = rt.process_age_s()
        self.flops_tok = raw.flops_per_token(self.T)
        self.step_tokens = self.micro * self.T * self.accum * d.world

    def _announce(self) -> None:
        cfg, d, raw, device = self.cfg, self.d, self.raw, self.device
        self.emit.event("start", run_id=self.run_id, run_dir=str(self.run_dir), step=self.start,
                        max_steps=cfg.max_steps, device=rt.device_name(device), world=d.world, accum=self.accum,
                        micro_batch=self.micro, micro_batch_from=self.micro_from, head=self.head,
                        grad_floor=self.grad_floor,
                        stream_dtype="bfloat16" if raw.stream_dtype is not None else "float32",
                        compile=self.scope or False, peak_tflops=self.peak, params=raw.num_params(),
                        tokenizer_sha256=self.tok_sha, config=cfg.to_dict(),
                        resumed_from=str(self.resume_from) if self.resume_from else None,
                        process_s=rt.process_age_s(), startup_s=self.startup, compile_cache=self.caches)
        if d.rank == 0:
            rt.write_run_config(self.run_dir, cfg, self.run_id, self.tok_sha)
        self.emit.say(f"run {self.run_id}: {raw.num_params() / 1e6:.1f}M params, {rt.device_name(device)} "
                      f"x{d.world}, {self.step_tokens} tokens/step ({self.micro}x{self.T}x{self.accum} accum "
                      f"x{d.world} ranks; micro-batch {self.micro_from}), head={self.head}")

    def _start_loop(self) -> None:
        cfg, tok, d = self.cfg, self.tok, self.d
        # seconds outside the steps, for the `done` event: what the wall clock spends besides training
        self.spent = dict(eval=0.0, sample=0.0, checkpoint=0.0, final_wait=0.0)
        self.pf = Prefetcher(self.train_w, cfg.seed, self.micro, d.world, d.rank, self.accum, self.start, self.device)
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []
        self.t_window = self.t0 = time.perf_counter()
        self.last_ckpt = ckpts.latest(ckpts.checkpoint_root(self.home, self.run_id))
        self.saver = ckpts.BackgroundSaver(cfg.keep_last)  # the loop goes on while a checkpoint is written
        # and while each evaluation's text sample is drawn (on CUDA; in line on the CPU)
        prompt_ids = tok.encode(cfg.sample_prompt).ids if tok is not None else [0]
        self.sampler = BackgroundSampler(self.raw, lambda ids: tok.decode(ids) if tok is not None else "",
                                         prompt_ids, cfg.sample_tokens if tok is not None else 0,
                                         background=self.is_cuda)

    # ---- the loop -----------------------------------------------------------------------------------------
    def run(self) -> int:
        """Set up, train, and say how it ended; the exit code (bad input raises ValueError/FileNotFoundError)."""
        self.setup()
        try:
            self._loop()
        except NonFiniteLoss as e:
            with contextlib.suppress(ckpts.CheckpointWriteError):
                self._landed(self.saver.wait())  # a good state taken before the bad step may still be landing
            where = self.last_ckpt.path if self.last_ckpt else "none written"
            self.emit.fail("nan", f"non-finite loss, training stopped ({e}); last good checkpoint: {where}")
            return EXIT_NAN
        except ckpts.CheckpointWriteError as e:
            self.emit.fail("checkpoint", str(e))
            return EXIT_CKPT
        except torch.cuda.OutOfMemoryError:
            cfg = self.cfg
            self.emit.fail("oom", f"CUDA out of memory with --micro-batch {self.micro} (x {self.T} tokens); lower "
                                  f"--micro-batch: --batch-tokens {cfg.batch_tokens} is kept by gradient accumulation")
            return EXIT_OOM
        finally:
            self._close()
        if self.d.rank == 0:
            self._final_eval()
        self._done()
        return 0

    def _loop(self) -> None:
        cfg = self.cfg
        for it in range(self.start, cfg.max_steps):
            step = it + 1
            self._step(step, first=it == self.start)
            self._landed(self.saver.poll())
            do_eval = step % cfg.eval_every == 0 or step == cfg.max_steps
            do_ckpt = step % cfg.ckpt_every == 0 or step == cfg.max_steps
            if step % cfg.log_every == 0 or do_eval or do_ckpt or not self.is_cuda:
                self._flush()
            if self.d.rank == 0 and (do_eval or do_ckpt):
                t_out = time.perf_counter()
                val_loss = self._on_eval(step, t_out) if do_eval else None
                t_ckpt = time.perf_counter()
                if do_ckpt:
                    self._on_checkpoint(step, val_loss)
                self.t_window = time.perf_counter()  # eval and saving are not training throughput
                self.spent["checkpoint"] += self.t_window - t_ckpt
        t_wait = time.perf_counter()
        self.sampler.wait()
        self._landed(self.saver.wait())
        self.spent["final_wait"] = time.perf_counter() - t_wait

    def _step(self, step: int, first: bool) -> None:
        lr = self.sched.apply()
        loss_acc, gnorm = train_step(self.model, self.params, self.opt, self.pf.next, self.accum, self.d.ddp,
                                     self.autocast, self.cfg.grad_clip)
        self.sched.step()
        self.pending.append((step, loss_acc, gnorm, lr))
        if first:  # one sync: how long start-up and the compile took, apart from the steps
            if self.is_cuda:
                torch.cuda.synchronize(self.device)
            self.emit.event("first_step", step=step, seconds=time.perf_counter() - self.t0,
                            process_s=rt.process_age_s())

    def _flush(self) -> None:
        """The steps run since the last flush, as metrics rows (one host sync); stops on a non-finite loss."""
        if not self.pending:
            return
        cfg, peak = self.cfg, self.peak
        vals = torch.stack([torch.stack([l, g]) for _, l, g, _ in self.pending]).float().tolist()
        now = time.perf_counter()
        tps = self.step_tokens * len(self.pending) / max(now - self.t_window, 1e-9)
        mem = rt.memory_gb(self.device)
        rows = []
        for (s, _, _, lr), (loss, gnorm) in zip(self.pending, vals):
            rows.append(dict(step=s, train_loss=loss, lr=lr, grad_norm=gnorm, tokens_per_s=tps,
                             mfu=(tps * self.flops_tok / (peak * 1e12 * self.d.world)) if peak else None,
                             memory_gb=mem, tokens=s * self.step_tokens, elapsed_s=now - self.t0))
        self.pending.clear()
        self.t_window = now
        self.emit.rows(rows)
        bad = next((r for r in rows if not rt.finite(r["train_loss"]) or not rt.finite(r["grad_norm"])), None)
        if bad:
            raise NonFiniteLoss(f"step {bad['step']}: loss {bad['train_loss']}, grad norm {bad['grad_norm']}")
        last = rows[-1]
        if self.d.rank == 0 and (last["step"] % max(cfg.log_every, 1) == 0 or last["step"] == cfg.max_steps):
            self.emit.event("step", **last)

    # ---- on-eval / on-checkpoint --------------------------------------------------------------------------
    def _on_eval(self, step: int, t_out: float) -> float:
        """The validation loss and bpb of the sampled windows, then the text sample drawn from these weights."""
        cfg, raw = self.cfg, self.raw
        self.sampler.wait()  # the previous sample's event first: evals reach the parent in order
        val_loss, val_bpb = evaluate(raw, self.val, self.micro, self.device, self.autocast, self.byte_table, self.eot)
        self.best = val_loss if self.best is None else min(self.best, val_loss)
        t_eval = time.perf_counter()
        self.spent["eval"] += t_eval - t_out
        self.sampler.submit(raw, cfg.seed + step,
                            lambda text, s=step, v=val_loss, b=val_bpb: self.emit.eval_row(s, v, cfg.sample_prompt, text, b))
        self.spent["sample"] += time.perf_counter() - t_eval  # on CUDA: the weights' copy, the thread's start
        return val_loss

    def _on_checkpoint(self, step: int, val_loss: float | None) -> None:
        """The state is copied now (on CUDA on the device) and written while the loop goes on."""
        cfg = self.cfg
        self._landed(self.saver.submit(ckpts.checkpoint_root(self.home, self.run_id), step,
                                       model_state=self.raw.state_dict(), optim_state=self.opt.state_dict(),
                                       train_state=rt.train_state(step, self.sched, cfg, self.best, self.shards),
                                       config=rt.ckpt_config(cfg, self.run_id, self.tok_sha, step, self.d.world),
                                       val_loss=val_loss, run_id=self.run_id))

    def _landed(self, done: list) -> None:
        for info, removed in done:
            self.last_ckpt = info
            self.emit.event("checkpoint", **info.to_dict(), removed=removed)

    # ---- the end ------------------------------------------------------------------------------------------
    def _close(self) -> None:
        with contextlib.suppress(Exception):
            self.sampler.wait()
        with contextlib.suppress(Exception):
            self.saver.wait()  # an error on the way out: still let a write in flight finish
        self.pf.close()
        self.emit.close()

    def _final_eval(self) -> None:
        """The whole val split's bpb with the final weights (model.evaluate.val_bpb): the run's number that
        compares across tokenizers and homes, recorded with the split's identity."""
        if self.byte_table is None or not self.shards["val"]:
            return
        from model.evaluate import split_identity, val_bpb

        t0 = time.perf_counter()
        paths = [Path(p) for p in self.shards["val"]]
        # a few windows a batch: the logits of a whole micro-batch would sit beside the training state
        r = val_bpb(self.raw, self.tok, paths, batch_size=min(self.micro, 16), byte_table=self.byte_table.cpu().numpy())
        n, sha = split_identity(paths)
        self.spent["final_eval"] = time.perf_counter() - t0
        self.emit.event("final_eval", step=self.cfg.max_steps, val_bpb=r["bpb"], val_loss=r["loss"],
                        n_tokens=r["n_tokens"], n_bytes=r["n_bytes"], n_windows=r["n_windows"], split_id=sha,
                        split_size=n, seconds=self.spent["final_eval"], device=rt.device_name(self.device),
                        checkpoint=self.last_ckpt.path if self.last_ckpt else None)

    def _done(self) -> None:
        cfg = self.cfg
        self.emit.event("done", run_id=self.run_id, step=cfg.max_steps, elapsed_s=time.perf_counter() - self.t0,
                        checkpoint=self.last_ckpt.path if self.last_ckpt else None, best_val=self.best,
                        process_s=rt.process_age_s(),
                        outside_steps_s={k: round(v, 3) for k, v in self.spent.items()})
        if self.d.ddp:
            dist.barrier()
            dist.destroy_process_group()


def train(ns: argparse.Namespace) -> int:
    return Trainer(ns).run()


def main(argv: list[str] | None = None, settings: dict | None = None) -> int:
    """`settings`: config values that are no flags, for callers in Python (tests: {"dropout_rng": "hash"})."""
    ns = build_parser().parse_args(argv)
    for k, v in (settings or {}).items():
        setattr(ns, k, v)
    try:
        return train(ns)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        print(rt.json_event("error", kind="bad_input", message=str(e)), flush=True)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    code = main()
    # everything is written, fsynced and closed by now, so leave without the interpreter's teardown: on CUDA it
    # waits on the CUDA context and Inductor's compile workers, and under torchrun c10d/gloo threads could abort
    # it after a clean run ("terminate called without an active exception", SIGABRT)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
