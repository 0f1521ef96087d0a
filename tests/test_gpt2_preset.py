"""--preset gpt2: its values, the micro-batch chosen from the device's memory, and a shrunken run on CPU that
accumulates, resumes bit-exactly, chooses its own micro-batch and exports. The full-size model runs on the GPU only."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from model.config import preset
from model.memory import HEADROOM, MICRO_BATCHES, choose_micro_batch, estimate_bytes, rows_per_rank
from tests.conftest import ROOT
from tests.train_fixtures import metrics_rows, run_trainer, train_home  # noqa: F401

GB = 10 ** 9
# the shrunken gpt2 of the CPU runs: 8 sequences of 64 tokens a step, 4 micro-batches of 2
SMALL = ["--preset", "gpt2", "--n-layer", "2", "--n-embd", "64", "--n-head", "2", "--block-size", "64",
         "--batch-tokens", "512", "--eval-every", "2", "--ckpt-every", "2", "--eval-batches", "2", "--log-every", "1",
         "--schedule-steps", "4", "--warmup-steps", "2", "--sample-tokens", "4"]


def test_gpt2_preset_is_gpt2_small_trained_on_ten_billion_tokens():
    cfg = preset("gpt2", 48_951)
    m = cfg.model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout) == (12, 12, 768, 1024, 0.0)
    assert m.padded_vocab == 49_152
    assert cfg.batch_tokens == 524_288 and cfg.micro_batch is None  # chosen by the trainer
    assert (cfg.lr, cfg.beta1, cfg.beta2, cfg.weight_decay, cfg.min_lr_ratio) == (6e-4, 0.9, 0.95, 0.1, 0.1)
    assert (cfg.warmup_steps, cfg.max_steps, cfg.eval_every, cfg.ckpt_every) == (700, 19_073, 250, 1000)
    assert 9.9e9 < cfg.max_steps * cfg.batch_tokens < 1.01e10
    from model.args import PRESET_HELP
    assert "gpt2" in PRESET_HELP


def test_micro_batch_choice_follows_the_free_memory():
    cfg = preset("gpt2", 48_951)
    big, small = choose_micro_batch(cfg, 80 * GB), choose_micro_batch(cfg, 24 * GB)
    assert big in MICRO_BATCHES and small in MICRO_BATCHES and small < big
    choices = [choose_micro_batch(cfg, gb * GB) or 0 for gb in range(1, 200)]
    assert choices == sorted(choices) and choices[0] == 0 and choices[-1] == MICRO_BATCHES[0]  # monotonic
    for gb, mb in zip(range(1, 200), choices):
        if mb:  # it fits, and the next power of two would not
            assert estimate_bytes(cfg, mb, cuda=True) <= HEADROOM * gb * GB
            if 2 * mb <= MICRO_BATCHES[0]:
                assert estimate_bytes(cfg, 2 * mb, cuda=True) > HEADROOM * gb * GB
    # the choice divides each rank's sequences of a step: 8 ranks share 512 sequences, 64 each
    assert rows_per_rank(cfg, 8) == 64 and choose_micro_batch(cfg, 200 * GB, world=8) == 64
    odd = cfg.override({"batch_tokens": 3 * 1024})
    assert choose_micro_batch(odd, 200 * GB) == 1  # 3 sequences a step: only 1 divides them
    # the CPU keeps fp32 activations, logits and their gradient, and attention's probabilities: less fits
    assert choose_micro_batch(cfg, 80 * GB, cuda=False) < big
    assert estimate_bytes(cfg, 8, cuda=False) > estimate_bytes(cfg, 8, cuda=True)


def test_cli_refuses_a_cpu_gpt2_that_fits_nowhere_and_lets_one_that_fits_pass():
    from tasks.train import check_memory

    cpu = preset("gpt2", 48_951).override({"device": "cpu"})
    check_memory(cpu, available=64 * GB)  # the trainer picks a micro-batch that fits
    with pytest.raises(ValueError, match=r"^--micro-batch: the gpt2 model needs about [\d.]+ GB on the CPU even "
                                         r"with 1 sequence, 2.0 GB available; try --preset tiny$"):
        check_memory(cpu, available=2 * GB)
    check_memory(cpu.override({"micro_batch": 2}), available=64 * GB)  # given, and it fits


def test_small_gpt2_accumulates_resumes_bit_exactly_and_picks_its_micro_batch(train_home, tmp_path):
    given = [*SMALL, "--micro-batch", "2"]
    code, events, text = run_trainer(train_home, *given, "--max-steps", "4", "--run-id", "straight")
    assert code == 0, text
    start = events[0]
    assert start["accum"] == 4 and start["micro_batch"] == 2 and start["micro_batch_from"] == "given"
    assert start["config"]["preset"] == "gpt2" and start["config"]["model"]["dropout"] == 0.0
    assert start["config"]["lr"] == 6e-4 and start["config"]["max_steps"] == 4
    code, first, text = run_trainer(train_home, *given, "--max-steps", "2", "--run-id", "split")
    assert code == 0, text
    code, events, text = run_trainer(train_home, "--resume", "--run-id", "split", "--max-steps", "4")
    assert code == 0, text
    assert events[0]["step"] == 2 and events[0]["micro_batch"] == 2 and events[0]["accum"] == 4
    a, va = metrics_rows(train_home, "straight")
    b, vb = metrics_rows(train_home, "split")
    assert list(a) == [1, 2, 3, 4] and a == b and va == vb  # identical floats at every step and evaluation
    _curves_across_resumes(tmp_path, first, events, vb)
    _exports_to_transformers(train_home, train_home.run_dir("split") / "checkpoints" / "step_000004", tmp_path)
    # no --micro-batch: the largest power of two that fits and divides the 8 sequences, said at the start
    code, events, text = run_trainer(train_home, *SMALL, "--max-steps", "1", "--run-id", "auto")
    assert code == 0, text
    assert events[0]["micro_batch"] == 8 and events[0]["accum"] == 1
    assert events[0]["micro_batch_from"].startswith("auto: the largest that fits")
    assert "micro-batch auto" in text and events[0]["config"]["micro_batch"] == 8  # saved: a resume keeps it


def _exports_to_transformers(home, step, tmp_path) -> None:
    """`langpwt export` of the resumed gpt2 run: transformers loads it as GPT-2 of the run's shape and computes
    what our model computes on real val windows."""
    from transformers import AutoModelForCausalLM

    from flows.cli import main
    from model.generate import load_model
    from tests.eval_fixtures import check_same, real_windows

    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(step), "--out", str(out)]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    c = hf.config
    assert (c.n_layer, c.n_head, c.n_embd, c.n_positions) == (2, 2, 64, 64)
    ours, _ = load_model(step)
    check_same(ours, hf, real_windows(home, 3, 64), c.vocab_size, 8)


def _curves_across_resumes(tmp_path, first: list[dict], second: list[dict], val: dict) -> None:
    """benchmarks/run_curves.py over the two processes' stdout: one curve from step 1 to 4, and its summary."""
    files = []
    for i, ev in enumerate((first, second)):
        files.append(tmp_path / f"events_{i}.jsonl")
        files[-1].write_text("".join(json.dumps(e) + "\n" for e in ev))
    png = tmp_path / "curve.png"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_curves.py"), *map(str, files),
                          "--png", str(png)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    assert png.read_bytes()[:4] == b"\x89PNG"
    steps = [e for e in first + second if e["event"] == "step"]
    assert got["last_step"] == 4 and got["processes"] == 2
    assert got["peak_memory_gb"] == max(e["memory_gb"] for e in steps) > 0
    assert [(s, v) for s, v, _ in got["evals"]] == [(s, round(v, 4)) for s, v in sorted(val.items())]
    assert [s for s, _ in got["whole_split_bpb"]] == [2, 4]
    assert got["median_tokens_per_s"] > 0 and got["process_s"] >= got["loop_s"] > 0
    assert (got["step"], got["micro_batch"], got["accum"]) == (0, 2, 4)  # the first process's set-up
    # the summary alone, as the GPU machine runs it: no plotting, no DuckDB imported
    code = ("import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    alone = subprocess.run([sys.executable, "-X", "importtime", "-c", code, str(ROOT / "benchmarks" / "run_curves.py"),
                            *map(str, files)], capture_output=True, text=True, timeout=120)
    assert alone.returncode == 0 and json.loads(alone.stdout) == got, alone.stderr[-2000:]
    assert not any(m in alone.stderr for m in ("duckdb", "matplotlib")), "the summary imports more than it needs"


def _train_bench(home, tmp_path, mode: str, *args: str) -> list[dict]:
    """benchmarks/train_bench.py MODE --preset gpt2 --smoke on the CPU over `home`'s shards: its JSON results."""
    out = tmp_path / f"{mode}.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_bench.py"), mode, "--preset", "gpt2",
                          "--smoke", "--device", "cpu", "--home", str(home.root), "--variants", "plain,default",
                          *args, "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return json.loads(out.read_text())["results"]


def test_train_bench_compares_gpt2_steps_on_cpu_with_smoke(train_home, tmp_path):
    # the benchmark's gpt2 comparison, shrunk (--smoke) so the script itself is checked on CPU: both steps run on the
    # real shards with gradient accumulation, and the ratio is reported (the numbers mean nothing here)
    import math

    res = _train_bench(train_home, tmp_path, "speed", "--steps", "2", "--warmup", "1")
    steps = {r["variant"]: r for r in res if "tokens_per_s" in r}
    assert set(steps) == {"plain", "default"}
    for r in steps.values():
        assert r["preset"] == "gpt2" and r["micro_batch"] == 2 and r["accum"] == 4 and r["tokens_per_s"] > 0
        assert r["dropout"] == 0.0 and math.isfinite(r["loss_end"])  # the preset's dropout
    ratio = next(r for r in res if "ratio" in r)
    assert ratio["ratio"] == "default/plain"
    assert ratio["value"] == steps["default"]["tokens_per_s"] / steps["plain"]["tokens_per_s"]


def test_train_bench_quality_runs_every_variant_on_the_same_data_and_seeds(train_home, tmp_path):
    # the loss-at-step-N comparison, shrunk: on the CPU every variant's step is the reference one, so equal data,
    # seed and initialisation must give equal losses; --batch-tokens sets the step for all of them, --seeds repeats
    # every variant from each seed, and the summary compares the means
    out = _train_bench(train_home, tmp_path, "quality", "--steps", "3", "--batch-tokens", "256", "--seeds", "1,2",
                       "--variants", "plain,default,gemm")
    runs = [r for r in out if "head" in r]
    assert [(r["head"], r["seed"]) for r in runs] == [(h, s) for s in (1, 2)
                                                        for h in ("plain", "default", "gemm")]
    for r in runs:
        assert r["batch_tokens"] == 256 and r["tokens"] == 3 * 256 and r["steps"] == 3
        assert r["val_tokens"] > 0 and 0 < r["val_bpb"] < r["val_loss"] * 2  # the whole split, every token once
    by = {(r["head"], r["seed"]): r for r in runs}
    for seed in (1, 2):
        for v in ("default", "gemm"):
            assert abs(by["plain", seed]["val_loss"] - by[v, seed]["val_loss"]) < 1e-4, runs
            assert abs(by["plain", seed]["train_loss_last20"] - by[v, seed]["train_loss_last20"]) < 1e-4, runs
    assert by["plain", 1]["val_loss"] != by["plain", 2]["val_loss"]  # another seed, another run
    summary = {r["summary"]: r for r in out if "summary" in r}
    plain = [by["plain", s]["val_loss"] for s in (1, 2)]
    assert summary["plain"]["runs"] == 2 and summary["plain"]["val_loss_mean"] == sum(plain) / 2
    assert abs(summary["plain"]["val_loss_sd"] - abs(plain[0] - plain[1]) / 2 ** 0.5) < 1e-12
    assert abs(summary["default"]["minus_plain"]) < 1e-4 and summary["default"]["minus_plain_se"] > 0
