"""Run the trainer in a child process (torchrun for several GPUs) and turn its output into logs and catalog
rows; plain functions (the flow adds Prefect's tasks and artifacts). A CUDA crash or OOM ends the child, never
the worker; the cost is that progress arrives as text lines to parse rather than Python objects."""
from __future__ import annotations

import base64
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from model.args import to_argv
from model.config import TrainConfig, preset
from model.memory import available_bytes, choose_micro_batch, estimate_bytes  # noqa: F401 (callers import them here)
from storage import checkpoints as ckpts
from storage import eval_catalog
from storage import training_catalog as tc
from storage.atomic import atomic_write_bytes, atomic_write_text
from storage.paths import Home
from storage.shards import file_sha256

ROOT = Path(__file__).resolve().parents[1]
LOG_INTERVAL_S = 1.0  # at most one progress line a second in the flow's logs
INGEST_INTERVAL_S = 10.0


@dataclass
class TrainPlan:
    home: str
    run_id: str
    preset: str
    resume: bool
    nproc: int
    command: list[str]
    resume_step: int | None = None
    overrides: dict = field(default_factory=dict)

GB = 1e9


def cuda_visible(device: str) -> bool:
    """Whether the trainer will run on CUDA (imports torch unless the device is cpu)."""
    if device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


def check_memory(cfg: TrainConfig, cuda: bool = False, available: int | None = None) -> None:
    """Refuse, in one line naming the fix, a CPU run that cannot fit in memory (the kernel would kill it
    midway). CUDA runs are left to the trainer, which reports an out-of-memory with the same fix."""
    if cuda or cfg.device.startswith("cuda"):
        return
    free = available if available is not None else available_bytes()
    if cfg.micro_batch is None:  # the trainer chooses it from the same estimate: refuse only if none fits
        if free is None or choose_micro_batch(cfg, free, cuda=False) is not None:
            return
        raise ValueError(f"--micro-batch: the {cfg.preset} model needs about "
                         f"{estimate_bytes(cfg, 1) / GB:.1f} GB on the CPU even with 1 sequence, "
                         f"{free / GB:.1f} GB available; try --preset tiny")
    need = estimate_bytes(cfg)
    if free is None or need <= free:
        return
    rows = cfg.batch_tokens // cfg.model.block_size
    fits = [mb for mb in range(min(cfg.micro_batch, rows), 0, -1)
            if rows % mb == 0 and estimate_bytes(cfg.override({"micro_batch": mb})) <= free]
    fix = f"--micro-batch {fits[0]} (gradient accumulation keeps --batch-tokens) or " if fits else ""
    raise ValueError(f"--micro-batch {cfg.micro_batch}: the {cfg.preset} model needs about {need / GB:.1f} GB on "
                     f"the CPU, {free / GB:.1f} GB available; try {fix}--preset tiny")


def check_inputs(home: Home, resume: bool = False, run_id: str | None = None):
    """(shard lists, checkpoint to resume or None); raises with a one-line reason on bad input."""
    if not home.tokenizer.is_file():
        raise FileNotFoundError(f"{home.tokenizer}: no tokenizer; run `langpwt prepare` first")
    shards = tc.train_shards(home, file_sha256(home.tokenizer))
    if not shards["train"]:
        raise FileNotFoundError(f"{home.shards}: no train shards; run `langpwt prepare` first")
    return shards, (ckpts.find_resume(home, run_id) if resume else None)


def planned_config(home: Home, preset_name: str, overrides: dict, last: ckpts.CheckpointInfo | None) -> TrainConfig:
    """The config the child will train with (preset or checkpoint, then the overrides), validated: bad values
    are refused here in one line, before a child or a run folder exists."""
    if last is not None:
        saved = ckpts.read_config(Path(last.path))
        return TrainConfig.from_dict(saved["train"]).override(overrides)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(home.tokenizer)).get_vocab_size()
    return preset(preset_name or "seed", vocab).override(overrides)


def keep_tokenizer(home: Home, run_id: str, last: ckpts.CheckpointInfo | None) -> None:
    """The run's own copy of the tokenizer it trains with, so its checkpoints keep working after the home's
    tokenizer is retrained. A resumed run keeps the copy it has; an older run without one gets the home's
    only when that is the tokenizer its checkpoint names."""
    dst = home.run_dir(run_id) / ckpts.TOKENIZER
    if dst.is_file():
        return
    data = home.tokenizer.read_bytes()
    if last is not None:
        want = ckpts.read_config(Path(last.path)).get("tokenizer_sha256")
        if want and want != file_sha256(home.tokenizer):
            return  # the trainer refuses this resume, naming both sha256s
    atomic_write_bytes(dst, data)


def plan_run(home: Home, preset: str, overrides: dict, resume: bool = False, run_id: str | None = None,
             nproc: int | None = None) -> TrainPlan:
    """Check the inputs and the memory, pick the run id, write the shard list and the tokenizer copy, build the
    child's command."""
    shards, last = check_inputs(home, resume, run_id)
    cfg = planned_config(home, preset, overrides, last)
    check_memory(cfg, cuda_visible(cfg.device))
    resume_step = None
    if last is not None:
        run_id, resume_step = ckpts.run_of(last.path).name, last.step
    run_id = run_id or f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    atomic_write_text(home.run_dir(run_id) / "shards.json", json.dumps(shards, indent=1))
    keep_tokenizer(home, run_id, last)
    if nproc is None:
        nproc = 1
        if overrides.get("device") != "cpu":
            import torch
            nproc = max(torch.cuda.device_count(), 1)
    child = ["-m", "model.train", "--home", str(home.root), "--run-id", run_id,
             "--shard-list", str(home.run_dir(run_id) / "shards.json")]
    child += ["--resume"] if resume else ["--preset", preset]
    child += to_argv(overrides)
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *child]
    else:
        cmd = [sys.executable, *child]
    return TrainPlan(str(home.root), run_id, preset, resume, nproc, cmd, resume_step, overrides)


def exit_reason(code: int) -> str:
    """What a non-zero exit of the trainer most likely means, with the fix when there is one."""
    if code >= 0:
        return f"trainer exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    if -code == signal.SIGKILL:
        return (f"trainer killed by {name}: most likely out of memory (the kernel's OOM killer); "
                "try a smaller --micro-batch (gradient accumulation keeps --batch-tokens) or --preset tiny")
    return f"trainer killed by {name}"


def run_child(cmd: list[str], on_event: Callable[[dict], None], on_line: Callable[[str], None]) -> int:
    """Run `cmd`, passing JSON event lines to `on_event` and other lines to `on_line`; its exit code."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        # drains the pipe even while a handler waits on the catalog lock, so the child never blocks on print
        for raw in proc.stdout:
            lines.put(raw)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        while (line := lines.get()) is not None:
            line = line.rstrip("\n")
            if line.startswith('{"event"'):
                on_event(json.loads(line))
            elif line.strip():
                on_line(line)
        return proc.wait()
    finally:
        if proc.poll() is None:  # the flow was cancelled: do not leave a trainer holding the GPU
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def final_eval_result(run_id: str, ev: dict) -> dict:
    """The trainer's end-of-run bpb as an evaluation result (the shape storage.eval_catalog records)."""
    n = ev["n_tokens"]
    return {"task": "bpb", "run_id": run_id, "step": ev["step"], "checkpoint": ev.get("checkpoint"),
            "device": ev.get("device"), "seconds": ev.get("seconds"), "split_id": ev["split_id"],
            "split_size": ev["split_size"],
            "metrics": [{"metric": "val_bpb", "value": ev["val_bpb"], "stderr": None, "n": n},
                        {"metric": "val_loss", "value": ev["val_loss"], "stderr": None, "n": n}]}


class Recorder:
    """Turns the child's events into catalog rows and log lines; `on_evals` (every evaluation so far) and
    `on_checkpoint` (a checkpoint event) let the caller publish them elsewhere (the flow: Prefect artifacts)."""

    def __init__(self, plan: TrainPlan, log, flow_run_id: str | None = None,
                 on_evals: Callable[[list[dict]], None] | None = None,
                 on_checkpoint: Callable[[dict], None] | None = None):
        self.plan, self.log = plan, log
        self.on_evals, self.on_checkpoint = on_evals, on_checkpoint
        self.home = Home.from_env(plan.home)
        self.run_dir = self.home.run_dir(plan.run_id)
        self.flow_run_id = flow_run_id
        self.started = False
        self.tail = tc.JsonlTail(self.run_dir / "metrics.jsonl")
        if plan.resume and self.tail.path.exists():  # earlier attempts' rows are in the catalog already
            self.tail.offset = self.tail.path.stat().st_size
        self.evals: list[dict] = []
        self.error: str | None = None
        self.device: str | None = None
        self._last_log = self._last_ingest = 0.0

    def ingest(self) -> None:
        rows = self.tail.read()
        if rows:
            tc.upsert_metrics(self.home, self.plan.run_id, rows)
        self._last_ingest = time.monotonic()

    def __call__(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind == "start":
            self.started = True
            self.device = f"{ev['device']} x{ev['world']}"
            tc.start_run(self.home, self.plan.run_id, self.plan.preset, ev["config"], self.device,
                         self.flow_run_id, self.plan.resume_step)
            self.log.info(f"run {ev['run_id']} on {self.device}: {ev['params'] / 1e6:.1f}M params, head={ev['head']}, "
                          f"compile={ev['compile']}, from step {ev['step']} to {ev['max_steps']}"
                          + (f", ready {ev['process_s']:.1f} s after its start" if ev.get("process_s") else ""))
        elif kind == "first_step":
            self.log.info(f"first step done {ev['seconds']:.1f} s into the loop (compile included)")
        elif kind == "step":
            now = time.monotonic()
            if now - self._last_log >= LOG_INTERVAL_S or ev["step"] == ev.get("max_steps"):
                mfu = f" MFU {100 * ev['mfu']:.1f}%" if ev.get("mfu") else ""
                self.log.info(f"step {ev['step']}: loss {ev['train_loss']:.4f} lr {ev['lr']:.2e} "
                              f"grad {ev['grad_norm']:.3f} {ev['tokens_per_s'] / 1e3:.1f}k tok/s{mfu} "
                              f"mem {ev['memory_gb']:.2f} GB")
                self._last_log = now
            if now - self._last_ingest >= INGEST_INTERVAL_S:
                self.ingest()
        elif kind == "eval":
            self.ingest()
            tc.add_samples(self.home, self.plan.run_id, [ev])
            row = next((r for r in reversed(tc.metrics(self.home, self.plan.run_id).to_pylist())
                        if r["step"] == ev["step"]), {})
            self.evals.append({k: row.get(k) for k in ("step", "train_loss", "val_loss", "val_bpb", "lr", "grad_norm",
                                                        "tokens_per_s", "mfu", "tokens")} | {"sample": ev["text"]})
            bpb = f" (bpb {ev['val_bpb']:.4f}, sampled windows)" if ev.get("val_bpb") is not None else ""
            self.log.info(f"eval step {ev['step']}: val loss {ev['val_loss']:.4f}{bpb} | {ev['text'][:200]!r}")
            if self.on_evals:
                self.on_evals(self.evals)
        elif kind == "checkpoint":
            self.ingest()
            tc.add_checkpoint(self.home, self.plan.run_id, ev, self.flow_run_id, ev.get("removed", []))
            self.log.info(f"checkpoint step {ev['step']}: {ev['path']} sha256 {ev['sha256'][:12]}")
            if self.on_checkpoint:
                self.on_checkpoint(ev)
        elif kind == "final_eval":
            eval_catalog.record(self.home, final_eval_result(self.plan.run_id, ev))
            self.log.info(f"val bpb {ev['val_bpb']:.4f} over the whole val split ({ev['split_size']:,} tokens, "
                          f"split {ev['split_id'][:12]})")
        elif kind == "error":
            self.error = ev["message"]
            self.log.error(ev["message"])

    def finish(self, code: int) -> dict:
        """The run's outcome; its catalog row is closed only if the trainer started it: a child that refused its
        input (a resume with nothing to resume, a bad value) leaves an earlier attempt's status as it was."""
        self.ingest()
        if code and not self.error:
            self.error = exit_reason(code)
        if self.started:
            tc.finish_run(self.home, self.plan.run_id, "completed" if code == 0 else "failed", self.error,
                          self.device)
        last = ckpts.latest(ckpts.checkpoint_root(self.home, self.plan.run_id))
        return dict(run_id=self.plan.run_id, exit_code=code, error=self.error,
                    checkpoint=last.path if last else None, evals=len(self.evals))


def export_run(home: Home, run_id: str) -> Path | None:
    """The run's best checkpoint (lowest val loss; else its newest) as a Hugging Face GPT-2 folder in
    runs/RUN/hf/, replacing an earlier export; None for a run without a checkpoint."""
    from storage.hf_export import export_hf

    root = ckpts.checkpoint_root(home, run_id)
    chosen = ckpts.best(root) or ckpts.latest(root)
    if chosen is None:
        return None
    out = home.run_dir(run_id) / "hf"
    export_hf(Path(chosen.path), home.tokenizer, out, force=True)
    return out


def _whole_split_bpb(home: Home, run_id: str) -> dict | None:
    """The run's newest whole-split val bpb (the trainer's last one, or a later `langpwt evaluate`)."""
    rows = [r for r in eval_catalog.evals(home, run_id).to_pylist() if r["metric"] == "val_bpb"]
    return max(rows, key=lambda r: (r["step"], r["created_at"])) if rows else None


def curves_png(run_id: str, train: list, val: list, bpb: list, whole: dict | None) -> bytes:
    """Loss (train, val) beside val bpb (each eval's sampled windows, the whole split's at the end), as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.5), dpi=100)
    for pts, style, label in ((train, "-", "train"), (val, "o-", "val")):
        if pts:
            ax.plot(*zip(*pts), style, lw=0.8 if label == "train" else 1.5, label=label)
    ax.set_xlabel("step"), ax.set_ylabel("loss (nats/token)"), ax.set_title(run_id), ax.legend(), ax.grid(alpha=0.3)
    if bpb:
        bx.plot(*zip(*bpb), "o-", color="C2", label="val bpb (sampled windows)")
    if whole:
        bx.plot([whole["step"]], [whole["value"]], "s", color="C3", label="val bpb (whole split)")
    bx.set_xlabel("step"), bx.set_ylabel("bits per byte"), bx.grid(alpha=0.3)
    if bpb or whole:
        bx.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _fmt(x: float | None) -> str:
    return f"{x:.4f}" if x is not None else "—"


def report(home: Home, run_id: str) -> str:
    """Markdown summary with the curves embedded (also saved as loss_curve.png in the run folder)."""
    rows = tc.metrics(home, run_id).to_pylist()
    train = [(r["step"], r["train_loss"]) for r in rows if r["train_loss"] is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r["val_loss"] is not None]
    bpb = [(r["step"], r["val_bpb"]) for r in rows if r.get("val_bpb") is not None]
    whole = _whole_split_bpb(home, run_id)
    png = curves_png(run_id, train, val, bpb, whole)
    atomic_write_bytes(home.run_dir(run_id) / "loss_curve.png", png)
    tps = sorted(r["tokens_per_s"] for r in rows if r["tokens_per_s"])
    best = min((v for _, v in val), default=None)
    cks = ckpts.list_complete(ckpts.checkpoint_root(home, run_id))
    whole_txt = f"{whole['value']:.4f} (step {whole['step']}, split {whole['split_id'][:12]})" if whole else "—"
    last = rows[-1] if rows else {"step": 0, "tokens": 0}
    lines = [f"# Training run `{run_id}`", "",
             "| steps | tokens | last train loss | best val loss | val bpb, whole split | median tokens/s |",
             "|---|---|---|---|---|---|",
             f"| {last['step']} | {last['tokens'] or 0:,} | {_fmt(train[-1][1] if train else None)} | {_fmt(best)} | "
             f"{whole_txt} | {tps[len(tps) // 2] if tps else 0:,.0f} |", "",
             f"![loss curve](data:image/png;base64,{base64.b64encode(png).decode()})", "",
             "| checkpoint | val loss | sha256 |", "|---|---|---|"]
    lines += [f"| `{c.path}` | {c.val_loss if c.val_loss is not None else '—'} | `{c.sha256[:16]}` |" for c in cks]
    md = "\n".join(lines) + "\n"
    atomic_write_text(home.run_dir(run_id) / "report.md", md)
    return md
