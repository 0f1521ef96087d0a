"""HellaSwag: the harness's preprocessing, both file schemas, the fetch from a (fake) Hub, and scores checked against
the harness's procedure written out directly on the exported Hugging Face model and its tokenizer."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.evaluate import load_for_eval
from model.hellaswag import loglikelihoods, requests, score
from storage.paths import Home
from tasks import hellaswag as hs
from tests.eval_fixtures import _trained, eval_home, export_reference, step_dir  # noqa: F401
from tests.fakehub import FakeHub, Fault
from tests.hellaswag_fixture import make_rows, sample_texts, write_hub_parquet, write_jsonl


def test_preprocess_is_the_harness_rule():
    assert hs.preprocess("  Roof shingle removal: A man is sitting on a roof. He  ") == \
        "Roof shingle removal: A man is sitting on a roof. He"
    assert hs.preprocess("How to dry [title] Lay it flat. [step] Wait.") == "How to dry. Lay it flat. Wait."
    assert hs.preprocess("a   b") == "a  b"  # one pass of "  " -> " " (three spaces leave two), as the harness does
    item = hs.to_item({"activity_label": "Baking", "ctx_a": "She mixes the flour.", "ctx_b": "then she",
                       "endings": [" bakes [header] it. ", "x", "y", "z"], "label": "0"}, "row")
    assert item == hs.Item("Baking: She mixes the flour. Then she", ("bakes it.", "x", "y", "z"), 0)


def test_jsonl_and_hub_parquet_read_alike(tmp_path):
    rows = make_rows(sample_texts(), 30, seed=1)
    a = hs.read_items(write_jsonl(tmp_path / "v.jsonl", rows))
    b = hs.read_items(write_hub_parquet(tmp_path / "v.parquet", rows))
    assert a == b and len(a) == 30 and [i.label for i in a] == [r["label"] for r in rows]
    assert hs.read_items(tmp_path / "v.jsonl", limit=4) == a[:4]
    assert all("[" not in i.context for i in a) and any(". " in i.context for i in a)


def harness_reference(hf, tok, item, block: int) -> list[float]:
    """The harness's loglikelihood of each " " + ending, on HF's model and tokenizer, one sequence at a time."""
    out = []
    context = item.context.rstrip()  # trailing spaces (bracket removal can leave one) open the continuation
    for ending in item.endings:
        ctx = tok(context)["input_ids"]
        whole = tok(item.context + " " + ending)["input_ids"]
        cont = whole[len(ctx):]
        inp = torch.tensor((ctx + cont)[-(block + 1):][:-1])
        cont = cont[-inp.numel():]  # an ending longer than the block: its last block_size tokens (harness: error)
        with torch.no_grad():
            logp = torch.log_softmax(hf(inp[None]).logits[0].float(), -1)
        rows = logp[inp.numel() - len(cont):]
        out.append(float(rows.gather(1, torch.tensor(cont)[:, None]).double().sum()))
    return out


def test_scores_match_harness_procedure_on_hf(eval_home, tmp_path):
    rows = make_rows(sample_texts(), 24, seed=2)
    items = hs.read_items(write_jsonl(tmp_path / "v.jsonl", rows))
    loaded = load_for_eval(step_dir(eval_home), eval_home.tokenizer, "cpu")
    hf, hf_tok = export_reference(eval_home, tmp_path / "hf")
    block = loaded.model.config.block_size
    acc, acc_norm, truncated = [], [], 0
    for item in items:
        ref = np.array(harness_reference(hf, hf_tok, item, block))
        reqs = requests(loaded.tokenizer, item, block)
        truncated += any(len(inp) == block for inp, _ in reqs)
        ours = np.array(loglikelihoods(loaded.model, reqs, torch.device("cpu")))
        assert np.allclose(ours, ref, atol=2e-4), (ours, ref)
        acc.append(np.argmax(ref) == item.label)
        acc_norm.append(np.argmax(ref / np.array([len(e) for e in item.endings])) == item.label)
    assert truncated  # some items are longer than the block: cut from the left
    assert any(i.context != i.context.rstrip() for i in items)
    got = score(loaded.model, loaded.tokenizer, items, batch_items=5)
    assert got["n"] == 24 and got["acc"] == np.mean(acc) and got["acc_norm"] == np.mean(acc_norm)
    p = got["acc"]
    assert got["acc_stderr"] == pytest.approx(np.std(acc, ddof=1) / np.sqrt(24))
    assert got["acc_stderr"] == pytest.approx((p * (1 - p) / 23) ** 0.5)
    assert score(loaded.model, loaded.tokenizer, items, batch_items=1)["acc_norm"] == got["acc_norm"]


def test_an_ending_emptied_by_preprocessing_scores_without_dividing_by_zero(eval_home, tmp_path):
    import warnings
    rows = make_rows(sample_texts(), 6, seed=3)
    rows[2]["endings"][1] = "[header]"  # the harness's preprocessing leaves nothing of it
    items = hs.read_items(write_jsonl(tmp_path / "v.jsonl", rows))
    assert items[2].endings[1] == ""
    loaded = load_for_eval(step_dir(eval_home), eval_home.tokenizer, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's divide-by-zero warning fails the test
        got = score(loaded.model, loaded.tokenizer, items, batch_items=4)
    assert got["n"] == 6 and 0.0 <= got["acc_norm"] <= 1.0


def test_fetch_once_verified_and_resumed(home, tmp_path, monkeypatch, hf_isolated):
    rows = make_rows(sample_texts(), 50, seed=4)
    src = write_hub_parquet(tmp_path / "tree" / "0000.parquet", rows)
    files = {"default/validation/0000.parquet": src, "default/train/0000.parquet": src}
    with FakeHub(files, repo=hs.DATASET, branches=("main", hs.REVISION)) as hub:
        hub.faults["default/validation/0000.parquet"] = Fault(drop_after=src.stat().st_size // 3)
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        got = hs.fetch(Home.from_env(home.root))
        assert got == home.hellaswag_dir / "validation.parquet" and got.read_bytes() == src.read_bytes()
        assert hub.bytes_served("default/validation/0000.parquet") == src.stat().st_size  # the cut was resumed
        assert not hub.hits("default/train/0000.parquet")
        meta = json.loads(got.with_suffix(".json").read_text())
        assert meta["commit"] == hub.sha and meta["revision"] == hs.REVISION
        seen = len(hub.hits())
        assert hs.fetch(home) == got and len(hub.hits()) == seen  # fetched once: no request the second time
    assert hs.read_items(got) == hs.read_items(write_jsonl(tmp_path / "v.jsonl", rows))
    got.write_bytes(got.read_bytes()[:-10])  # damaged: no longer counts as fetched
    assert hs.cached(home) is None


def test_bad_hub_file_fails_the_flow_without_rows(eval_home, tmp_path, monkeypatch, hf_isolated, capsys):
    from flows.cli import main
    from storage import catalog

    rows = make_rows(sample_texts(), 6)
    rows[5]["label"] = 9
    src = write_hub_parquet(tmp_path / "tree" / "0000.parquet", rows)
    with FakeHub({"default/validation/0000.parquet": src}, repo=hs.DATASET, branches=(hs.REVISION,)) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        assert main(["evaluate", "--tasks", "hellaswag", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"error: {eval_home.hellaswag_dir / 'validation.parquet'}: row 5: label 9 out of range 0..3"
    assert not eval_home.catalog.exists() or catalog.query_rows(eval_home, "SELECT count(*) FROM evals")[0][0] == 0
