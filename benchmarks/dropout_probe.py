"""Compile the hash dropout (model.dropout) fused with a residual add and LayerNorm, as in the trainer, on CUDA,
and print what Inductor/Triton say: a cheap check before `train_bench speed` (whose default step draws these masks) spends device time."""
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model.dropout as D  # noqa: E402


def case() -> bool:
    torch._dynamo.reset()
    x = torch.randn(128, 512, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(128, 512, 512, device="cuda", dtype=torch.bfloat16)
    drop = D.Dropout(0.1, "hash", site=1).cuda()
    f = torch.compile(lambda a, b: torch.nn.functional.layer_norm(b + drop(a), (512,)))
    try:
        for call in range(2):
            t = time.perf_counter()
            x.grad = None
            y = f(x, r)
            y.float().square().sum().backward()
            torch.cuda.synchronize()
            kept = (x.grad != 0).float().mean().item()
            ref = D.Dropout(0.1, "hash", site=1).cuda()
            ref.reseed(0, call)
            same = torch.equal(x.grad != 0, ref(torch.ones_like(x)) != 0)
            print(f"call {call}: OK in {time.perf_counter() - t:.1f} s, kept {kept:.5f} (expect ~0.9), "
                  f"gradient's mask is the eager mask of this call: {same}", flush=True)
            if not same:
                return False
        return True
    except Exception:
        print("FAILED\n" + traceback.format_exc()[-4000:], flush=True)
        return False


if __name__ == "__main__":
    print("works: yes" if case() else "works: none")
