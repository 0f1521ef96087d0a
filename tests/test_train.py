"""The trainer on CPU from real shards: loss falls, bit-exact resume, NaN stop, bad input, DDP x2.
Each test copies a home prepared once by the real pipeline; runs are in-process except DDP (torchrun)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from model import checkpoint as ckpts
from tests.train_fixtures import FAST, metrics_rows, run_trainer, train_home  # noqa: F401
from tests.conftest import ROOT


def test_tiny_run_learns_and_checkpoints(train_home):
    code, events, text = run_trainer(train_home, *FAST, "--max-steps", "40", "--run-id", "r", "--eval-every", "20",
                                     "--keep-last", "1", "--ckpt-every", "10")
    assert code == 0, text
    train, val = metrics_rows(train_home, "r")
    assert sorted(train) == list(range(1, 41))  # one row per step
    first, last = sum(train[s] for s in range(1, 6)) / 5, sum(train[s] for s in range(36, 41)) / 5
    assert last < first - 0.5, (first, last)
    assert val[40] < val[20] < 6.9  # below uniform over 1,024 tokens (ln 1024 = 6.93)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("eval") == 2 and kinds[-2] == "final_eval"
    # the sampled windows' bpb at each eval, the whole split's at the end (tokens, bytes and split named)
    assert all(0 < e["val_bpb"] < 20 for e in events if e["event"] == "eval")
    fin = events[-2]
    assert fin["step"] == 40 and 0 < fin["val_bpb"] < 20 and fin["split_size"] > fin["n_tokens"] > 0
    assert fin["n_bytes"] > fin["n_tokens"] and len(fin["split_id"]) == 64
    assert events[0]["config"]["model"]["dropout_rng"] == "torch"  # auto, resolved for the CPU and saved so
    # --grad-floor auto: kept as auto (a resume on CUDA takes the floor there), none on the CPU's plain head
    assert events[0]["config"]["grad_floor"] == "auto" and events[0]["grad_floor"] is None
    # where the wall clock went: start-up before the loop, the first step, the rest, all on one clock
    first = next(e for e in events if e["event"] == "first_step")
    assert first["step"] == 1 and kinds.index("first_step") < kinds.index("eval")
    assert 0 < events[0]["process_s"] < first["process_s"] <= events[-1]["process_s"]
    assert 0 < first["seconds"] < events[-1]["elapsed_s"]
    out = events[-1]["outside_steps_s"]  # evals, samples, checkpoint hand-offs, the last write: all within the loop
    assert set(out) == {"eval", "sample", "checkpoint", "final_wait", "final_eval"}
    assert out["eval"] > 0 and out["checkpoint"] > 0 and out["final_eval"] > 0
    assert sum(out.values()) < events[-1]["elapsed_s"]
    # keep-last 1 plus the best: step 40 is both, so exactly one survives
    infos = ckpts.list_complete(ckpts.checkpoint_root(train_home, "r"))
    assert [i.step for i in infos] == [40]
    samples = [json.loads(x) for x in (train_home.run_dir("r") / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [20, 40] and all(s["text"] for s in samples)


@pytest.mark.parametrize("rng", ["torch", "hash"])
def test_resume_is_bit_exact(train_home, rng):
    # the dropout rng is no flag: the CPU resolves auto to torch, CUDA to hash; the hash's masks are asked for
    # here as a Python caller can (`settings`), so its resume is checked on the CPU too
    common = [*FAST, "--schedule-steps", "16", "--eval-every", "4", "--ckpt-every", "4"]
    rng_of = {"dropout_rng": rng} if rng == "hash" else None
    assert run_trainer(train_home, *common, "--max-steps", "16", "--run-id", f"straight-{rng}", settings=rng_of)[0] == 0
    assert run_trainer(train_home, *common, "--max-steps", "8", "--run-id", f"split-{rng}", settings=rng_of)[0] == 0
    # the dropout rng comes back from the checkpoint's config
    code, events, text = run_trainer(train_home, "--resume", "--run-id", f"split-{rng}", "--max-steps", "16")
    assert code == 0, text
    assert events[0]["step"] == 8 and events[0]["resumed_from"].endswith("step_000008")
    assert events[0]["config"]["model"]["dropout_rng"] == rng
    a, va = metrics_rows(train_home, f"straight-{rng}")
    b, vb = metrics_rows(train_home, f"split-{rng}")
    assert list(a) == list(range(1, 17)) and a == b  # identical floats at every step
    assert va[16] == vb[16]
    if rng == "hash":  # and the masks really are the hash's: the same init and data under torch's dropout differ
        assert run_trainer(train_home, *FAST, "--max-steps", "2", "--run-id", "torch-rng")[0] == 0
        t, _ = metrics_rows(train_home, "torch-rng")
        assert t[1] != a[1]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(train_home):
    assert run_trainer(train_home, *FAST, "--max-steps", "4", "--run-id", "n", "--ckpt-every", "4")[0] == 0
    # an absurd learning rate overflows the weights within a step or two: a real NaN, not an injected one
    code, events, text = run_trainer(train_home, "--resume", "--max-steps", "12", "--lr", "1e30",
                                     "--warmup-steps", "1")
    assert code == 3
    err = events[-1]
    assert err["event"] == "error" and err["kind"] == "nan" and "step_000004" in err["message"]
    assert "non-finite loss" in text
    assert [i.step for i in ckpts.list_complete(ckpts.checkpoint_root(train_home, "n"))] == [4]
    ckpts.load_train_state(ckpts.latest(ckpts.checkpoint_root(train_home, "n")).path)  # still loadable


def test_bad_inputs_fail_with_one_line(train_home, tmp_path):
    # no train shards
    for p in train_home.shards.glob("*.train.bin"):
        p.rename(p.with_suffix(".moved"))
    code, _, text = run_trainer(train_home, *FAST, "--max-steps", "2")
    assert code == 2 and "no train shards" in text
    for p in train_home.shards.glob("*.moved"):
        p.rename(p.with_suffix(".bin"))
    # a checkpoint made with another tokenizer
    assert run_trainer(train_home, *FAST, "--max-steps", "2", "--run-id", "t")[0] == 0
    tok = json.loads(train_home.tokenizer.read_text())
    train_home.tokenizer.write_text(json.dumps(tok, indent=2))  # same vocabulary, other file
    code, _, text = run_trainer(train_home, "--resume", "--max-steps", "4")
    assert code == 2 and "differs from the tokenizer checkpoint" in text
    tok["added_tokens"][0]["content"] = "<|other|>"  # one more token
    train_home.tokenizer.write_text(json.dumps(tok))
    code, _, text = run_trainer(train_home, "--resume", "--max-steps", "4")
    assert code == 2 and "vocab size 1025 differs from 1024" in text
    # a bad parameter
    code, _, text = run_trainer(train_home, *FAST, "--batch-tokens", "1000", "--run-id", "b")
    assert code == 2 and "--batch-tokens 1000" in text
    # bad or impossible head options: refused before any run folder exists
    for flags, msg in ((("--head", "fp9"), "--head fp9: expected"),
                       (("--grad-floor", "-24"), "--grad-floor -24 needs --head fused or gemm (the head here is plain)"),
                       (("--grad-floor", "3"), "--grad-floor 3: a log2 probability"),
                       (("--grad-floor", "low"), "--grad-floor low: expected auto, off or a log2 probability")):
        code, _, text = run_trainer(train_home, *FAST, *flags, "--max-steps", "2", "--run-id", "c")
        assert code == 2 and msg in text, text
        assert not (train_home.root / "runs" / "c").exists()


@pytest.mark.parametrize("head", ["fused", "gemm"])
def test_grad_floor_trains_and_is_kept_in_the_config(train_home, head):
    # the head's CPU (torch) path with a floor that zeroes most of the gradient: it still learns
    run = f"f-{head}"
    code, events, text = run_trainer(train_home, *FAST, "--head", head, "--grad-floor", "-12", "--max-steps", "30",
                                     "--run-id", run, "--eval-every", "30")
    assert code == 0, text
    train, _ = metrics_rows(train_home, run)
    assert sum(train[s] for s in range(26, 31)) / 5 < sum(train[s] for s in range(1, 6)) / 5 - 0.5
    st = ckpts.load_train_state(ckpts.latest(ckpts.checkpoint_root(train_home, run)).path)
    assert st["config"]["train"]["grad_floor"] == -12.0 and st["config"]["train"]["head"] == head


def test_grad_floor_auto_is_minus_24_on_cuda_with_a_kernel_head_only():
    import torch

    from model.head import resolve_grad_floor
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # resolving touches no device
    assert resolve_grad_floor("auto", "gemm", cuda) == -24.0 == resolve_grad_floor("auto", "fused", cuda)
    assert resolve_grad_floor("auto", "plain", cuda) is None
    assert resolve_grad_floor("auto", "gemm", cpu) is None and resolve_grad_floor("auto", "plain", cpu) is None
    assert resolve_grad_floor("off", "gemm", cuda) is None and resolve_grad_floor(None, "gemm", cuda) is None
    assert resolve_grad_floor(-12, "fused", cpu) == -12.0
    with pytest.raises(ValueError, match="--grad-floor -12 needs --head fused or gemm"):
        resolve_grad_floor(-12, "plain", cuda)
    # on the command line: off must reach the config (it overrides a checkpoint's auto), a number as a float
    import argparse

    from model.args import add_config_args, overrides
    ap = argparse.ArgumentParser()
    add_config_args(ap)
    assert overrides(ap.parse_args(["--grad-floor", "off"])) == {"grad_floor": "off"}
    assert overrides(ap.parse_args(["--grad-floor", "-24"])) == {"grad_floor": -24.0}
    assert overrides(ap.parse_args([])) == {}


def test_gemm_head_trains_as_the_plain_head(train_home):
    # --head gemm on CPU (its torch path: the loss from exp(logit - target logit), the 1/S scale applied in the
    # backward) against the plain cross-entropy, same data and seed, dropout 0: the same losses step by step
    losses = {}
    for head in ("plain", "gemm"):
        code, _, text = run_trainer(train_home, *FAST, "--head", head, "--dropout", "0", "--max-steps", "12",
                                    "--run-id", f"h-{head}", "--eval-every", "12")
        assert code == 0, text
        losses[head], _ = metrics_rows(train_home, f"h-{head}")
    assert sorted(losses["gemm"]) == list(range(1, 13))
    for step, loss in losses["plain"].items():
        assert losses["gemm"][step] == pytest.approx(loss, rel=1e-4), step
    assert losses["gemm"][12] < losses["gemm"][1] - 0.5
    st = ckpts.load_train_state(ckpts.latest(ckpts.checkpoint_root(train_home, "h-gemm")).path)
    assert st["config"]["train"]["head"] == "gemm"


@pytest.mark.timeout(600)
def test_ddp_two_ranks_match_one_rank_with_accumulation(train_home):
    # dropout 0 so both runs compute the same function; data depends on (step, micro * world + rank)
    args = ["-m", "model.train", "--home", str(train_home.root), *FAST, "--max-steps", "6", "--dropout", "0",
            "--eval-every", "6", "--ckpt-every", "6"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, *args, "--run-id", "one"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          *args, "--run-id", "two"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    start = json.loads(next(x for x in two.stdout.splitlines() if x.startswith('{"event": "start"')))
    assert start["world"] == 2 and start["accum"] == 1
    a, _ = metrics_rows(train_home, "one")
    b, _ = metrics_rows(train_home, "two")
    assert list(a) == list(b) == list(range(1, 7))
    for s in a:  # the same sequences and weights: only the reduction order differs
        assert b[s] == pytest.approx(a[s], rel=1e-4), (s, a[s], b[s])
    assert len(ckpts.list_complete(ckpts.checkpoint_root(train_home, "two"))) == 1  # rank 0 alone writes


def test_every_train_flag_has_a_help_line_with_its_default():
    # `python -m model.train --help` in a fresh process: every option is listed with a help line; the config flags
    # (generated from the fields' metadata) also state their default, and experiment-only knobs are gone
    import re

    from model.args import flag_fields
    out = subprocess.run([sys.executable, "-m", "model.train", "--help"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="100"), timeout=120)
    assert out.returncode == 0, out.stderr
    options = out.stdout.split("options:\n", 1)[1].split("\n\n")[0]
    entries: dict[str, str] = {}  # flag -> its help text (argparse puts it after the flag or on indented lines)
    flag = None
    for line in options.splitlines():
        m = re.match(r"^  (-\S.*?)(?:\s{2,}(.*))?$", line)
        if m:
            flag = re.findall(r"--[\w-]+", m.group(1))[0]
            entries[flag] = m.group(2) or ""
        else:
            entries[flag] += " " + line.strip()
    assert all(text.strip() for text in entries.values()), [f for f, t in entries.items() if not t.strip()]
    fields = flag_fields()
    want = {"--help", "--home", "--run-id", "--resume", "--shard-list", "--tokenizer", "--preset"}
    assert set(entries) == want | {"--" + name.replace("_", "-") for name, _, _ in fields}
    for name, tp, text in fields:
        shown = " ".join(entries["--" + name.replace("_", "-")].split())
        assert shown == text and re.search(r"\(default: [^)]+\)$", text) and isinstance(tp, type), (name, shown)
    for gone in ("--stream-dtype", "--peak-tflops", "--compile-scope", "--dropout-rng", "--vocab-size"):
        assert gone not in out.stdout
    assert dict((n, t) for n, t, _ in fields)["grad_floor"] is str  # auto, off or a number: parsed by the trainer
