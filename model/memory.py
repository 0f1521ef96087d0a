"""Memory one training process needs, and the micro-batch that fits: torch-free, so the CLI refuses a CPU run that
cannot fit before importing torch, and the trainer picks a GPU's micro-batch from the same model. Trade-off: an
estimate from the architecture (no trial step), so it keeps a headroom rather than filling the device to the byte."""
from __future__ import annotations

from pathlib import Path

from model.config import TrainConfig

# what an automatic micro-batch is chosen from, largest first: powers of two keep the per-step sequences divisible
MICRO_BATCHES = (128, 64, 32, 16, 8, 4, 2, 1)
# share of the free memory an automatic choice may plan for: the rest is left to the caching allocator's
# fragmentation, cuBLAS and Triton workspaces and the compile's autotuning buffers, none of which the estimate counts
HEADROOM = 0.85


def param_count(cfg: TrainConfig) -> int:
    """Parameters of the model (the tied lm_head counted once, the padded vocabulary's rows included)."""
    m = cfg.model
    d = m.n_embd
    return m.n_layer * (12 * d * d + 13 * d) + m.padded_vocab * d + m.block_size * d + 2 * d


def estimate_bytes(cfg: TrainConfig, micro_batch: int | None = None, cuda: bool = False) -> int:
    """Memory one training process needs at `micro_batch` (default: the config's), roughly: fp32 weights, gradients
    and AdamW's two moments (16 bytes a parameter), the activations kept for the backward of one micro-batch, and
    the logits with their gradient, which dominate for a large vocabulary.
    CPU: everything in fp32, attention through the math path (its probabilities are kept), logits and their
    gradient in fp32. CUDA: bf16 activations and weight copies (autocast), flash attention (nothing quadratic in
    the context is kept), and the head's bf16 logits, which its kernel overwrites with their gradient in place."""
    m = cfg.model
    d, T, B = m.n_embd, m.block_size, micro_batch or cfg.micro_batch
    params = param_count(cfg)
    if cuda:
        # per token and layer: about 20 saved d-wide bf16 tensors (LayerNorm inputs, q/k/v, the MLP's 4d pair, ...)
        activations = B * T * m.n_layer * 20 * d * 2
    else:
        # per token and layer, in fp32: 34 d-wide values and 5 per head and context position (the math path's
        # scores, probabilities, dropout mask and dropped probabilities), as counted for GPT layers by
        # Korthikanti et al. (2022) in half precision, doubled
        activations = B * T * m.n_layer * (34 * d + 5 * m.n_head * T) * 2
    logits = B * T * m.padded_vocab * (2 if cuda else 2 * 4)
    # CUDA: autocast's bf16 copy of every weight, held through the backward, and a checkpoint's on-device copy of
    # the weights and AdamW's moments, held while it is written beside the loop
    extra = (2 + 12) * params if cuda else 0
    return 16 * params + extra + activations + logits


def rows_per_rank(cfg: TrainConfig, world: int = 1) -> int:
    """Sequences each rank trains on per optimizer step (what the micro-batch times the accumulation must make)."""
    return cfg.batch_tokens // (cfg.model.block_size * world)


def choose_micro_batch(cfg: TrainConfig, free_bytes: int, world: int = 1, cuda: bool = True) -> int | None:
    """The largest of MICRO_BATCHES that divides the per-rank sequences of a step and whose estimate fits in
    HEADROOM x `free_bytes`; None when not even one sequence fits."""
    rows = rows_per_rank(cfg, world)
    budget = HEADROOM * free_bytes
    for mb in MICRO_BATCHES:
        if mb <= rows and rows % mb == 0 and estimate_bytes(cfg, mb, cuda) <= budget:
            return mb
    return None


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux): what a new process can take without swapping or the OOM killer."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
