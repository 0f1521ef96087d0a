"""What the training loop needs around it: config resolution (preset, flags, checkpoint), devices,
ranks, RNG state, and the event/metrics writer. Kept apart so train.py reads as the loop alone."""
from __future__ import annotations

import json
import math
import os
import random
import resource
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from model import args as cli_args
from model import checkpoint as ckpts
from model.checkpoint import load_tokenizer  # noqa: F401 (the trainer calls it as rt.load_tokenizer)
from model.config import TrainConfig, preset
from model.memory import available_bytes, choose_micro_batch, estimate_bytes
from storage.atomic import atomic_write_text
from storage.paths import Home

ARCH_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def ddp(self) -> bool:
        return self.world > 1


def setup_dist() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    d = Dist(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))
    if backend == "nccl":
        torch.cuda.set_device(d.local_rank)
    return d


def pick_device(name: str, d: Dist) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is visible")
    return torch.device(name if ":" in name else f"cuda:{d.local_rank}")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def resolve_config(ns, home: Home, tok_vocab: int, tok_sha: str, tok_path: Path) -> tuple[TrainConfig, str, Path | None]:
    """(config, run id, checkpoint to resume from): preset < checkpoint < explicit flags."""
    ov = cli_args.overrides(ns)
    if ns.resume:
        info = ckpts.find_resume(home, ns.run_id)
        saved = ckpts.read_config(info.path)
        ckpts.check_tokenizer(tok_path, tok_sha, tok_vocab, saved, Path(info.path))
        cfg = TrainConfig.from_dict(saved["train"])
        for k in ARCH_KEYS:
            if k in ov and ov[k] != getattr(cfg.model, k):
                raise ValueError(f"--{k.replace('_', '-')} {ov[k]}: a resumed run keeps its model "
                                 f"({k}={getattr(cfg.model, k)})")
        return cfg.override(ov), ckpts.run_of(info.path).name, Path(info.path)
    if "vocab_size" in ov and ov["vocab_size"] != tok_vocab:
        raise ValueError(f"--vocab-size {ov['vocab_size']}: tokenizer {tok_path} has {tok_vocab}")
    cfg = preset(ns.preset or "seed", tok_vocab).override(ov)
    if cfg.schedule_steps is None:
        cfg.schedule_steps = cfg.max_steps  # fixed from here on, so a resume keeps the same curve
    run_id = ns.run_id or f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if dist.is_initialized():  # every rank must use rank 0's name
        box = [run_id]
        dist.broadcast_object_list(box, src=0)
        run_id = box[0]
    if ckpts.latest(ckpts.checkpoint_root(home, run_id)) is not None:
        raise ValueError(f"--run-id {run_id}: that run already has checkpoints; add --resume or pick another id")
    return cfg, run_id, None


def free_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can take on `device`: the GPU's free memory, or MemAvailable on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_bytes()


def resolve_micro_batch(cfg: TrainConfig, device: torch.device, d: Dist) -> str:
    """Make `cfg.micro_batch` concrete before the config is saved (a resumed run keeps it): a given one stays;
    unset, the largest of model.memory's choices that fits this device's free memory, the smallest over the ranks
    so every rank accumulates alike. Returns how it was chosen, for the start event."""
    if cfg.micro_batch is not None:
        return "given"
    cuda = device.type == "cuda"
    free = free_memory(device)
    mb = choose_micro_batch(cfg, free, d.world, cuda) if free is not None else 1  # unknown: the safest
    if d.ddp:
        box = torch.tensor([mb or 0], device=device)
        dist.all_reduce(box, op=dist.ReduceOp.MIN)
        mb = int(box.item()) or None
    if mb is None:
        raise ValueError(f"--micro-batch: not even 1 sequence of {cfg.model.block_size} tokens fits the "
                         f"{free / 1e9:.1f} GB free on {device_name(device)} (the model needs about "
                         f"{estimate_bytes(cfg, 1, cuda) / 1e9:.1f} GB); try a smaller model or --preset tiny")
    cfg.micro_batch = mb
    return f"auto: the largest that fits {free / 1e9:.1f} GB free" if free is not None else "auto"


def accum_steps(cfg: TrainConfig, world: int) -> int:
    per = cfg.micro_batch * cfg.model.block_size * world
    if cfg.batch_tokens % per or cfg.batch_tokens < per:
        raise ValueError(f"--batch-tokens {cfg.batch_tokens}: must be a multiple of micro-batch x block x ranks "
                         f"= {cfg.micro_batch} x {cfg.model.block_size} x {world} = {per}")
    return cfg.batch_tokens // per


def use_compile_cache(folder: Path) -> dict[str, str]:
    """Inductor's and Triton's caches under `folder` unless the environment names others; set before the
    first compile. A warm cache spares most of the first step's compile (RESULTS.md); the defaults (/tmp,
    ~/.triton) do not survive a reboot or travel with the home. Inductor writes its default folder into the
    environment on first use: that value counts as unset."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        torch_default = os.path.abspath(default_cache_dir())
    except ImportError:  # older torch: its default is not written into the environment either
        torch_default = None
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, "", torch_default):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))
    return {k: os.environ[k] for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}


def tune_inductor(dropout: float) -> None:
    """Inductor settings for the training graph, set before it compiles. With dropout, the "mix-order"
    kernel that fuses LayerNorm's weight gradient into its per-row backward is much slower than without;
    turning it off wins with dropout and loses without (RESULTS.md), so it stays on at dropout 0."""
    import torch._inductor.config as ic

    if hasattr(ic.triton, "mix_order_reduction"):
        # the first call keeps the default (or TORCHINDUCTOR_MIX_ORDER_REDUCTION): a process may compile again
        default = _INDUCTOR_DEFAULTS.setdefault("mix_order_reduction", ic.triton.mix_order_reduction)
        ic.triton.mix_order_reduction = default and dropout == 0


_INDUCTOR_DEFAULTS: dict[str, bool] = {}


def measure_peak_tflops(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    """bf16 matmul rate on this device, the MFU denominator (measured, not the datasheet)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - t) / 1e12


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def finite(x) -> bool:
    return x is not None and math.isfinite(x)


def get_rng() -> dict:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng(rng: dict, rank: int, seed: int, step: int) -> None:
    py = rng["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = rng["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(rng["torch"].cpu())
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
    if rank:  # only rank 0's state is saved; other ranks re-derive theirs
        torch.manual_seed(seed * 1009 + rank + step)


def train_state(step: int, sched, cfg: TrainConfig, best: float | None, shards: dict) -> dict:
    return {"step": step, "scheduler": sched.state_dict(), "rng": get_rng(), "best_val": best,
            "data": {"seed": cfg.seed, "next_step": step, "train_shards": [p.name for p in shards["train"]]}}


def ckpt_config(cfg: TrainConfig, run_id: str, tok_sha: str, step: int | None, world: int) -> dict:
    return {"format": 1, "train": cfg.to_dict(), "tokenizer_sha256": tok_sha, "run_id": run_id,
            "step": step, "world_size": world}


def write_run_config(run_dir: Path, cfg: TrainConfig, run_id: str, tok_sha: str) -> None:
    atomic_write_text(run_dir / "config.json", json.dumps(ckpt_config(cfg, run_id, tok_sha, None, 1), indent=1))


def process_age_s() -> float | None:
    """Seconds since this process started (Linux), so start-up and exit can be told from the training loop."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def json_event(_event: str, **data) -> str:
    return json.dumps({"event": _event, **data}, default=str)


class Emitter:
    """Rank 0's outputs: JSON events on stdout, rows in metrics.jsonl and samples.jsonl."""

    def __init__(self, run_dir: Path, active: bool):
        self.active = active
        self.lock = threading.Lock()  # the eval sample's thread writes too: whole lines, never interleaved
        if active:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.metrics = open(run_dir / "metrics.jsonl", "a")
            self.samples = open(run_dir / "samples.jsonl", "a")

    def _line(self, text: str) -> None:
        with self.lock:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    def event(self, _event: str, **data) -> None:
        if self.active:
            self._line(json_event(_event, **data))

    def say(self, text: str) -> None:
        if self.active:
            self._line(text)

    def rows(self, rows: list[dict]) -> None:
        if self.active:
            with self.lock:
                self.metrics.write("".join(json.dumps(r) + "\n" for r in rows))
                self.metrics.flush()

    def eval_row(self, step: int, val_loss: float, prompt: str, text: str, val_bpb: float | None = None) -> None:
        """The val loss and bpb (of the sampled windows) as a metrics row, the sample in samples.jsonl, both in
        the `eval` event."""
        self.rows([{"step": step, "val_loss": val_loss, "val_bpb": val_bpb}])
        if self.active:
            with self.lock:
                self.samples.write(json.dumps({"step": step, "prompt": prompt, "text": text}) + "\n")
                self.samples.flush()
        self.event("eval", step=step, val_loss=val_loss, val_bpb=val_bpb, prompt=prompt, text=text)

    def fail(self, kind: str, message: str) -> None:
        print(f"error: {message}", file=sys.stderr, flush=True)
        self.event("error", kind=kind, message=message)

    def close(self) -> None:
        if self.active:
            self.metrics.close()
            self.samples.close()
