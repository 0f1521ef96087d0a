"""What a trainer run cost (steps, time, memory, set-up) and its curves, from its event lines (stdout) across resumed
processes. Trade-off: reads the events a GPU call brought back, not the catalog (the GPU machine has no DuckDB).

    python benchmarks/run_curves.py gpt2run_350.jsonl gpt2run_700.jsonl gpt2run_1000.jsonl --png docs/gpt2_run.png
    python3 benchmarks/run_curves.py $OUT/gpt2run_1000.jsonl     # the summary alone (no plotting libraries needed)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storage.atomic import atomic_write_bytes  # noqa: E402


def events(paths: list[Path]) -> list[dict]:
    out = []
    for p in paths:
        out += [json.loads(line) for line in p.read_text().splitlines() if line.startswith("{")]
    return out


def summary(ev: list[dict]) -> dict:
    """The first process's set-up, steps, the processes' time (start to done), median tokens/s and MFU, peak memory,
    the evals."""
    start = next((e for e in ev if e.get("event") == "start"), {})
    steps = [e for e in ev if e.get("event") == "step"]
    tps = sorted(e["tokens_per_s"] for e in steps)
    mfu = sorted(e["mfu"] for e in steps if e.get("mfu") is not None)
    done = [e for e in ev if e.get("event") == "done"]
    return dict(**{k: start.get(k) for k in ("step", "micro_batch", "micro_batch_from", "accum", "head")},
                last_step=max((e["step"] for e in steps), default=0), processes=len(done),
                process_s=round(sum(e["process_s"] for e in done), 1),
                loop_s=round(sum(e["elapsed_s"] for e in done), 1),
                median_tokens_per_s=tps[len(tps) // 2] if tps else None, median_mfu=mfu[len(mfu) // 2] if mfu else None,
                peak_memory_gb=max((e["memory_gb"] for e in steps), default=None),
                evals=[(e["step"], round(e["val_loss"], 4), round(e["val_bpb"], 4)) for e in ev
                       if e.get("event") == "eval"],
                whole_split_bpb=[(e["step"], round(e["val_bpb"], 4)) for e in ev if e.get("event") == "final_eval"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("events", type=Path, nargs="+", help="the trainer's stdout (JSON lines), in the order they ran")
    p.add_argument("--png", type=Path, help="write the loss and val bpb curves here")
    p.add_argument("--title", default="gpt2 preset, default command", help="the plot's title")
    args = p.parse_args()
    ev = events(args.events)
    if args.png:
        plot(ev, args.title, args.png)
    print(json.dumps(summary(ev), indent=1))
    return 0


def plot(ev: list[dict], title: str, png: Path) -> None:
    from tasks.train import curves_png  # the trainer report's own plot (it needs matplotlib)

    train = [(e["step"], e["train_loss"]) for e in ev if e.get("event") == "step"]
    val = [(e["step"], e["val_loss"]) for e in ev if e.get("event") == "eval"]
    bpb = [(e["step"], e["val_bpb"]) for e in ev if e.get("event") == "eval"]
    whole = [e for e in ev if e.get("event") == "final_eval"]
    last = dict(step=whole[-1]["step"], value=whole[-1]["val_bpb"]) if whole else None
    atomic_write_bytes(png, curves_png(title, train, val, bpb, last))


if __name__ == "__main__":
    sys.exit(main())
