"""Checkpoint directories `step_NNNNNN/` on disk, without torch: the COMPLETE marker, listing, latest/best,
pruning, which checkpoint a name or a resume means, its config and the tokenizer it was trained with. Writing and
loading tensors live in model/checkpoint.py; the split costs a second module, so the dashboards, the catalog and
`langpwt export` never import torch."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from storage.paths import Home, step_dir_name  # noqa: F401 (callers name step folders through this module)
from storage.shards import file_sha256

MARKER = "COMPLETE"
WEIGHTS = "model.safetensors"
CKPT_DIR = "checkpoints"
TOKENIZER = "tokenizer.json"  # the run's own copy, next to its checkpoints folder


@dataclass
class CheckpointInfo:
    step: int
    path: str
    val_loss: float | None
    sha256: str  # of model.safetensors
    size_bytes: int
    created_at: str
    run_id: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def checkpoint_root(home: Home, run_id: str) -> Path:
    return home.run_dir(run_id) / CKPT_DIR


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written; nothing of it is left under its final name."""


class TokenizerMismatch(ValueError):
    """A tokenizer that is not the one a checkpoint was trained with: one line naming the file and both sha256s."""


def run_of(step_dir: Path) -> Path:
    """The run folder a step folder `RUN/checkpoints/step_NNNNNN` belongs to."""
    return Path(step_dir).parents[1]


def read_info(step_dir: Path) -> CheckpointInfo | None:
    marker = Path(step_dir) / MARKER
    if not marker.is_file():
        return None
    d = json.loads(marker.read_text())
    d["path"] = str(Path(step_dir))  # the run folder may have moved since
    return CheckpointInfo(**d)


def list_complete(root: Path) -> list[CheckpointInfo]:
    if not root.is_dir():
        return []
    infos = [read_info(p) for p in sorted(root.glob("step_*")) if p.is_dir()]
    return sorted((i for i in infos if i is not None), key=lambda i: i.step)


def latest(root: Path) -> CheckpointInfo | None:
    infos = list_complete(root)
    return infos[-1] if infos else None


def best(root: Path) -> CheckpointInfo | None:
    infos = [i for i in list_complete(root) if i.val_loss is not None]
    return min(infos, key=lambda i: (i.val_loss, i.step)) if infos else None


def prune(root: Path, keep_last: int) -> list[int]:
    """Delete complete checkpoints other than the newest `keep_last` and the best; returns their steps."""
    infos = list_complete(root)
    keep = {i.step for i in infos[-keep_last:]}
    b = best(root)
    if b is not None:
        keep.add(b.step)
    removed = []
    for i in infos:
        if i.step not in keep:
            # the marker goes first: a half-deleted directory must never look complete
            os.remove(Path(i.path) / MARKER)
            shutil.rmtree(i.path, ignore_errors=True)
            removed.append(i.step)
    return removed


def runs_newest_first(home: Home) -> list[Path]:
    """Run folders ordered by their newest complete checkpoint's time (newest first)."""
    found = []
    for run in home.runs.glob("*") if home.runs.is_dir() else []:
        last = latest(run / CKPT_DIR)
        if last is not None:
            found.append((last.created_at, run))
    return [r for _, r in sorted(found, reverse=True)]


def require_complete(step_dir: Path) -> Path:
    """`step_dir`, once it is a complete checkpoint folder; else a one-line FileNotFoundError."""
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        raise FileNotFoundError(f"checkpoint {step_dir}: no such checkpoint folder")
    if not (step_dir / MARKER).is_file():
        raise FileNotFoundError(f"checkpoint {step_dir}: incomplete checkpoint (no {MARKER} marker)")
    return step_dir


def read_config(step_dir: Path) -> dict:
    """config.json of a complete checkpoint folder (the trainer's config, run id, step, tokenizer sha256)."""
    return json.loads((require_complete(step_dir) / "config.json").read_text())


def check_tokenizer_sha(path: Path, sha: str, config: dict, step_dir: Path) -> None:
    """TokenizerMismatch unless `sha` (of the tokenizer file `path`) is the one checkpoint `step_dir` (its
    `config`) names; a config that names none accepts any."""
    want = config.get("tokenizer_sha256")
    if want and want != sha:
        raise TokenizerMismatch(f"{path}: sha256 {sha[:12]} differs from the tokenizer checkpoint {step_dir} "
                                f"was trained with ({want[:12]})")


def trained_tokenizer(step_dir: Path, config: dict, home_tokenizer: Path) -> tuple[Path, str]:
    """(path, sha256) of the tokenizer checkpoint `step_dir` was trained with: its run's copy, so a retrained home
    tokenizer does not break older runs; a run without a copy falls back to `home_tokenizer`, accepted only when
    its sha256 matches."""
    own = run_of(step_dir) / TOKENIZER
    path = own if own.is_file() else Path(home_tokenizer)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer; run `langpwt prepare` first")
    sha = file_sha256(path)
    check_tokenizer_sha(path, sha, config, step_dir)
    return path, sha


def resolve(spec: str, home: Home) -> Path:
    """`latest`, a run id, a run folder or a step folder -> a complete step folder; a step folder without its
    marker is named as incomplete rather than searched."""
    if spec == "latest":
        runs = runs_newest_first(home)
        if not runs:
            raise FileNotFoundError(f"--checkpoint latest: no complete checkpoint under {home.runs}")
        return Path(latest(runs[0] / CKPT_DIR).path)
    p = Path(spec)
    if not p.exists() and (home.runs / spec).is_dir():
        p = home.runs / spec
    if (p / MARKER).is_file() or (p.name.startswith("step_") and p.is_dir()):
        return require_complete(p)
    for root in (p / CKPT_DIR, p):
        last = latest(root)
        if last is not None:
            return Path(last.path)
    raise FileNotFoundError(f"--checkpoint {spec}: no complete checkpoint there")


def find_resume(home: Home, run_id: str | None = None) -> CheckpointInfo:
    """The checkpoint `--resume` continues: the newest complete one of `run_id`, else of the newest run."""
    runs = [home.run_dir(run_id)] if run_id else runs_newest_first(home)
    info = latest(runs[0] / CKPT_DIR) if runs else None
    if info is None:
        where = runs[0] if runs else home.runs
        raise FileNotFoundError(f"--resume: no complete checkpoint under {where}")
    return info
