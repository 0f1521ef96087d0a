"""Bits per byte over the whole val split, and the check every evaluation adds to loading a checkpoint.
Every val token is predicted once (consecutive windows overlapping by one), so the number is deterministic and
comparable across tokenizers; the price is that a window's first tokens see little context, unlike a sliding one."""
from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path

import numpy as np
import torch

from model.generate import Loaded
from storage.shards import open_tokens

EOT = "<|endoftext|>"


class EvalError(ValueError):
    """Bad input to an evaluation: one line naming the file or parameter and the reason."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of byte-level BPE pieces."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def token_bytes(tok) -> np.ndarray:
    """UTF-8 bytes each token id stands for (special tokens: 0), from its byte-level piece: exact even where
    one token holds part of a character, which decoding single ids cannot give."""
    decode = {c: b for b, c in bytes_to_unicode().items()}
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    out = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    for piece, i in tok.get_vocab(with_added_tokens=True).items():
        if i not in special:
            if any(c not in decode for c in piece):
                raise EvalError(f"tokenizer piece {piece!r} (id {i}) is not byte-level BPE")
            out[i] = len(piece)
    return out


def split_identity(paths: list[Path]) -> tuple[int, str]:
    """(token count, sha256 of the ids as little-endian uint32, shards in order): names the split whatever the
    shard dtype or file layout."""
    h, n = hashlib.sha256(), 0
    for p in paths:
        m = open_tokens(p)
        for a in range(0, m.size, 1 << 22):
            h.update(np.ascontiguousarray(m[a:a + (1 << 22)], dtype="<u4").tobytes())
        n += int(m.size)
    return n, h.hexdigest()


class Stream:
    """The shards' tokens as one sequence, read by slices that may span shards (no copy of the whole)."""

    def __init__(self, paths: list[Path]):
        self.maps = [open_tokens(p) for p in paths]
        self.starts = np.concatenate([[0], np.cumsum([m.size for m in self.maps])]).astype(np.int64)
        self.size = int(self.starts[-1])

    def take(self, a: int, b: int) -> np.ndarray:
        parts = []
        for i, m in enumerate(self.maps):
            lo, hi = max(a, self.starts[i]), min(b, self.starts[i + 1])
            if lo < hi:
                parts.append(m[lo - self.starts[i]: hi - self.starts[i]])
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def windows(n_tokens: int, block: int) -> list[tuple[int, int]]:
    """[a, b) spans of at most block + 1 tokens, each starting where the last ended minus one: tokens 1..n-1
    are each a target exactly once, the last (partial) window included."""
    return [(a, min(a + block + 1, n_tokens)) for a in range(0, max(n_tokens - 1, 0), block)]


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def window_ce(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in nats of every target (float32), for a batch of equal-length windows: through the fused
    head's logits and CE kernel, so no float32 copy of the logits is made beside a training run's state."""
    from model.head import token_ce

    with autocast(x.device):
        h = model.hidden(x)
    return token_ce(h, model.lm_head.weight, y, model.config.vocab_size).view_as(y)


def val_bpb(model, tok, paths: list[Path], batch_size: int = 16, max_windows: int | None = None,
            byte_table: np.ndarray | None = None) -> dict:
    """val_bpb = sum of CE (nats) / ln 2 / sum of UTF-8 bytes of the targets, <|endoftext|> targets left out
    of both; `max_windows` cuts the split short (a periodic estimate during training, not the number);
    `byte_table`: token_bytes(tok), for a caller that evaluates often."""
    if not paths:
        raise EvalError("val split: no val shards; run `langpwt prepare` first")
    device = next(model.parameters()).device
    eot = tok.token_to_id(EOT)
    tb = torch.from_numpy(token_bytes(tok) if byte_table is None else byte_table).to(device)
    stream = Stream(paths)
    spans = windows(stream.size, model.config.block_size)[:max_windows]
    nats = torch.zeros((), dtype=torch.float64, device=device)
    n_bytes = torch.zeros((), dtype=torch.int64, device=device)
    n_tok = torch.zeros((), dtype=torch.int64, device=device)
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(spans), batch_size):
            group = spans[i:i + batch_size]
            # the last window may be short: it goes in a batch of its own length
            for same in _by_length(group):
                arr = np.stack([stream.take(a, b) for a, b in same])
                t = torch.from_numpy(arr).to(device)
                x, y = t[:, :-1], t[:, 1:]
                keep = y != eot
                ce = window_ce(model, x, y)
                nats += (ce.double() * keep).sum()
                n_bytes += (tb[y] * keep).sum()
                n_tok += keep.sum()
    finally:
        model.train(was_training)
    nb, nt = int(n_bytes), int(n_tok)
    if nb == 0:
        raise EvalError(f"val split ({paths[0].parent}): no bytes to score")
    return {"bpb": float(nats) / math.log(2) / nb, "loss": float(nats) / nt, "n_tokens": nt, "n_bytes": nb,
            "n_windows": len(spans), "split_tokens": stream.size, "seconds": time.perf_counter() - t0}


def _by_length(group: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    out: dict[int, list] = {}
    for a, b in group:
        out.setdefault(b - a, []).append((a, b))
    return list(out.values())


def check_checkpoint(step_dir: Path, home_tokenizer: Path) -> dict:
    """The config of complete checkpoint `step_dir`, once its tokenizer is known to be the home's: bpb reads the
    home's val shards, so a checkpoint trained with another tokenizer is bad input here (EvalError, one line)."""
    from storage.checkpoints import TokenizerMismatch, read_config, trained_tokenizer
    from storage.shards import file_sha256

    cfg = read_config(step_dir)
    try:
        path, sha = trained_tokenizer(step_dir, cfg, home_tokenizer)
    except TokenizerMismatch as e:
        raise EvalError(str(e)) from None
    home_sha = sha if Path(path) == Path(home_tokenizer) else file_sha256(home_tokenizer)
    if home_sha != sha:
        raise EvalError(f"{home_tokenizer}: sha256 {home_sha[:12]} differs from the tokenizer checkpoint {step_dir} "
                        f"was trained with ({sha[:12]}); its val shards are of the home's tokenizer")
    return cfg


def load_for_eval(step_dir: Path, home_tokenizer: Path, device: str = "auto") -> Loaded:
    """model.generate.load_trained, after check_checkpoint."""
    from model.generate import load_trained

    check_checkpoint(step_dir, home_tokenizer)
    return load_trained(Path(step_dir), home_tokenizer, device)


def val_paths(home, tokenizer_sha256: str) -> list[Path]:
    """The val shards training validates on (the catalog's finished ones of this tokenizer), in shard order."""
    from storage.training_catalog import train_shards

    return [Path(p) for p in train_shards(home, tokenizer_sha256)["val"]]


def result(loaded: Loaded, task: str, split_id: str, split_size: int, seconds: float, metrics: list[dict],
           **detail) -> dict:
    """One evaluation's outcome as every consumer takes it (catalog rows, artifact, --json)."""
    return {"task": task, "run_id": loaded.run_id, "step": loaded.step, "checkpoint": str(loaded.step_dir),
            "device": loaded.device, "seconds": seconds, "split_id": split_id, "split_size": split_size,
            "metrics": metrics, **detail}


def run_bpb(loaded: Loaded, paths: list[Path], batch_size: int = 16) -> dict:
    """val_bpb (and the mean val loss in nats of the same targets) over the whole split in `paths`."""
    n, sha = split_identity(paths)
    r = val_bpb(loaded.model, loaded.tokenizer, paths, batch_size)
    return result(loaded, "bpb", sha, n, r["seconds"],
                  [{"metric": "val_bpb", "value": r["bpb"], "stderr": None, "n": r["n_tokens"]},
                   {"metric": "val_loss", "value": r["loss"], "stderr": None, "n": r["n_tokens"]}],
                  n_bytes=r["n_bytes"], n_windows=r["n_windows"])
