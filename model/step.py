"""One optimizer step and the set-up every step runs with, shared by the trainer and the benchmark (the real step).
Trade-off: the set-up is fixed per device, with no switches; a variant to compare against is built in the benchmark."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.distributed as dist

from model.gpt import GPT
from model.head import make_head_loss
from model.runtime import tune_inductor


def prepare_step(raw: GPT, head: str, grad_floor: float | None, device: torch.device):
    """TF32 matmuls and a bfloat16 residual stream on CUDA (autocast alone would leave the stream between blocks
    in float32: twice the bytes through every LayerNorm, GELU and add, at the same val loss); float32 elsewhere,
    where bf16 autocast is not used. Installs and returns the head's loss (None: the plain loss)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    raw.stream_dtype = torch.bfloat16 if device.type == "cuda" else None
    raw.head_loss = make_head_loss(head, grad_floor)  # one object: compile guards on its identity
    return raw.head_loss


def compile_step(raw: GPT, cfg, device: torch.device):
    """(the module to step, what was compiled: "regions", "model" or None). Compiled on CUDA only (with --compile),
    over the scope `cfg.compile_scope` picks from the run's length; elsewhere the eager model."""
    if device.type != "cuda" or not cfg.compile:
        return raw, None
    tune_inductor(cfg.model.dropout)
    if cfg.compile_scope == "regions":
        raw.compile_regions()
        return raw, "regions"
    return torch.compile(raw), "model"


def train_step(model, params, opt, next_batch: Callable, accum: int, ddp: bool, autocast: Callable,
               clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (mean loss, grad norm before clipping) as device tensors: no host sync here."""
    loss_acc = None
    for m in range(accum):
        x, y = next_batch()
        # all-reduce once per step: skipping it on earlier micro-steps saves (accum-1) syncs
        ctx = model.no_sync() if (ddp and m < accum - 1) else contextlib.nullcontext()
        with ctx, autocast():
            loss = model(x, y) / accum
        loss.backward()
        loss_acc = loss.detach() if loss_acc is None else loss_acc + loss.detach()
    if ddp:
        dist.all_reduce(loss_acc, op=dist.ReduceOp.AVG)
    gnorm = torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_acc, gnorm


def autocast_for(device: torch.device) -> Callable:
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext
