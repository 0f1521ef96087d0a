"""Every path under $LANGPWT_HOME and every deterministic file name, in one place.
Names are zero-padded and free of timestamps so reruns land on the same files."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV_HOME = "LANGPWT_HOME"
DEFAULT_HOME = ".langpwt"
SPLITS = ("train", "val")


def shard_name(shard_id: int, split: str) -> str:
    return f"shard_{shard_id:06d}.{split}.bin"


def parse_shard_id(text: str) -> int:
    """Accept `3`, `000003`, `shard_000003`, `shard_000003.train.bin`."""
    s = str(text).strip()
    s = s.removeprefix("shard_").split(".")[0]
    if not s.isdigit():
        raise ValueError(f"shard id {text!r}: expected a number such as 3 or shard_000003")
    return int(s)


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


@dataclass(frozen=True)
class Home:
    root: Path

    @classmethod
    def from_env(cls, root: str | os.PathLike | None = None) -> "Home":
        r = Path(root or os.environ.get(ENV_HOME) or DEFAULT_HOME).expanduser()
        return cls(r.resolve())

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def tokenizer(self) -> Path:
        return self.tokenizer_dir / "tokenizer.json"

    @property
    def index(self) -> Path:
        """Per-source-file scan results (hashes for the cross-file dedup)."""
        return self.root / "index"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def catalog(self) -> Path:
        return self.root / "catalog.duckdb"

    @property
    def lock(self) -> Path:
        return self.root / "pipeline.lock"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def run_dir(self, run_id: str) -> Path:
        return self.runs / run_id

    @property
    def compile_cache(self) -> Path:
        """torch.compile's and Triton's caches (keyed by code, versions and GPU, so stale entries are just
        unused): kept with the home, a rerun after a reboot or on a copied home compiles in seconds."""
        return self.root / "cache" / "compile"

    @property
    def source_hashes(self) -> Path:
        """sha256 of local `--source` files by their stat (storage/hash_cache.py)."""
        return self.root / "cache" / "source_sha256.json"

    @property
    def eval_dir(self) -> Path:
        """Benchmark data fetched for evaluations (model/evaluate.py, tasks/hellaswag.py)."""
        return self.root / "eval"

    @property
    def hellaswag_dir(self) -> Path:
        return self.eval_dir / "hellaswag"

    def shard(self, shard_id: int, split: str) -> Path:
        return self.shards / shard_name(shard_id, split)

    def shard_meta(self, shard_id: int) -> Path:
        return self.shards / f"shard_{shard_id:06d}.json"

    def shard_docs(self, shard_id: int) -> Path:
        """Catalog rows of the shard's documents, written by the worker, ingested by the flow."""
        return self.shards / f"shard_{shard_id:06d}.docs.parquet"

    def shard_counts(self, shard_id: int) -> Path:
        return self.shards / f"shard_{shard_id:06d}.counts.parquet"

    def staging(self, shard_id: int) -> Path:
        """A shard encoded before its cross-file dedup is known (tasks/stage.py); a hidden temp name,
        so remove_stale_temps clears what a killed run left and no reader ever lists it."""
        return self.shards / f".shard_{shard_id:06d}.staged.tmp"

    def shard_timing(self, shard_id: int) -> Path:
        """When the shard was built and in how many seconds: kept apart from the shard's own sidecars,
        which must be byte-identical from run to run, so `rebuild-catalog` can restore them."""
        return self.root / "timings" / f"shard_{shard_id:06d}.json"

    def index_file(self, shard_id: int) -> Path:
        return self.index / f"index_{shard_id:06d}.parquet"

    def ensure(self) -> "Home":
        for d in (self.root, self.raw, self.tokenizer_dir, self.index, self.shards, self.runs):
            d.mkdir(parents=True, exist_ok=True)
        return self
