#!/usr/bin/env bash
# One device call's worth of training benchmarks: the step per head at dropout 0.1 and 0, then the
# original's whole run (5000 x 65,536 tokens) timed from process start to exit. Results under $OUT.
# Run on the GPU machine from the repo root, with shards made here by `train_bench.py make-data`
# carried along (benchmarks/out/home): bash benchmarks/gpu_session.sh
# PARTS picks what runs (ce = the CE kernel against its previous version, speed, seed), to split it over calls.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/out/gpu}
HOME_DIR=${HOME_DIR:-benchmarks/out/home}
VARIANTS=${VARIANTS:-plain,fused,fp8all}
SEED_HEAD=${SEED_HEAD:-auto}
PARTS=${PARTS:-ce,speed,seed}
has() { [[ ",$PARTS," == *",$1,"* ]]; }
mkdir -p "$OUT"
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,power.limit,memory.total --format=csv,noheader
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} | tee "$OUT/env.txt"
if has ce; then
  python3 benchmarks/head_bench.py --ce-only --json "$OUT/ce.json" 2>&1 | grep -v Warning | tee "$OUT/ce.log"
fi
has speed && python3 benchmarks/train_bench.py speed --home "$HOME_DIR" --variants "$VARIANTS" --dropouts 0.1,0.0 \
  --bf16-stream --json "$OUT/speed.json" 2>&1 | grep -v Warning | tee "$OUT/speed.log"
has seed || exit 0
# the seed run: a fresh Inductor cache, so the compile is counted cold
export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
start=$(date +%s.%N)
timeout "${SEED_LIMIT:-330}" python3 -m model.train --home "$HOME_DIR" --preset seed --head "$SEED_HEAD" \
  --run-id seed-bench > "$OUT/seed.jsonl" 2> "$OUT/seed.err"
rc=$?
end=$(date +%s.%N)
python3 - "$OUT/seed.jsonl" "$start" "$end" "$rc" <<'EOF' | tee "$OUT/seed_summary.txt"
import json, sys
path, start, end, rc = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
ev = [json.loads(l) for l in open(path) if l.startswith("{")]
evals = [(e["step"], round(e["val_loss"], 4)) for e in ev if e.get("event") == "eval"]
steps = [e for e in ev if e.get("event") == "step"]
done = next((e for e in ev if e.get("event") == "done"), {})
begin = next((e for e in ev if e.get("event") == "start"), {})
first = next((e for e in ev if e.get("event") == "first_step"), {})
tps = sorted(e["tokens_per_s"] for e in steps)
print(f"seed run: exit {rc}, wall {end - start:.1f} s process start to exit, loop {done.get('elapsed_s', 0):.1f} s, "
      f"median {tps[len(tps) // 2] / 1e6 if tps else 0:.3f} M tok/s, evals {evals}")
if begin.get("process_s") and done.get("process_s"):
    print(f"  start-up {begin['process_s']:.1f} s, first step (compile) {first.get('seconds', 0):.1f} s, "
          f"exit {end - start - done['process_s']:.1f} s after the done event")
EOF
