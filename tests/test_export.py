"""`langpwt export`: transformers loads the folder offline as GPT-2 and computes what our model computes.
Checked on a briefly trained tiny model and on random weights with a padded vocabulary (with and without biases)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from flows.cli import main
from model.generate import load_model
from tests.eval_fixtures import _trained, check_same, eval_home, export_reference, real_windows, step_dir  # noqa: F401


def test_export_round_trip_trained(eval_home, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", "latest", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "special_tokens_map.json", "tokenizer.json",
                                                     "tokenizer_config.json"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(hf).__name__ == "GPT2LMHeadModel" and hf.config.model_type == "gpt2"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["n_positions"], cfg["vocab_size"], cfg["n_layer"]) == (64, 1024, 2)
    ours, _ = load_model(step_dir(eval_home))
    check_same(ours, hf.eval(), real_windows(eval_home, 4, 64), 1024, 16)

    tok = AutoTokenizer.from_pretrained(out)
    from model.runtime import load_tokenizer

    ref = load_tokenizer(eval_home.tokenizer)[0]
    text = "The river's delta — 42 km² — floods each spring.\n\n  Indented line<|endoftext|>Next document"
    assert tok(text)["input_ids"] == ref.encode(text).ids
    assert tok.decode(ref.encode(text).ids) == text
    assert tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.eos_token_id == hf.config.eos_token_id

    # offline, in a process of its own (huggingface_hub reads HF_HUB_OFFLINE once, at import)
    code = ("import sys; from transformers import AutoModelForCausalLM as M, AutoTokenizer as T; "
            "print(type(M.from_pretrained(sys.argv[1])).__name__, T.from_pretrained(sys.argv[1]).vocab_size)")
    p = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty_hf_home")))
    assert p.returncode == 0 and p.stdout.split() == ["GPT2LMHeadModel", "1024"], p.stderr


@pytest.mark.parametrize("bias", [True, False])
def test_export_padded_vocab_random_weights(tmp_path, bias):
    """vocab 1000 sits in 1024 padded rows: the export keeps 1000, and without biases writes zeros."""
    from model.config import TrainConfig, preset
    from model.gpt import GPT
    from model.runtime import ckpt_config
    from model import checkpoint as checkpoints
    from storage.hf_export import export_hf
    from tasks.tokenizer import TokenizerConfig, train_tokenizer
    from tests.hellaswag_fixture import sample_texts

    tok_path = tmp_path / "tokenizer.json"
    sha = train_tokenizer(iter(sample_texts()[:300]), tok_path, TokenizerConfig(vocab_size=1000))
    cfg: TrainConfig = preset("tiny", 1000).override({"n_embd": 32, "block_size": 32, "bias": bias})
    torch.manual_seed(0)
    model = GPT(cfg.model).eval()
    assert model.config.padded_vocab == 1024
    with torch.no_grad():  # non-zero biases, so dropping or misplacing one shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    checkpoints.save(tmp_path / "ckpt", 7, model_state=model.state_dict(), optim_state={}, train_state={},
                     config=ckpt_config(cfg, "rand", sha, 7, 1), val_loss=None, run_id="rand")
    out = tmp_path / "hf"
    export_hf(tmp_path / "ckpt" / "step_000007", tok_path, out)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.transformer.wte.weight.shape == (1000, 32) and hf.config.vocab_size == 1000
    ids = torch.randint(0, 1000, (3, 32), generator=torch.Generator().manual_seed(1))
    check_same(model, hf, ids, 1000, 16)


def test_export_refusals(eval_home, tmp_path, capsys):
    import shutil

    def refused(*args) -> str:
        assert main(["export", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        return err

    out = tmp_path / "out"
    assert "no complete checkpoint" in refused("--checkpoint", "nope", "--out", str(out))
    half = tmp_path / "runs" / "step_000099"
    shutil.copytree(step_dir(eval_home), half)
    (half / "COMPLETE").unlink()
    assert "incomplete checkpoint (no COMPLETE marker)" in refused("--checkpoint", str(half), "--out", str(out))
    assert not out.exists() and not list(tmp_path.glob(".out*"))

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "exists and is not empty" in refused("--out", str(out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main(["export", "--out", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()

    tok = json.loads(eval_home.tokenizer.read_text())
    eval_home.tokenizer.write_text(json.dumps(tok, indent=2))  # same vocabulary, other bytes
    assert "differs from the tokenizer checkpoint" in refused("--out", str(tmp_path / "other"))
    assert not (tmp_path / "other").exists()


def test_export_takes_the_runs_tokenizer_in_a_process_without_torch(eval_home, tmp_path, capsys):
    """A run keeps its tokenizer copy: after the home's tokenizer is retrained (another vocabulary), the run still
    exports with the tokenizer it was trained with, and `langpwt export` never imports torch. Without the copy, the
    home's new tokenizer is refused in one line naming both sha256s."""
    from storage.shards import file_sha256
    from tasks.tokenizer import TokenizerConfig, train_tokenizer
    from tasks.train import keep_tokenizer
    from tests.conftest import ROOT
    from tests.eval_fixtures import RUN
    from tests.hellaswag_fixture import sample_texts

    keep_tokenizer(eval_home, RUN, None)
    copy = eval_home.run_dir(RUN) / "tokenizer.json"
    trained_sha = file_sha256(copy)
    new_sha = train_tokenizer(iter(sample_texts()[:300]), eval_home.tokenizer, TokenizerConfig(vocab_size=600))
    assert new_sha != trained_sha == file_sha256(copy)

    out = tmp_path / "hf"
    code = ("import sys; from flows.cli import main; rc = main(['export', '--out', sys.argv[1]]); "
            "print(rc, sorted(m for m in ('torch', 'safetensors.torch') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, LANGPWT_HOME=str(eval_home.root)))
    assert p.returncode == 0 and p.stdout.strip().splitlines()[-1] == "0 []", p.stdout + p.stderr
    assert (out / "tokenizer.json").read_bytes() == copy.read_bytes()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 1024

    copy.unlink()
    assert main(["export", "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and trained_sha[:12] in err and new_sha[:12] in err and str(eval_home.tokenizer) in err
    assert not (tmp_path / "other").exists()
