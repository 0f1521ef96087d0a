"""Checkpoint tensors: atomic save (in the background during training), device snapshots, loading for resume
and inference, and the tokenizer a checkpoint was trained with. The torch-free half (marker, listing, pruning,
resolving names) is storage/checkpoints.py, re-exported here so the trainer names one module."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import threading
from pathlib import Path

import torch

from storage.atomic import atomic_replace_dir, atomic_write_text, remove_stale_temps, tmp_path_for
from storage.checkpoints import (  # noqa: F401 (re-exported: the trainer names one checkpoint module)
    CKPT_DIR, MARKER, TOKENIZER, WEIGHTS, CheckpointInfo, CheckpointWriteError, TokenizerMismatch, best,
    check_tokenizer_sha, checkpoint_root, find_resume, latest, list_complete, prune, read_config, read_info,
    require_complete, resolve, run_of, runs_newest_first, step_dir_name, trained_tokenizer)
from storage.shards import file_sha256


def export_weights(path: Path, state_dict: dict, config: dict) -> str:
    """Weights alone, for inference; the tied lm_head is stored once (as wte). Returns the file's sha256, taken
    from the bytes as written rather than read back, which would cost a second pass over the file."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if k != "lm_head.weight"}
    data = save(tensors, metadata={"config": json.dumps(config, sort_keys=True)})
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def save(root: Path, step: int, *, model_state: dict, optim_state: dict, train_state: dict,
         config: dict, val_loss: float | None, run_id: str | None = None) -> CheckpointInfo:
    """Write `root/step_NNNNNN/` atomically; the COMPLETE marker is the last file to appear."""
    final = root / step_dir_name(step)
    tmp = tmp_path_for(final)
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(root)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        torch.save(model_state, tmp / "model.pt")
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save(train_state, tmp / "state.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
        weights_sha = export_weights(tmp / WEIGHTS, model_state, config)
        atomic_replace_dir(tmp, final)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(next(p for p in (root, *root.parents) if p.is_dir())).free
        why = "No space left on device" if free < (64 << 20) or "space" in str(e) else str(e).splitlines()[0]
        raise CheckpointWriteError(f"{final}: checkpoint not written ({why}, {free >> 20} MiB free); "
                                   f"the previous checkpoint is kept") from None
    size = sum(p.stat().st_size for p in final.iterdir() if p.is_file())
    info = CheckpointInfo(step=step, path=str(final), val_loss=val_loss, sha256=weights_sha,
                          size_bytes=size, created_at=dt.datetime.now(dt.timezone.utc).isoformat(),
                          run_id=run_id)
    atomic_write_text(final / MARKER, json.dumps(info.to_dict(), indent=1))
    return info


def _copy_tree(obj, copy, memo: dict):
    """`obj` with every tensor replaced by `copy(tensor)`; tensors that share memory (the tied wte and lm_head)
    share one copy, so it is made, moved and saved once (torch.save keeps shared storage shared)."""
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), obj.shape, obj.stride(), obj.dtype, obj.device)
        if key not in memo:
            memo[key] = copy(obj.detach())
        return memo[key]
    if isinstance(obj, dict):
        return {k: _copy_tree(v, copy, memo) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy_tree(v, copy, memo) for v in obj)
    return obj


def to_host(obj):
    """A copy of `obj` with every tensor cloned to host memory: what a step saw, whatever later steps do."""
    return _copy_tree(obj, lambda t: t.to("cpu", copy=True), {})


class Snapshot:
    """A copy of a state taken now: CUDA tensors cloned on their device, in the loop's stream order (a device copy
    holds the loop far less than a copy to host, benchmarks/ckpt_probe.py), other tensors to host. `to_host`,
    called from the writer's thread, moves the device clones on a side stream once an event after them is reached,
    so neither the loop's stream nor its thread waits for that copy."""

    def __init__(self, state):
        devices = []

        def copy(t: torch.Tensor) -> torch.Tensor:
            if t.is_cuda:
                devices.append(t.device)
                return t.clone()
            return t.to("cpu", copy=True)

        self.state = _copy_tree(state, copy, {})
        self.device = devices[0] if devices else None
        self.ready = None
        if self.device is not None:
            self.ready = torch.cuda.Event()
            self.ready.record(torch.cuda.current_stream(self.device))

    def to_host(self):
        if self.device is None:
            return self.state
        side = torch.cuda.Stream(self.device)
        with torch.cuda.stream(side):
            side.wait_event(self.ready)
            host = to_host(self.state)  # pageable copies: each returns once the side stream has it
        self.state = None  # the device copies can go back to the allocator
        return host


class BackgroundSaver:
    """`save` (then `prune`) on a thread, so training goes on while the model and optimizer state are written and
    fsynced. The state is copied before the call returns (on the device for CUDA tensors, see `Snapshot`); one
    write at a time. A failed write raises its CheckpointWriteError from the next `poll` or `wait`."""

    def __init__(self, keep_last: int):
        self.keep_last = keep_last
        self._thread: threading.Thread | None = None
        self._out: tuple[CheckpointInfo, list[int]] | BaseException | None = None

    def submit(self, root: Path, step: int, *, model_state: dict, optim_state: dict, train_state: dict,
               config: dict, val_loss: float | None, run_id: str | None = None) -> list[tuple[CheckpointInfo, list[int]]]:
        """Start writing `root/step_NNNNNN/`; returns what an earlier write finished meanwhile (see `wait`)."""
        done = self.wait()
        snap = Snapshot(dict(model_state=model_state, optim_state=optim_state, train_state=train_state))

        def write() -> None:
            try:
                info = save(root, step, config=config, val_loss=val_loss, run_id=run_id, **snap.to_host())
                self._out = (info, prune(root, self.keep_last))
            except BaseException as e:  # handed to the training thread
                self._out = e

        self._thread = threading.Thread(target=write, name=f"checkpoint-{step}")
        self._thread.start()
        return done

    def poll(self) -> list[tuple[CheckpointInfo, list[int]]]:
        """The finished write, if there is one: [(info, steps pruned)]; never waits."""
        if self._thread is None or self._thread.is_alive():
            return []
        return self.wait()

    def wait(self) -> list[tuple[CheckpointInfo, list[int]]]:
        """Wait for the write in flight; [(info, steps pruned)] or [] when none was."""
        if self._thread is None:
            return []
        self._thread.join()
        self._thread, out, self._out = None, self._out, None
        if isinstance(out, BaseException):
            raise out
        return [out]


def load_train_state(step_dir: Path, map_location="cpu") -> dict:
    step_dir = require_complete(step_dir)
    return {
        "model": torch.load(step_dir / "model.pt", map_location=map_location, weights_only=True),
        "optimizer": torch.load(step_dir / "optimizer.pt", map_location=map_location, weights_only=True),
        "state": torch.load(step_dir / "state.pt", map_location=map_location, weights_only=True),
        "config": json.loads((step_dir / "config.json").read_text()),
    }


def load_weights(step_dir: Path, device="cpu") -> tuple[dict, dict]:
    """(config, state_dict) from the safetensors export, the tied lm_head restored."""
    from safetensors.torch import load_file

    cfg = read_config(step_dir)
    sd = load_file(str(Path(step_dir) / WEIGHTS), device=str(device))
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return cfg, sd


def load_tokenizer(path: Path):
    """(tokenizer, sha256 of its file, vocab size)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer; run `langpwt prepare` first")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    return tok, file_sha256(path), tok.get_vocab_size()


def check_tokenizer(path: Path, sha: str, vocab: int, config: dict, step_dir: Path) -> None:
    """One line if the tokenizer at `path` is not the one checkpoint `step_dir` (its `config`) was trained with."""
    want_vocab = config["train"]["model"]["vocab_size"]
    if vocab != want_vocab:
        raise TokenizerMismatch(f"{path}: vocab size {vocab} differs from {want_vocab} of checkpoint {step_dir}")
    check_tokenizer_sha(path, sha, config, step_dir)


def checkpoint_tokenizer(step_dir: Path, config: dict, home_tokenizer: Path):
    """(tokenizer, sha256, vocab, path) a checkpoint was trained with (storage.checkpoints.trained_tokenizer
    picks the file), its vocabulary checked too."""
    path, _ = trained_tokenizer(step_dir, config, home_tokenizer)
    tok, sha, vocab = load_tokenizer(path)
    check_tokenizer(path, sha, vocab, config, step_dir)
    return tok, sha, vocab, path
