"""A home with a briefly trained tiny model, trained once per session by the real trainer on the prepared sample,
copied fresh for each evaluation test; the exported Hugging Face model as the independent reference, and the check
that it computes what ours computes."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from model.generate import sample
from tests.train_fixtures import FAST, _template, run_trainer

RUN = "ev"


def _copy_home(src: Path, dst: Path):
    from storage import catalog
    from storage.paths import Home

    shutil.copytree(src, dst)
    home = Home.from_env(dst)
    with catalog.writer(home) as con:
        con.execute("UPDATE shards SET path = replace(path, ?, ?)", [str(src), str(dst)])
    return home


@pytest.fixture(scope="session")
def _trained(prefect_api, tmp_path_factory) -> Path:
    root = tmp_path_factory.getbasetemp() / "eval_trained" / "home"
    if not (root / "runs" / RUN).is_dir():
        home = _copy_home(_template(prefect_api, tmp_path_factory), root)
        code, _, text = run_trainer(home, *FAST, "--max-steps", "30", "--run-id", RUN, "--ckpt-every", "30")
        assert code == 0, text
    return root


@pytest.fixture
def eval_home(_trained, tmp_path, monkeypatch):
    """A private copy of the trained home (catalog paths rewritten), as LANGPWT_HOME."""
    home = _copy_home(_trained, tmp_path / "home")
    monkeypatch.setenv("LANGPWT_HOME", str(home.root))
    return home


def step_dir(home) -> Path:
    return home.run_dir(RUN) / "checkpoints" / "step_000030"


def export_reference(home, out: Path):
    """(HF model, HF tokenizer) of the checkpoint, through `export_hf`, in fp32 eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from storage.hf_export import export_hf

    export_hf(step_dir(home), home.tokenizer, out)
    return AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)


def real_windows(home, n: int, length: int) -> torch.Tensor:
    from storage.shards import open_tokens

    toks = np.asarray(open_tokens(sorted(home.shards.glob("shard_*.val.bin"))[0]), dtype=np.int64)
    starts = np.linspace(0, toks.size - length - 1, n).astype(int)
    return torch.from_numpy(np.stack([toks[s:s + length] for s in starts]))


def check_same(ours, hf, ids: torch.Tensor, vocab: int, new_tokens: int) -> None:
    """fp32 logits within 1e-4 everywhere, and the same greedy continuation of each row."""
    with torch.no_grad():
        a = ours.logits(ours.hidden(ids))[..., :vocab]
        b = hf(ids).logits
    assert b.shape == a.shape
    assert (a - b).abs().max().item() <= 1e-4
    for row in ids[:, : ids.size(1) // 2]:
        g = hf.generate(row[None], do_sample=False, max_new_tokens=new_tokens, pad_token_id=0)[0, row.numel():]
        assert g.tolist() == list(sample(ours, row.tolist(), new_tokens, temperature=0))
