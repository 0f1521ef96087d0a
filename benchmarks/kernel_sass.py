"""Compiles --head gemm's logits GEMM for sm_90 without a GPU and counts its SASS instructions by opcode.
The epilogue (exp2, masks, row sums, bf16 packing) runs once per output element, so its instruction count is what
a change there costs every step; this measures that count, not time (run it with the Triton the GPU runs).

    .venv/bin/python benchmarks/kernel_sass.py [--top 12]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real: the interpreter makes no SASS
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from model import head_gemm as G  # noqa: E402

NVDISASM = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"


def sass_ops() -> tuple[Counter, bool]:
    """(SASS opcodes and their counts, whether every exp2 in the PTX flushes subnormal results to zero)."""
    c = {**G.GEMM_CONFIG}
    bm, bn, bk = c["BM"], c["BN"], c["BK"]
    split = bn // 2 if c["split"] else bn
    sig = {"a_desc": f"tensordesc<bf16[{bm},{bk}]>", "b_desc": f"tensordesc<bf16[{bn},{bk}]>",
           "e_desc": f"tensordesc<bf16[{bm},{split}]>", "ref_ptr": "*fp32", "tgt_ptr": "*i64", "part_ptr": "*fp32",
           "M": "i32", "V": "i32", "VP": "i32", "K": "i32", "n_tiles_n": "i32",
           **{k: "constexpr" for k in ("BM", "BN", "BK", "GROUP", "NUM_SMS", "SPLIT", "UPCAST")}}
    const = dict(BM=bm, BN=bn, BK=bk, GROUP=c["GROUP"], NUM_SMS=132, SPLIT=bool(c["split"]), UPCAST=False)
    k = triton.compile(ASTSource(G._logits_exp_tma_kernel, sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": c["warps"], "num_stages": c["stages"]})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        text = subprocess.run([str(NVDISASM), "-c", f.name], capture_output=True, text=True, check=True).stdout
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[0-9T] )?([A-Z][A-Z0-9._]*)", text, re.M)
    ex2 = re.findall(r"ex2\.approx(\.ftz)?\.f32", k.asm["ptx"])
    return Counter(ops), bool(ex2) and all(ex2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--top", type=int, default=12, help="opcodes to list per variant")
    a = p.parse_args()
    print(f"triton {triton.__version__}, sm_90, config {G.GEMM_CONFIG}")
    ops, ftz = sass_ops()  # --grad-floor runs this same kernel (another offset), so there is one
    # the floor is exp2's flush of results under 2^-126 (head_gemm.offset2_for): it needs ex2.approx.ftz
    print(f"{sum(ops.values())} instructions, MUFU.EX2 {ops['MUFU.EX2']}, exp2 flushes subnormals: {ftz}")
    print("   " + ", ".join(f"{op} {n}" for op, n in ops.most_common(a.top)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
