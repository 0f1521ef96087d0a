"""Batches from memory-mapped token shards, each a pure function of (seed, step, micro-batch index).
Random windows (with replacement) make a resumed or re-sharded run see exactly the same batches;
the price is that an epoch is not a permutation: some windows repeat, some are never drawn."""
from __future__ import annotations

import json
import queue
import threading
from pathlib import Path

import numpy as np
import torch

from storage.shards import open_tokens


def find_shards(shard_dir: Path, split: str) -> list[Path]:
    return sorted(Path(shard_dir).glob(f"shard_*.{split}.bin"))


def load_shard_list(path: Path | None, shard_dir: Path) -> dict[str, list[Path]]:
    """Shard paths per split: from the parent's JSON list (taken from the catalog) or a glob."""
    if path is not None:
        d = json.loads(Path(path).read_text())
        return {s: [Path(p) for p in d.get(s, [])] for s in ("train", "val")}
    return {s: find_shards(shard_dir, s) for s in ("train", "val")}


class TokenWindows:
    """Windows of `seq_len + 1` tokens drawn uniformly from the concatenation of shards."""

    def __init__(self, paths: list[Path], seq_len: int, vocab_size: int, split: str = "train"):
        if not paths:
            raise FileNotFoundError(f"no {split} shards: run `langpwt prepare` first")
        self.seq_len = seq_len
        self.maps = [open_tokens(p) for p in paths]
        counts = np.array([max(m.size - seq_len, 0) for m in self.maps], dtype=np.int64)
        if counts.sum() == 0:
            raise ValueError(f"{split} shards ({paths[0].parent}): fewer than {seq_len + 1} tokens in every shard")
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.n_windows = int(self.starts[-1])
        self.paths = paths
        self._check_vocab(vocab_size, split)

    def _check_vocab(self, vocab_size: int, split: str) -> None:
        # the largest id of a small sample: a shard from another tokenizer is caught before step 1
        for p, m in zip(self.paths, self.maps):
            top = int(np.max(m[: 1 << 20])) if m.size else 0
            if top >= vocab_size:
                raise ValueError(f"{p}: token id {top} >= vocab_size {vocab_size}; shards and tokenizer differ")

    def gather(self, flat_starts: np.ndarray) -> np.ndarray:
        shard = np.searchsorted(self.starts, flat_starts, side="right") - 1
        out = np.empty((flat_starts.size, self.seq_len + 1), dtype=np.int64)
        for i, (s, g) in enumerate(zip(shard, flat_starts)):
            off = int(g - self.starts[s])
            out[i] = self.maps[s][off: off + self.seq_len + 1]
        return out

    def batch(self, seed: int, step: int, index: int, n_seq: int) -> np.ndarray:
        """Micro-batch `index` of `step`; index = micro_step * world + rank, so the same global
        data is seen whatever the split between ranks and accumulation."""
        rng = np.random.default_rng([seed, step, index])
        return self.gather(rng.integers(0, self.n_windows, size=n_seq))

    def fixed(self, n_seq: int) -> np.ndarray:
        """`n_seq` windows spread evenly over all the shards: a fixed set that represents the
        whole split (the first windows alone are one kind of document)."""
        n = min(n_seq, self.n_windows)
        return self.gather(np.linspace(0, self.n_windows - 1, n).astype(np.int64))


class Prefetcher:
    """Builds the next micro-batches on a thread while the device computes; pinned on CUDA."""

    def __init__(self, windows: TokenWindows, seed: int, n_seq: int, world: int, rank: int,
                 accum: int, start_step: int, device: torch.device):
        self.w, self.seed, self.n_seq = windows, seed, n_seq
        self.world, self.rank, self.accum, self.device = world, rank, accum, device
        self.q: queue.Queue = queue.Queue(maxsize=2 * accum)
        self.step = start_step
        self._stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _make(self, step: int, micro: int):
        arr = self.w.batch(self.seed, step, micro * self.world + self.rank, self.n_seq)
        t = torch.from_numpy(arr)
        if self.device.type == "cuda":
            t = t.pin_memory()
        return t

    def _run(self) -> None:
        step = self.step
        while not self._stop.is_set():
            for micro in range(self.accum):
                item = self._make(step, micro)
                while not self._stop.is_set():
                    try:
                        self.q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
            step += 1

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.q.get().to(self.device, non_blocking=True)
        return t[:, :-1], t[:, 1:]

    def close(self) -> None:
        self._stop.set()
