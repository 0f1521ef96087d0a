"""AdamW with weight decay on 2-D weights only, and a linear-warmup + cosine learning-rate schedule.
The schedule is a pure function of the step (its state is one integer), so resume cannot drift."""
from __future__ import annotations

import math

import torch

from model.config import TrainConfig


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]  # the tied weight appears once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {"foreach": False}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, **extra)


class WarmupCosine:
    """lr(step): linear warmup to `lr`, cosine down to `lr * min_lr_ratio` at `total` steps, then flat."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, warmup: int, total: int, min_ratio: float):
        self.opt, self.lr, self.warmup, self.total, self.min_ratio = optimizer, lr, warmup, total, min_ratio
        self.step_count = 0

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        span = max(self.total - self.warmup, 1)
        progress = min((step - self.warmup) / span, 1.0)
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr * (self.min_ratio + (1.0 - self.min_ratio) * coeff)

    def apply(self) -> float:
        """Set the lr for the step about to run and return it."""
        lr = self.lr_at(self.step_count)
        for g in self.opt.param_groups:
            g["lr"] = lr
        return lr

    def step(self) -> None:
        self.step_count += 1

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "lr": self.lr, "warmup": self.warmup,
                "total": self.total, "min_ratio": self.min_ratio}

    def load_state_dict(self, d: dict) -> None:
        self.step_count = int(d["step_count"])
