"""One optimizer step: micro-batches with gradient accumulation, DDP sync on the last one only,
clipping, AdamW. Shared by the trainer and the benchmark so the benchmark times the real step."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.distributed as dist


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
