"""Sampling with a KV cache, yielding each token as it is chosen (streaming).
When the cache fills the block, the last half block is re-encoded: a little recompute instead of
a sliding cache, which learned absolute positions would not allow anyway."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from model.gpt import GPT, KVCache


def pick(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
         generator: torch.Generator | None) -> int:
    """One id from a row of logits (padded ids are already -inf, so never chosen)."""
    logits = logits.float()
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the token that crosses p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.no_grad()
def sample(model: GPT, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           stop_id: int | None = None) -> Iterator[int]:
    """Yield up to `max_new_tokens` ids continuing `prompt_ids` (stops early at `stop_id`)."""
    if not prompt_ids:
        raise ValueError("prompt: encodes to no tokens")
    cfg = model.config
    device = next(model.parameters()).device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()

    def step(tokens: list[int], cache: KVCache) -> torch.Tensor:
        # a context per call, not across the yields: the caller's own work runs between tokens
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            h = model.hidden(torch.tensor([tokens], device=device), cache)
            return model.logits(h[:, -1])[0]

    def prefill(window: list[int]) -> tuple[KVCache, torch.Tensor]:
        c = KVCache(cfg, 1, device, dtype)
        return c, step(window, c)

    try:
        ids = list(prompt_ids)[-cfg.block_size:]
        cache, logits = prefill(ids)
        for _ in range(max_new_tokens):
            nxt = pick(logits, temperature, top_k, top_p, gen)
            yield nxt
            if nxt == stop_id:
                return
            ids.append(nxt)
            if cache.pos >= cfg.block_size:
                cache, logits = prefill(ids[-max(cfg.block_size // 2, 1):])
            else:
                logits = step([nxt], cache)
    finally:
        model.train(was_training)


class TextStream:
    """Turns ids into text pieces, holding back an incomplete UTF-8 sequence (byte-level BPE)."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.emitted = tokenizer, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece

    def flush(self) -> str:
        text = self.tok.decode(self.ids, skip_special_tokens=False)
        piece, self.emitted = text[len(self.emitted):], text
        return piece


def load_model(step_dir, device: str = "cpu") -> tuple[GPT, dict]:
    """The model of a checkpoint's safetensors export, in eval mode, and the checkpoint's config."""
    from model.checkpoint import load_weights
    from model.config import TrainConfig

    cfg, sd = load_weights(step_dir, device)
    model = GPT(TrainConfig.from_dict(cfg["train"]).model).to(device)
    model.load_state_dict(sd)
    return model.eval(), cfg


EOT = "<|endoftext|>"


@dataclass
class Loaded:
    """A checkpoint ready to sample from or evaluate: the model (eval mode), the tokenizer it was trained with,
    and where they came from."""
    model: GPT
    tokenizer: Any
    eot: int | None
    config: dict
    device: str
    tokenizer_path: Path
    step_dir: Path

    @property
    def run_id(self) -> str | None:
        return self.config.get("run_id")

    @property
    def step(self) -> int | None:
        return self.config.get("step")

    @property
    def tokenizer_sha256(self) -> str | None:
        return self.config.get("tokenizer_sha256")


def pick_device(device: str = "auto") -> str:
    """auto: CUDA when visible, else CPU; a CUDA device asked for where none is visible is refused in one line."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is visible")
    return device


def load_trained(step_dir: Path, home_tokenizer: Path, device: str = "auto") -> Loaded:
    """A checkpoint's model and the tokenizer it was trained with (vocab and sha256 checked): what the CLI's
    `generate`, the dashboard's playground and the evaluations run."""
    from model.checkpoint import checkpoint_tokenizer

    dev = pick_device(device)
    model, cfg = load_model(Path(step_dir), dev)
    tok, _, _, path = checkpoint_tokenizer(Path(step_dir), cfg, home_tokenizer)
    return Loaded(model, tok, tok.token_to_id(EOT), cfg, dev, path, Path(step_dir))
