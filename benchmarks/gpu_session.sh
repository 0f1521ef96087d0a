#!/usr/bin/env bash
# One device call's worth of training benchmarks: the step of the project's default set-up against a plain
# nanoGPT-style one at dropout 0.1 and 0, then the original's whole run (5000 x 65,536 tokens) timed from process
# start to exit. Results under $OUT. Run on the GPU machine from the repo root, with shards made here by
# `train_bench.py make-data` carried along (benchmarks/out/home): bash benchmarks/gpu_session.sh
# PARTS picks what runs, to split it over calls: ce = the CE kernel against its first version, gemm = --head gemm's
# tiles (head_bench --gemm), glue = the fused head's backward passes and grad-x widths (head_bench --glue), speed
# (with the SM clock and power sampled beside it), compile = short trainer runs timing start-up + compile cold and
# warm, homecache = two short runs on the home's own compile cache, dropout = the hash dropout compiled on CUDA
# (masks checked), ckpt = the checkpoint hand-off (benchmarks/ckpt_probe.py), seed.
# gpt2 = --preset gpt2's step against the plain nanoGPT-style one (524,288 tokens a step by accumulation; GPT2_MICRO
# sets the micro-batch of both, else the trainer's choice; GPT2_VARIANTS: train_bench's variants), gpt2run = the gpt2
# run's first 1,000 of its 19,073 steps with the default command, in calls of under 10 minutes on the same warm
# machine: each call trains (or resumes) to GPT2_STOP (default 1000) and writes its events to
# $OUT/gpt2run_STEP.jsonl. gpt2quality = val loss at step 1,000 of
# QUALITY_VARIANTS (default plain,default) at QUALITY_BATCH tokens a step (default 32,768: under three passes over the
# home's shards; one micro-batch for every run, the trainer's choice), the same shards and seed (QUALITY_FLOOR: the
# heads' gradient floor, auto or off; QUALITY_SEEDS: seeds to run each variant from).
# gpt2attn = causal attention alone at the gpt2 shape, each kernel torch has (train_bench.py attention).
# gpt2profile = the top kernels and GPU gaps of both gpt2 steps (train_bench.py profile).
# SEED_HEAD: the seed run's --head; SEED_EXTRA: more trainer flags (e.g. --grad-floor off); SEED_WARMUP=N: an N-step
# run first.
set -uo pipefail
export PYTHONUNBUFFERED=1
# the GPU image ships torch without .pyc and sets PYTHONDONTWRITEBYTECODE=1, so every process would recompile
# torch's Python at start-up: keep bytecode in a cache of ours (nothing is written beside the sources)
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-$HOME/.cache/langpwt/pycache}
unset PYTHONDONTWRITEBYTECODE
OUT=${OUT:-benchmarks/out/gpu}
HOME_DIR=${HOME_DIR:-benchmarks/out/home}
VARIANTS=${VARIANTS:-plain,default}
SEED_HEAD=${SEED_HEAD:-auto}
PARTS=${PARTS:-ce,speed,seed}
has() { [[ ",$PARTS," == *",$1,"* ]]; }
# the logs without warnings
quiet() { grep -v Warning; }
mkdir -p "$OUT"
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,power.limit,memory.total --format=csv,noheader
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} | tee "$OUT/env.txt"
if has ce; then
  python3 benchmarks/head_bench.py --ce-only --json "$OUT/ce.json" 2>&1 | quiet | tee "$OUT/ce.log"
fi
if has gemm; then  # --head gemm's tile configurations against cuBLAS + the CE kernel; the fastest feeds `speed`
  python3 benchmarks/head_bench.py --gemm --gemm-best "$OUT/gemm_best.json" --json "$OUT/gemm.json" 2>&1 | quiet | tee "$OUT/gemm.log"
fi
if has glue; then
  python3 benchmarks/head_bench.py --glue --json "$OUT/glue.json" 2>&1 | quiet | tee "$OUT/glue.log"
fi
if has speed; then  # the card runs at its power cap: clocks beside the step rate say when it throttles
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv,noheader -lms 250 > "$OUT/smi.csv" &
  smi=$!
fi
has speed && python3 benchmarks/train_bench.py speed --home "$HOME_DIR" --variants "$VARIANTS" --dropouts 0.1,0.0 \
  --gemm-config "$OUT/gemm_best.json" --json "$OUT/speed.json" 2>&1 | quiet | tee "$OUT/speed.log"
if has speed; then
  kill $smi 2>/dev/null
  python3 - "$OUT/smi.csv" <<'PY' | tee -a "$OUT/speed.log"
import sys
rows = [l.split(", ") for l in open(sys.argv[1]) if l.count(",") >= 3]
busy = [(float(r[1].split()[0]), float(r[2].split()[0])) for r in rows if float(r[2].split()[0]) > 400]
if busy:
    clk, pw = sorted(c for c, _ in busy), sorted(p for _, p in busy)
    print(f"while busy (> 400 W, {len(busy)} samples of 250 ms): SM clock median {clk[len(clk) // 2]:.0f} MHz "
          f"(min {clk[0]:.0f}, max {clk[-1]:.0f}), power median {pw[len(pw) // 2]:.0f} W (max {pw[-1]:.0f})")
PY
fi
# first step (start-up + compile) of short trainer runs, each in a fresh process: cold, then warm
short() {  # name cache_dir ("home": the trainer's own choice, HOME/cache/compile)
  rm -rf "$HOME_DIR/runs/$1"
  if [[ $2 == home ]]; then cache=(env -u TORCHINDUCTOR_CACHE_DIR -u TRITON_CACHE_DIR); else
    cache=(env TORCHINDUCTOR_CACHE_DIR="$2" TRITON_CACHE_DIR="$2/triton"); fi
  "${cache[@]}" timeout 200 python3 -m model.train --home "$HOME_DIR" --preset seed --max-steps "${SHORT_STEPS:-150}" \
    --run-id "$1" > "$OUT/$1.jsonl" 2> "$OUT/$1.err"
  python3 - "$OUT/$1.jsonl" "$1" <<'PY' | tee -a "$OUT/compile_summary.txt"
import json, sys
ev = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
one = lambda k: next((e for e in ev if e.get("event") == k), {})
tps = [e["tokens_per_s"] for e in ev if e.get("event") == "step"]
print(f"{sys.argv[2]}: start-up {one('start').get('startup_s')}, first step {one('first_step').get('seconds', 0):.1f} s, "
      f"tok/s per 50 steps {[round(t / 1e6, 3) for t in tps]}, done at {one('done').get('process_s', 0):.1f} s")
PY
}
if has homecache; then  # the compile caches the trainer keeps in the home: a second run must start warm
  rm -rf "$HOME_DIR/cache/compile"
  SHORT_STEPS=30 short home-1 home; SHORT_STEPS=30 short home-2 home
  { du -sh "$HOME_DIR"/cache/compile/* 2>&1; grep '"event": "start"' "$OUT/home-2.jsonl" | grep -o '"compile_cache": {[^}]*}'; } | tee -a "$OUT/compile_summary.txt"
fi
if has compile; then
  c=$(mktemp -d); short cold "$c"; short warm "$c"
fi
if has dropout; then  # the hash dropout compiled on CUDA, its masks checked against eager
  python3 benchmarks/dropout_probe.py 2>&1 | quiet | tee "$OUT/dropout_probe.log"
fi
if has ckpt; then  # what a checkpoint's submit holds the loop for, and that the files hold the submitted step
  python3 benchmarks/ckpt_probe.py --json "$OUT/ckpt.json" 2>&1 | quiet | tee "$OUT/ckpt.log"
fi
if has gpt2; then
  python3 benchmarks/train_bench.py speed --preset gpt2 --home "$HOME_DIR" --variants "${GPT2_VARIANTS:-plain,default}" \
    --steps "${GPT2_STEPS:-20}" --warmup "${GPT2_WARMUP:-4}" ${GPT2_MICRO:+--micro-batch "$GPT2_MICRO"} \
    --json "$OUT/gpt2.json" 2>&1 | quiet | tee "$OUT/gpt2.log"
fi
if has gpt2profile; then  # where a gpt2 micro-step's GPU time goes, default against plain (GPT2_MICRO sequences)
  python3 benchmarks/train_bench.py profile --preset gpt2 --home "$HOME_DIR" --variants plain,default \
    --micro-batch "${GPT2_MICRO:-64}" --warmup 3 --steps 30 --out "$OUT" 2>&1 | quiet | tee "$OUT/gpt2profile.log"
fi
if has gpt2attn; then  # causal attention alone at the gpt2 shape: each SDPA backend and flex_attention
  python3 benchmarks/train_bench.py attention --preset gpt2 --micro-batch "${GPT2_MICRO:-16}" \
    --json "$OUT/gpt2attn.json" 2>&1 | quiet | tee "$OUT/gpt2attn.log"
fi
if has gpt2quality; then
  python3 benchmarks/train_bench.py quality --preset gpt2 --home "$HOME_DIR" --variants "${QUALITY_VARIANTS:-plain,default}" \
    --steps 1000 --batch-tokens "${QUALITY_BATCH:-32768}" --grad-floor "${QUALITY_FLOOR:-auto}" \
    ${QUALITY_SEEDS:+--seeds "$QUALITY_SEEDS"} \
    --json "$OUT/gpt2quality.json" 2>&1 | quiet | tee "$OUT/gpt2quality.log"
fi
if has gpt2run; then  # resumes the run a previous call on this machine left at a checkpoint (the run's last step)
  stop=${GPT2_STOP:-1000}
  if compgen -G "$HOME_DIR/runs/gpt2-run/checkpoints/step_*" > /dev/null; then how=(--resume); else
    how=(--preset gpt2 --schedule-steps 19073); fi
  python3 -m model.train --home "$HOME_DIR" --run-id gpt2-run "${how[@]}" --max-steps "$stop" \
    > "$OUT/gpt2run_$stop.jsonl" 2> "$OUT/gpt2run_$stop.err"
  echo "gpt2run to step $stop: exit $?" | tee -a "$OUT/gpt2run_summary.txt"
  python3 benchmarks/run_curves.py "$OUT/gpt2run_$stop.jsonl" | tee -a "$OUT/gpt2run_summary.txt"
fi
has seed || exit 0
# the seed run: a fresh Inductor cache, so the compile is counted cold (SEED_CACHE=DIR reuses one: a rerun)
export TORCHINDUCTOR_CACHE_DIR=${SEED_CACHE:-$(mktemp -d)}
export TRITON_CACHE_DIR=$TORCHINDUCTOR_CACHE_DIR/triton  # else the trainer keeps Triton's under the home
if [[ -n ${SEED_WARMUP:-} ]]; then  # a short run first on the same caches: the seed run then starts warm
  rm -rf "$HOME_DIR/runs/seed-warmup"
  timeout 200 python3 -m model.train --home "$HOME_DIR" --preset seed --max-steps "$SEED_WARMUP" --head "$SEED_HEAD" \
    ${SEED_EXTRA:-} --run-id seed-warmup > "$OUT/seed_warmup.jsonl" 2>&1
  grep -o '"startup_s": {[^}]*}' "$OUT/seed_warmup.jsonl" | tee -a "$OUT/seed_summary.txt"
fi
echo "seed run flags: --head $SEED_HEAD ${SEED_EXTRA:-}" | tee -a "$OUT/seed_summary.txt"
rm -rf "$HOME_DIR/runs/seed-bench"
start=$(date +%s.%N)
timeout "${SEED_LIMIT:-330}" python3 -m model.train --home "$HOME_DIR" --preset seed --head "$SEED_HEAD" \
  ${SEED_EXTRA:-} --run-id seed-bench > "$OUT/seed.jsonl" 2> "$OUT/seed.err"
rc=$?
end=$(date +%s.%N)
python3 - "$OUT/seed.jsonl" "$start" "$end" "$rc" <<'EOF' | tee -a "$OUT/seed_summary.txt"
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
fin = next((e for e in ev if e.get("event") == "final_eval"), None)
if fin:
    print(f"  val bpb over the whole val split {fin['val_bpb']:.4f} (loss {fin['val_loss']:.4f}, {fin['split_size']:,} "
          f"tokens, split {fin['split_id'][:12]}, {fin['seconds']:.1f} s)")
if begin.get("process_s") and done.get("process_s"):
    print(f"  start-up {begin['process_s']:.1f} s {begin.get('startup_s')}, first step (compile) "
          f"{first.get('seconds', 0):.1f} s, exit {end - start - done['process_s']:.1f} s after the done event")
EOF
