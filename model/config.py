"""Typed configs for the model (GPTConfig) and the training run (TrainConfig), plus presets.
Plain dataclasses serialised as JSON so a checkpoint carries its config without pickled code."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

# a multiple of 128 (the issue) taken to 256: 48,951 -> 49,152, the size measured at +12 % on the H100
# (shared/NOTES.md); the next multiple of 128 alone, 49,024 = 383 x 128, leaves 256-wide matmul tiles ragged
VOCAB_MULTIPLE = 256


# ~8 s of compile saved against ~1 % of each 37 ms seed step: break-even near 21k steps (RESULTS.md)
REGIONS_MAX_STEPS = 20_000

DROPOUT_RNGS = ("torch", "hash")  # model.dropout; GPTConfig also takes "auto" (resolve_dropout_rng)


def padded(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return (vocab_size + multiple - 1) // multiple * multiple


@dataclass
class GPTConfig:
    n_layer: int = 4
    n_head: int = 8
    n_embd: int = 512
    block_size: int = 512
    vocab_size: int = 50257  # the tokenizer's; the embedding holds `padded_vocab` rows
    dropout: float = 0.1
    # who draws the residual and embedding dropout masks: torch (Philox per element) or a hash of the
    # element's index (model.dropout: +1.9 % per step at 0.1 on an H200, seed-run val loss within the spread
    # of torch's, RESULTS.md); auto = hash on CUDA, torch elsewhere (where nothing is gained, and CPU runs
    # stay as they were); attention dropout stays inside SDPA either way
    dropout_rng: str = "auto"
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm

    @property
    def padded_vocab(self) -> int:
        return padded(self.vocab_size)

    def resolve_dropout_rng(self, cuda: bool) -> None:
        """`auto` made concrete for the device the model trains on (the trainer, before the config is saved)."""
        if self.dropout_rng == "auto":
            self.dropout_rng = "hash" if cuda else "torch"

    @property
    def mask_rng(self) -> str:
        """What the model's Dropout modules draw with: an unresolved auto (a model built outside the trainer:
        tests, tools) gets torch's masks."""
        return "torch" if self.dropout_rng == "auto" else self.dropout_rng

    def validate(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd}: must be a multiple of n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout}: must lie in [0, 1)")
        if self.dropout_rng not in ("auto", *DROPOUT_RNGS):
            raise ValueError(f"--dropout-rng {self.dropout_rng}: expected auto, {' or '.join(DROPOUT_RNGS)}")
        for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            if getattr(self, k) <= 0:
                raise ValueError(f"{k}={getattr(self, k)}: must be positive")


AUTO_GRAD_FLOOR = -24.0  # what --grad-floor auto means on CUDA: p under 2**-24, below bf16's resolution of p - 1


def parse_grad_floor(text: str) -> float | str:
    """--grad-floor's value: auto, off, or a number (validated with the rest of the config)."""
    if text in ("auto", "off"):
        return text
    try:
        return float(text)
    except ValueError:
        return text  # TrainConfig.validate names it


@dataclass
class TrainConfig:
    preset: str = "seed"
    seed: int = 1337
    max_steps: int = 5000
    schedule_steps: int | None = None  # cosine length; None -> max_steps of the first start
    batch_tokens: int = 65536  # per optimizer step, all ranks and micro-steps together
    micro_batch: int = 128  # sequences per forward on one rank
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 1000
    eval_batches: int = 10
    sample_tokens: int = 48
    sample_prompt: str = "The"
    ckpt_every: int = 2500
    keep_last: int = 2
    log_every: int = 10  # steps between host syncs on CUDA; every step still gets a row
    device: str = "auto"
    compile: bool = True
    # what torch.compile covers on CUDA: the whole model (fastest steps) or regions (embedding, one block
    # graph all blocks share, ln_f + loss): a seed-model cold compile 22.9 -> 14.8 s, steps ~1 % slower
    # (RESULTS.md), so regions pay off below ~800 s of steps; auto = regions up to REGIONS_MAX_STEPS
    compile_scope: str = "auto"
    head: str = "auto"  # output layer + loss: plain | fused | gemm | fp8 | fp8all (auto: model.head.resolve_head)
    # fused/fp8/gemm heads: probabilities under 2**grad_floor reach the backward matmuls as exact zeros, which a
    # power-capped GPU multiplies faster. auto: AUTO_GRAD_FLOOR with those heads on CUDA (seed run on the H200: loop
    # 177.1/174.2 s against 183.8/178.4 s without, val loss within run-to-run spread, RESULTS.md), off elsewhere.
    # The gemm head floors exp(z - z_target) >= p instead, through exp2's flush at a shifted offset (no select)
    grad_floor: float | str | None = "auto"  # a log2 probability, "auto" or "off" (None: off, older configs)
    # residual stream between blocks: float32 (what autocast leaves it) or bfloat16 (half the bytes
    # through every LayerNorm/GELU/add; auto: bfloat16 on CUDA, float32 on CPU)
    stream_dtype: str = "auto"
    peak_tflops: float | None = None  # None: measured at start on CUDA
    model: GPTConfig = field(default_factory=GPTConfig)

    def validate(self) -> None:
        self.model.validate()
        if self.head not in ("auto", "plain", "fused", "gemm", "fp8", "fp8all"):
            raise ValueError(f"--head {self.head}: expected auto, plain, fused, gemm, fp8 or fp8all")
        if isinstance(self.grad_floor, str) and self.grad_floor not in ("auto", "off"):
            raise ValueError(f"--grad-floor {self.grad_floor}: expected auto, off or a log2 probability, e.g. -24")
        if isinstance(self.grad_floor, (int, float)) and not -126 <= self.grad_floor < 0:
            raise ValueError(f"--grad-floor {self.grad_floor:g}: a log2 probability in [-126, 0), e.g. -24")
        if self.compile_scope not in ("auto", "model", "regions"):
            raise ValueError(f"--compile-scope {self.compile_scope}: expected auto, model or regions")
        if self.stream_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"--stream-dtype {self.stream_dtype}: expected auto, float32 or bfloat16")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device {self.device}: expected auto, cpu or cuda")
        for k in ("max_steps", "batch_tokens", "micro_batch", "eval_every", "ckpt_every", "keep_last", "log_every"):
            if getattr(self, k) <= 0:
                raise ValueError(f"--{k.replace('_', '-')} {getattr(self, k)}: must be positive")
        if self.lr != self.lr or self.lr < 0:
            raise ValueError(f"--lr {self.lr}: must be a non-negative number")

    @property
    def resolved_compile_scope(self) -> str:
        if self.compile_scope != "auto":
            return self.compile_scope
        return "regions" if self.max_steps <= REGIONS_MAX_STEPS else "model"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        model = GPTConfig(**d.pop("model", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(model=model, **{k: v for k, v in d.items() if k in known})

    def override(self, values: dict) -> "TrainConfig":
        """Apply `values` (flat; model keys allowed) and return a new validated config."""
        d = self.to_dict()
        model_keys = {f.name for f in dataclasses.fields(GPTConfig)}
        for k, v in values.items():
            if v is None:
                continue
            if k in model_keys:
                d["model"][k] = v
            elif k in d:
                d[k] = v
            else:
                raise ValueError(f"unknown training parameter {k!r}")
        cfg = TrainConfig.from_dict(d)
        cfg.validate()
        return cfg


PRESETS: dict[str, dict] = {
    # the original run: 5000 steps x 65,536 tokens at seq 512 (327.7M tokens)
    "seed": dict(max_steps=5000, batch_tokens=65536, micro_batch=128, lr=1e-3, warmup_steps=200,
                 eval_every=1000, eval_batches=10, ckpt_every=2500, log_every=50,
                 model=dict(n_layer=4, n_head=8, n_embd=512, block_size=512, dropout=0.1)),
    # trains in seconds on two CPU cores: tests and `make demo`
    "tiny": dict(max_steps=60, batch_tokens=2048, micro_batch=16, lr=3e-3, warmup_steps=5,
                 eval_every=20, eval_batches=2, ckpt_every=20, sample_tokens=16, log_every=1,
                 model=dict(n_layer=2, n_head=2, n_embd=64, block_size=64, dropout=0.1)),
}


def preset(name: str, vocab_size: int | None = None) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"--preset {name}: unknown; choose one of {', '.join(PRESETS)}")
    p = json.loads(json.dumps(PRESETS[name]))  # deep copy
    model = GPTConfig(**p.pop("model"))
    if vocab_size is not None:
        model.vocab_size = vocab_size
    cfg = TrainConfig(preset=name, model=model, **p)
    cfg.validate()
    return cfg
