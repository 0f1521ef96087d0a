"""Fixtures for the training tests: a home prepared once per session by the real pipeline on the
bundled sample (real text, real BPE, real shards and catalog), copied fresh for each test."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import SAMPLE

VOCAB = 1024
FAST = ["--preset", "tiny", "--log-every", "1"]  # the tiny preset, every step a row


def _template(prefect_api, factory) -> Path:
    root = factory.getbasetemp() / "train_template"
    if (root / "home" / "tokenizer" / "tokenizer.json").exists():
        return root / "home"
    from flows.prepare import PrepareParams, prepare

    src = root / "source"
    shutil.copytree(SAMPLE, src, ignore=shutil.ignore_patterns("*.md"))
    out = prepare(PrepareParams(source=str(src), home=str(root / "home"), vocab_size=VOCAB, val_fraction=0.05))
    assert out["built"] == 2 and not out["failed"], out
    return root / "home"


@pytest.fixture
def train_home(prefect_api, tmp_path_factory, tmp_path, monkeypatch):
    """A private copy of the prepared home (catalog paths rewritten to the copy)."""
    from storage import catalog
    from storage.paths import Home

    tpl = _template(prefect_api, tmp_path_factory)
    dst = tmp_path / "home"
    shutil.copytree(tpl, dst)
    home = Home.from_env(dst)
    with catalog.writer(home) as con:
        con.execute("UPDATE shards SET path = replace(path, ?, ?)", [str(tpl), str(dst)])
    monkeypatch.setenv("LANGPWT_HOME", str(dst))
    return home


def metrics_rows(home, run_id: str) -> tuple[dict, dict]:
    """(train loss by step, val loss by step) from the run's JSONL, the last row of a step winning."""
    train, val = {}, {}
    for line in (home.run_dir(run_id) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "train_loss" in r:
            train[r["step"]] = r["train_loss"]
        else:
            val[r["step"]] = r["val_loss"]
    return train, val


def run_trainer(home, *args: str, settings: dict | None = None) -> tuple[int, list[dict], str]:
    """`python -m model.train` in-process: (exit code, JSON events, other stdout+stderr); `settings`: config
    values that are no flags (model.train.main)."""
    import contextlib
    import io

    from model.train import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--home", str(home.root), *args], settings)
    events = [json.loads(x) for x in out.getvalue().splitlines() if x.startswith('{"event"')]
    text = "\n".join(x for x in out.getvalue().splitlines() if not x.startswith('{"event"')) + err.getvalue()
    return code, events, text
