"""GPT-2 as the original: learned positions, pre-LayerNorm blocks, tied lm_head, SDPA attention.
The vocabulary is padded (48,951 -> 49,152) for matmul speed; padded ids are masked out of every softmax."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import GPTConfig
from model.dropout import Dropout


class KVCache:
    """Preallocated keys/values for every layer; `pos` tokens are filled."""

    def __init__(self, cfg: GPTConfig, batch: int, device, dtype):
        hd = cfg.n_embd // cfg.n_head
        shape = (cfg.n_layer, batch, cfg.n_head, cfg.block_size, hd)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.size(2)
        self.k[layer, :, :, self.pos:self.pos + t] = k
        self.v[layer, :, :, self.pos:self.pos + t] = v
        end = self.pos + t
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.dropout = layer, cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = Dropout(cfg.dropout, cfg.mask_rng, site=1 + 2 * layer)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        causal = True
        if cache is not None:
            # a prefill starts from an empty cache; later calls add one token that sees everything
            causal = cache.pos == 0
            k, v = cache.update(self.layer, k, v)
        if cache is not None and T == 1:
            # one query per decoded token, in plain matmuls: SDPA's cuDNN backend would build a graph for each new
            # key length (a slow build each time), and choosing its backend means global flags, which
            # an eval sample drawn on a thread beside training must not touch
            att = torch.softmax((q @ k.transpose(-2, -1)).float() * (q.size(-1) ** -0.5), dim=-1)
            y = att.to(v.dtype) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal and T > 1,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int = 0):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = Dropout(cfg.dropout, cfg.mask_rng, site=2 + 2 * layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg, layer)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.padded_vocab, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=Dropout(cfg.dropout, cfg.mask_rng, site=0),
            h=nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as GPT-2
        # how the loss is computed (model.head); the trainer may swap in a fused kernel
        self.head_loss = None
        # dtype of the residual stream; None keeps the embeddings' float32 (autocast casts only matmuls)
        self.stream_dtype = None
        # compiled training regions (compile_regions); a tuple, so nn.Module does not register them
        self._regions: tuple | None = None
        self.apply(self._init_weights)
        resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)  # GPT-2: residual projections scaled down
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=resid_std)
        with torch.no_grad():
            # rows past the tokenizer's vocabulary are never inputs; zero keeps them inert
            self.transformer.wte.weight[cfg.vocab_size:].zero_()

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def reseed_dropout(self, base: int, calls: int) -> None:
        """Hash dropout's seeds after `calls` training forwards (steps x micro-steps) of a run seeded `base`:
        a resumed run draws the masks it would have drawn (no-op under torch's dropout)."""
        for m in self.modules():
            if isinstance(m, Dropout):
                m.reseed(base, calls)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int) -> float:
        """6N for the matmuls (lm_head included, wpe excluded) + attention, as in PaLM's appendix."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * seq_len

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size={self.config.block_size}")
        x = self._embed(idx, start)
        for block in self.transformer.h:
            x = block(x, cache)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over the padded vocabulary with padded columns at -inf (never predicted)."""
        logits = self.lm_head(h)
        return masked_pad(logits, self.config.vocab_size)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """With targets: the mean cross-entropy; without: logits of the last position."""
        if targets is not None and self._regions is not None and self.training:
            embed, blocks, loss = self._regions
            x = embed(idx)
            for block in blocks:
                x = block(x)
            return loss(x, targets)
        h = self.hidden(idx)
        if targets is None:
            return self.logits(h[:, -1:, :])
        return self._head(h, targets)

    def compile_regions(self, **options) -> None:
        """Compile training's forward as regions: the embedding, one block graph that all blocks share
        (they are the same code with other weights), and ln_f + loss: a shorter cold compile, at the cost of the
        fusions across region edges (slightly slower steps); eval and decoding (model.eval(), KV cache) stay eager."""
        self._regions = (torch.compile(self._embed, **options),
                         [torch.compile(b, **options) for b in self.transformer.h],
                         torch.compile(self._final_loss, **options))

    def _embed(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        pos = torch.arange(start, start + idx.size(1), device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        return x.to(self.stream_dtype) if self.stream_dtype is not None else x

    def _final_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._head(self.transformer.ln_f(x), targets)

    def _head(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.head_loss is not None:
            return self.head_loss(h, self.lm_head.weight, targets, self.config.vocab_size)
        return plain_loss(self.logits(h), targets)


def masked_pad(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    if logits.size(-1) == vocab_size:
        return logits
    col = torch.arange(logits.size(-1), device=logits.device)
    return logits.masked_fill(col >= vocab_size, float("-inf"))


def plain_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
