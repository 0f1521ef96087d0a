"""The curves of a trainer run from its event lines (stdout), across resumed processes: loss and val bpb as a
PNG, and what it cost (steps, time, memory). Trade-off: reads the events the GPU call brought back, not the catalog.

    python benchmarks/run_curves.py gpt2run_350.jsonl gpt2run_700.jsonl gpt2run_1000.jsonl --png docs/gpt2_run.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storage.atomic import atomic_write_bytes  # noqa: E402
from tasks.train import curves_png  # noqa: E402


def events(paths: list[Path]) -> list[dict]:
    out = []
    for p in paths:
        out += [json.loads(line) for line in p.read_text().splitlines() if line.startswith("{")]
    return out


def summary(ev: list[dict]) -> dict:
    """Steps, the processes' time (start to done), median tokens/s and MFU, peak memory, the evals."""
    steps = [e for e in ev if e.get("event") == "step"]
    tps = sorted(e["tokens_per_s"] for e in steps)
    mfu = sorted(e["mfu"] for e in steps if e.get("mfu") is not None)
    done = [e for e in ev if e.get("event") == "done"]
    return dict(last_step=max((e["step"] for e in steps), default=0), processes=len(done),
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
    p.add_argument("--png", type=Path, required=True, help="where the plot goes")
    p.add_argument("--title", default="gpt2 preset, default command", help="the plot's title")
    args = p.parse_args()
    ev = events(args.events)
    train = [(e["step"], e["train_loss"]) for e in ev if e.get("event") == "step"]
    val = [(e["step"], e["val_loss"]) for e in ev if e.get("event") == "eval"]
    bpb = [(e["step"], e["val_bpb"]) for e in ev if e.get("event") == "eval"]
    whole = [e for e in ev if e.get("event") == "final_eval"]
    last = dict(step=whole[-1]["step"], value=whole[-1]["val_bpb"]) if whole else None
    atomic_write_bytes(args.png, curves_png(args.title, train, val, bpb, last))
    print(json.dumps(summary(ev), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
