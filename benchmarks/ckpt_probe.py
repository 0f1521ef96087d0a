"""Checkpoint hand-off on CUDA: what `BackgroundSaver.submit` costs the loop with the seed model's state, the
old host copy against the device snapshot, and whether the files hold the submitted step while later steps run.

Run on the GPU machine from the repo root: python3 benchmarks/ckpt_probe.py [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.config import GPTConfig  # noqa: E402
from model.gpt import GPT  # noqa: E402
from model import checkpoint as ckpts  # noqa: E402


def seed_state(device: str) -> tuple[GPT, torch.optim.Optimizer]:
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=48951)).to(device)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
    x = torch.randint(0, 48951, (8, 513), device=device)
    with torch.autocast("cuda", torch.bfloat16):
        loss = m(x[:, :-1], x[:, 1:])
    loss.backward()
    opt.step()
    return m, opt


def timed(fn, reps: int = 3) -> list[float]:
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        out.append(round(time.perf_counter() - t, 4))  # host time: what the loop's thread is held for
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    m, opt = seed_state("cuda")
    state = lambda: dict(model_state=m.state_dict(), optim_state=opt.state_dict(), train_state={"step": 1})
    mb = sum(t.numel() * t.element_size() for t in m.state_dict().values()) / 2**20
    r = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, model_mb=round(mb, 1),
             host_copy_s=timed(lambda: ckpts.to_host(state())),
             device_snapshot_s=timed(lambda: ckpts.Snapshot(state())))
    snap = ckpts.Snapshot(state())
    r["side_stream_to_host_s"] = timed(snap.to_host, reps=1)  # on the writer thread, off the loop

    # the files must hold the submitted step: later steps are queued at once on the loop's stream
    ref = {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
    root = Path(tempfile.mkdtemp()) / "ck"
    saver = ckpts.BackgroundSaver(keep_last=2)
    t = time.perf_counter()
    saver.submit(root, 1, config={"train": {"model": m.config.__dict__}}, val_loss=None, **state())
    r["submit_s"] = round(time.perf_counter() - t, 4)
    with torch.no_grad():
        for _ in range(20):
            for q in m.parameters():
                q.mul_(-1.5).add_(0.25)
    t = time.perf_counter()
    saver.wait()
    r["write_wait_s"] = round(time.perf_counter() - t, 4)
    _, sd = ckpts.load_weights(root / "step_000001")
    differ = [k for k, v in ref.items() if k != "lm_head.weight" and not torch.equal(sd[k], v)]
    changed = all(not torch.equal(q.detach().cpu(), ref[k]) for k, q in m.named_parameters())
    r["snapshot_matches_submitted_step"] = not differ and changed
    print(json.dumps(r))
    if a.json:
        a.json.write_text(json.dumps(r, indent=1))
    return 0 if r["snapshot_matches_submitted_step"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
