"""Bits per byte against an independent computation through the exported Hugging Face model; the `evaluate` flow's
catalog rows and artifact under the Prefect test server; bad input refused in one line with no row written."""
from __future__ import annotations

import asyncio
import hashlib
import json
import math

import numpy as np
import pytest
import torch

from flows.cli import main
from flows.evaluate import EvaluateParams, artifact_key, evaluate
from model.evaluate import split_identity, val_bpb, val_paths, windows
from storage import catalog, eval_catalog
from tests.eval_fixtures import _trained, eval_home, export_reference, step_dir  # noqa: F401
from tests.hellaswag_fixture import make_rows, sample_texts, write_jsonl


@pytest.mark.parametrize("n,block", [(10, 4), (9, 4), (2, 4), (64, 64), (65, 64), (66, 64), (1000, 7)])
def test_windows_predict_every_token_once(n, block):
    targets = [t for a, b in windows(n, block) for t in range(a + 1, b)]
    assert targets == list(range(1, n))
    assert all(b - a <= block + 1 for a, b in windows(n, block))


def test_bpb_matches_hf_model(eval_home, tmp_path):
    from model.evaluate import load_for_eval

    loaded = load_for_eval(step_dir(eval_home), eval_home.tokenizer, "cpu")
    paths = val_paths(eval_home, loaded.tokenizer_sha256)
    from storage.shards import open_tokens

    # every val shard with tokens (the sample's last source can leave an empty val file, which the catalog skips)
    assert [p.name for p in paths] == sorted(p.name for p in eval_home.shards.glob("shard_*.val.bin")
                                             if open_tokens(p).size)
    ours = val_bpb(loaded.model, loaded.tokenizer, paths, batch_size=32)

    # the reference: HF's model on the same windows, bytes from decoding whole documents
    hf, hf_tok = export_reference(eval_home, tmp_path / "hf")
    toks = torch.from_numpy(np.concatenate([np.asarray(open_tokens(p), dtype=np.int64) for p in paths]))
    eot = hf_tok.eos_token_id
    spans = [toks[a:a + 65] for a in range(0, toks.numel() - 1, 64)]
    full = [w for w in spans if w.numel() == 65]
    batches = [full[i:i + 64] for i in range(0, len(full), 64)] + [[w] for w in spans if w.numel() != 65]
    assert len(batches[-1][0]) < 65  # the split does not fill its last window: the partial one is scored too
    nats, n_tok = 0.0, 0
    with torch.no_grad():
        for ws in batches:
            w = torch.stack(ws)
            logp = torch.log_softmax(hf(w[:, :-1]).logits.float(), -1)
            y = w[:, 1:]
            keep = y != eot
            nats -= float(logp.gather(2, y[..., None])[..., 0].double()[keep].sum())
            n_tok += int(keep.sum())
    toks = toks.numpy()
    docs = np.split(toks, np.flatnonzero(toks == eot))
    n_bytes = sum(len(hf_tok.decode(d[d != eot].tolist()).encode("utf-8")) for d in docs)
    assert toks[0] == eot  # so every non-EOT token is a target
    assert (ours["n_tokens"], ours["n_bytes"]) == (n_tok, n_bytes)
    assert ours["bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    assert ours["loss"] == pytest.approx(nats / n_tok, rel=1e-5)
    few = [val_bpb(loaded.model, loaded.tokenizer, paths, batch_size=b, max_windows=40)["bpb"] for b in (7, 40)]
    assert few[0] == pytest.approx(few[1], rel=1e-6) and few[0] != ours["bpb"]

    n, sha = split_identity(paths)
    assert n == toks.size and sha == hashlib.sha256(toks.astype("<u4").tobytes()).hexdigest()


async def _artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async with get_client() as client:
        found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return found[-1] if found else None


def test_evaluate_flow_records_rows_and_artifacts(eval_home, tmp_path, prefect_api, capsys):
    data = write_jsonl(tmp_path / "hs.jsonl", make_rows(sample_texts(), 20, seed=3))
    out = evaluate(EvaluateParams(tasks="bpb,hellaswag", hellaswag_data=str(data), limit=12, device="cpu"))
    assert [r["task"] for r in out["results"]] == ["bpb", "hellaswag"]
    rows = {r["metric"]: r for r in eval_catalog.evals(eval_home, "ev").to_pylist()}
    assert sorted(rows) == ["acc", "acc_norm", "val_bpb", "val_loss"]
    bpb, hs = out["results"]
    assert rows["val_bpb"]["value"] == bpb["metrics"][0]["value"] and rows["val_bpb"]["step"] == 30
    assert rows["val_bpb"]["split_id"] == split_identity(val_paths(eval_home, tok_sha(eval_home)))[1]
    assert rows["acc"]["n"] == 12 and rows["acc"]["split_size"] == 20 and rows["acc"]["stderr"] > 0
    assert rows["acc"]["split_id"] == hashlib.sha256(data.read_bytes()).hexdigest()
    for res in out["results"]:
        art = asyncio.run(_artifact(artifact_key(res)))
        assert art is not None and art.type == "table"
        table = json.loads(art.data) if isinstance(art.data, str) else art.data
        assert [r["metric"] for r in table] == [m["metric"] for m in res["metrics"]]
    # the same evaluation again replaces its rows; another n adds rows, and `newest` keeps one per metric
    assert main(["evaluate", "--tasks", "hellaswag", "--hellaswag-data", str(data), "--limit", "12", "--json",
                 "--device", "cpu"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["results"][0]["metrics"] == hs["metrics"] and again["step"] == 30
    assert len(eval_catalog.evals(eval_home, "ev")) == 4
    evaluate(EvaluateParams(tasks=["hellaswag"], hellaswag_data=str(data), limit=5, device="cpu"))
    assert len(eval_catalog.evals(eval_home, "ev")) == 6
    newest = {r["metric"]: r["n"] for r in eval_catalog.newest(eval_home).to_pylist()}
    assert newest == {"acc": 5, "acc_norm": 5, "val_bpb": rows["val_bpb"]["n"], "val_loss": rows["val_loss"]["n"]}


def tok_sha(home) -> str:
    from storage.shards import file_sha256

    return file_sha256(home.tokenizer)


def _no_rows(home) -> bool:
    if not home.catalog.exists():
        return True
    return catalog.query_rows(home, "SELECT count(*) FROM evals")[0][0] == 0


def test_bad_input_refused_in_one_line(eval_home, tmp_path, capsys):
    rows = make_rows(sample_texts(), 5)

    def refused(*args: str) -> str:
        assert main(["evaluate", "--device", "cpu", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        assert _no_rows(eval_home)
        return err

    assert "unknown task 'perplexity'" in refused("--tasks", "bpb,perplexity")
    bad = write_jsonl(tmp_path / "schema.jsonl", [{k: v for k, v in r.items() if k != "endings"} for r in rows])
    assert f"{bad}: line 1: missing field endings" in refused("--tasks", "hellaswag", "--hellaswag-data", str(bad))
    out_of_range = write_jsonl(tmp_path / "label.jsonl", rows[:3] + [dict(rows[3], label=7)])
    err = refused("--tasks", "hellaswag", "--hellaswag-data", str(out_of_range))
    assert f"{out_of_range}: line 4: label 7 out of range 0..3" in err
    (tmp_path / "x.csv").write_text("ctx_a,label\n")
    assert "expected a .jsonl or .parquet" in refused("--hellaswag-data", str(tmp_path / "x.csv"))
    assert "no complete checkpoint" in refused("--checkpoint", "nope")
    if not torch.cuda.is_available():
        assert "--device cuda: no CUDA device is visible" in refused("--device", "cuda", "--tasks", "bpb")
    tok = json.loads(eval_home.tokenizer.read_text())
    eval_home.tokenizer.write_text(json.dumps(tok, indent=2))
    err = refused("--tasks", "bpb")
    assert str(eval_home.tokenizer) in err and "differs from the tokenizer checkpoint" in err


def test_evaluate_refuses_a_checkpoint_of_another_tokenizer_than_the_homes(eval_home, capsys):
    """The run keeps its tokenizer copy, so the checkpoint still loads after the home's tokenizer changes; but bpb
    reads the home's val shards (of the new tokenizer): evaluate refuses in one line naming both sha256s."""
    from model.evaluate import EvalError, load_for_eval
    from model.generate import load_trained
    from tasks.train import keep_tokenizer
    from tests.eval_fixtures import RUN

    keep_tokenizer(eval_home, RUN, None)
    trained = tok_sha(eval_home)
    tok = json.loads(eval_home.tokenizer.read_text())
    eval_home.tokenizer.write_text(json.dumps(tok, indent=2))
    home = tok_sha(eval_home)
    loaded = load_trained(step_dir(eval_home), eval_home.tokenizer, "cpu")
    assert loaded.tokenizer_path == eval_home.run_dir(RUN) / "tokenizer.json"
    assert (loaded.run_id, loaded.step, loaded.tokenizer_sha256) == (RUN, 30, trained)
    with pytest.raises(EvalError) as e:
        load_for_eval(step_dir(eval_home), eval_home.tokenizer, "cpu")
    assert "\n" not in str(e.value) and trained[:12] in str(e.value) and home[:12] in str(e.value)
    assert main(["evaluate", "--device", "cpu", "--tasks", "bpb"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and trained[:12] in err and home[:12] in err
    assert _no_rows(eval_home)
