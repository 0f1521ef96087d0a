"""Compile the hash dropout (model.dropout) as the trainer does, on CUDA, in both of its integer forms, and print
what Inductor/Triton say: a first check before `train_bench speed --variants gemm@hash` spends device time."""
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model.dropout as D  # noqa: E402


def case(wide: bool) -> bool:
    torch._dynamo.reset()
    D.WIDE = wide
    x = torch.randn(128, 512, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(128, 512, 512, device="cuda", dtype=torch.bfloat16)
    f = torch.compile(lambda a, b: torch.nn.functional.layer_norm(b + D.hash_dropout(a, 0.1), (512,)))
    try:
        t = time.perf_counter()
        y = f(x, r)
        y.float().square().sum().backward()
        torch.cuda.synchronize()
        kept = (x.grad != 0).float().mean().item()
        print(f"wide={wide}: OK in {time.perf_counter() - t:.1f} s, kept {kept:.5f} (expect ~0.9)", flush=True)
        return True
    except Exception:
        print(f"wide={wide}: FAILED\n" + traceback.format_exc()[-4000:], flush=True)
        return False


if __name__ == "__main__":
    ok = [w for w in (False, True) if case(w)]
    print("works:", ",".join("wide" if w else "narrow" for w in ok) or "none")
