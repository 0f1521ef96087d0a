"""Typed configs for the model (GPTConfig) and the training run (TrainConfig), with presets; field metadata = flag help.
Plain dataclasses serialised as JSON, so a checkpoint carries its config without pickled code."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

# the embedding's rows are padded to a multiple of 256 (48,951 -> 49,152): a multiple of 128 alone (49,024 =
# 383 x 128) would leave the output matmul's 256-wide tiles ragged
VOCAB_MULTIPLE = 256

# torch.compile on CUDA: up to this many steps the model is compiled as regions (embedding, one block graph all
# blocks share, ln_f + loss), whose shorter compile outweighs their slightly slower steps; beyond it, whole
REGIONS_MAX_STEPS = 20_000

DROPOUT_RNGS = ("torch", "hash")  # model.dropout; GPTConfig also takes "auto" (resolve_dropout_rng)


def padded(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return (vocab_size + multiple - 1) // multiple * multiple


def arg(default=dataclasses.MISSING, help: str | None = None, *, cli: bool = True, **kw):
    """A config field: `help` is its flag's help line; `cli=False` keeps it out of the command line."""
    meta = {"help": help} if cli else {"cli": False}
    return field(default=default, metadata=meta, **kw)


@dataclass
class GPTConfig:
    n_layer: int = arg(4, "transformer blocks")
    n_head: int = arg(8, "attention heads per block (must divide --n-embd)")
    n_embd: int = arg(512, "width of the residual stream")
    block_size: int = arg(512, "context length in tokens")
    vocab_size: int = arg(50257, cli=False)  # the tokenizer's; the embedding holds `padded_vocab` rows
    dropout: float = arg(0.1, "dropout rate on the embeddings, attention and residual branches")
    # who draws the residual and embedding dropout masks: a hash of the element's index (model.dropout) on CUDA,
    # where it is cheaper to draw than torch's Philox at the same val loss; torch elsewhere, where nothing is gained.
    # Resolved once and saved (resolve_dropout_rng), so a resumed run draws the masks it would have drawn.
    # Attention dropout stays inside SDPA either way.
    dropout_rng: str = arg("auto", cli=False)
    bias: bool = arg(True, "biases in every Linear and LayerNorm, as GPT-2")

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
            raise ValueError(f"dropout_rng {self.dropout_rng}: expected auto, {' or '.join(DROPOUT_RNGS)}")
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
    preset: str = arg("seed", cli=False)  # its own flag, --preset: it picks the defaults the others override
    seed: int = arg(1337, "random seed of the weights, the data order and dropout")
    max_steps: int = arg(5000, "optimizer steps to train to (with --resume: the new end)")
    schedule_steps: int | None = arg(None, "length of the cosine learning-rate decay in steps; unset: --max-steps of "
                                           "the run's first start, kept on resume")
    batch_tokens: int = arg(65536, "tokens per optimizer step, all ranks and micro-batches together")
    micro_batch: int | None = arg(128, "sequences per forward pass on one rank; lower it on out-of-memory, "
                                       "--batch-tokens is kept by gradient accumulation; a preset without one (gpt2) "
                                       "takes the largest power of two that fits the device's memory")
    lr: float = arg(1e-3, "peak learning rate")
    min_lr_ratio: float = arg(0.1, "learning rate at the end of the cosine decay, as a fraction of --lr")
    warmup_steps: int = arg(200, "steps of linear learning-rate warmup")
    weight_decay: float = arg(0.1, "AdamW weight decay (2-D weights only)")
    beta1: float = arg(0.9, "AdamW beta1")
    beta2: float = arg(0.95, "AdamW beta2")
    grad_clip: float = arg(1.0, "clip the gradient's global norm to this")
    eval_every: int = arg(1000, "steps between validation-loss evaluations (and the last step)")
    eval_batches: int = arg(10, "micro-batches of validation data per evaluation")
    sample_tokens: int = arg(48, "tokens of text sampled from the model at each evaluation (0: none)")
    sample_prompt: str = arg("The", "text the evaluation samples continue")
    ckpt_every: int = arg(2500, "steps between checkpoints (and the last step)")
    keep_last: int = arg(2, "checkpoints kept besides the best one")
    log_every: int = arg(50, "steps between progress lines on stdout (on CUDA also between host syncs; every step "
                             "still gets its metrics row)")
    device: str = arg("auto", "auto, cpu, cuda or cuda:N (auto: cuda if visible)")
    compile: bool = arg(True, "torch.compile the model on CUDA (--no-compile: eager, for debugging)")
    head: str = arg("auto", "output layer + loss: plain (autograd), fused (Triton CE kernel), gemm (loss in the "
                            "logits GEMM, Hopper+); auto: gemm on Hopper+, fused on older CUDA, plain on CPU")
    # fused/gemm heads: probabilities under 2**grad_floor reach the backward matmuls as exact zeros, which a
    # power-capped GPU multiplies faster, at the same val loss. The gemm head floors exp(z - z_target) >= p instead,
    # through exp2's flush at a shifted offset (no select). None: off (configs written before the floor existed)
    grad_floor: float | str | None = arg("auto", "gradient floor of the fused/gemm heads: probabilities under "
                                                 "2**VALUE enter the backward as zeros; a log2 probability (e.g. "
                                                 "-24), off, or auto (-24 with those heads on CUDA, off elsewhere)")
    model: GPTConfig = arg(cli=False, default_factory=GPTConfig)

    def validate(self) -> None:
        self.model.validate()
        if self.head not in ("auto", "plain", "fused", "gemm"):
            raise ValueError(f"--head {self.head}: expected auto, plain, fused or gemm")
        if isinstance(self.grad_floor, str) and self.grad_floor not in ("auto", "off"):
            raise ValueError(f"--grad-floor {self.grad_floor}: expected auto, off or a log2 probability, e.g. -24")
        if isinstance(self.grad_floor, (int, float)) and not -126 <= self.grad_floor < 0:
            raise ValueError(f"--grad-floor {self.grad_floor:g}: a log2 probability in [-126, 0), e.g. -24")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device {self.device}: expected auto, cpu or cuda")
        for k in ("max_steps", "batch_tokens", "micro_batch", "eval_every", "ckpt_every", "keep_last", "log_every"):
            if k == "micro_batch" and self.micro_batch is None:
                continue  # chosen from the device's memory when the trainer starts (model.memory)
            if getattr(self, k) <= 0:
                raise ValueError(f"--{k.replace('_', '-')} {getattr(self, k)}: must be positive")
        if self.lr != self.lr or self.lr < 0:
            raise ValueError(f"--lr {self.lr}: must be a non-negative number")

    @property
    def compile_scope(self) -> str:
        """What torch.compile covers on CUDA: regions for runs up to REGIONS_MAX_STEPS, the whole model beyond."""
        return "regions" if self.max_steps <= REGIONS_MAX_STEPS else "model"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        # keys of fields since removed (configs of older runs) are dropped: their behaviour is now fixed
        model_known = {f.name for f in dataclasses.fields(GPTConfig)}
        model = GPTConfig(**{k: v for k, v in d.pop("model", {}).items() if k in model_known})
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
    # GPT-2 small (124M) as its reproductions train it: 524,288 tokens a step (2**19, by gradient accumulation),
    # 19,073 steps = 10B tokens, one pass over FineWeb-Edu's sample-10BT; the micro-batch is left to the device
    "gpt2": dict(max_steps=19073, batch_tokens=524288, micro_batch=None, lr=6e-4, min_lr_ratio=0.1,
                 warmup_steps=700, weight_decay=0.1, beta1=0.9, beta2=0.95, eval_every=250, eval_batches=10,
                 ckpt_every=1000, log_every=10,
                 model=dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0)),
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
