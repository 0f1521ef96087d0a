"""The dashboard tests' home, built once per session by the real pipeline and trainer (sample + a bad file).
~1 min on two busy cores, so every dashboard test module shares it rather than each building one."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from storage import catalog
from storage.paths import Home
from tests.conftest import SAMPLE

VOCAB = 4096
TRAIN_STEPS = 10
BAD_FILE = "002_00000.parquet"
DONE_MARKER = ".dashboard-fixture-built"


def training_available() -> bool:
    try:
        import flows.train  # noqa: F401
        from model.config import PRESETS
    except ImportError:
        return False
    return "tiny" in PRESETS


def _train(home: Home) -> None:
    """Two runs, so the Training page can put them side by side."""
    from flows.train import TrainParams, train

    # a tiny model on two shared cores: many BLAS threads only fight each other
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        train(TrainParams(preset="tiny", home=str(home.root), run_id="tiny-fixture", max_steps=TRAIN_STEPS,
                          device="cpu", eval_every=5, ckpt_every=5, eval_batches=1))
        train(TrainParams(preset="tiny", home=str(home.root), run_id="tiny-fixture-b", max_steps=5,
                          device="cpu", eval_every=5, ckpt_every=5, eval_batches=1, lr=1e-2))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build_home(root: Path) -> Home:
    """Prepare (2 good files, 1 truncated), train `tiny` when the training code is present, mark a shard stale."""
    from flows.prepare import PrepareParams, prepare
    from storage import shard_catalog

    src = root.parent / f"{root.name}-source"
    shutil.copytree(SAMPLE, src, ignore=shutil.ignore_patterns("*.md"))
    good = (src / "001_00000.parquet").read_bytes()
    (src / BAD_FILE).write_bytes(good[: len(good) // 3])
    home = Home.from_env(root)
    summary = prepare(PrepareParams(source=str(src), vocab_size=VOCAB, home=str(root)))
    assert summary["built"] == 2 and BAD_FILE in summary["failed"], summary
    if training_available():
        _train(home)
    shard_catalog.mark_stale(home, [1])
    return home


def shared_home(tmp_path_factory) -> Home:
    """The session's fixture home, built on first use (callers must hold the `prefect_api` fixture).
    Keyed by a marker in the session's base temp dir: pytest may import this module under two names."""
    root = tmp_path_factory.getbasetemp() / "dashboard-home"
    if not (root / DONE_MARKER).exists():
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(root.parent / f"{root.name}-source", ignore_errors=True)
        build_home(root)
        (root / DONE_MARKER).touch()
    return Home.from_env(root)


@pytest.fixture(scope="session")
def dash_home(prefect_api, tmp_path_factory) -> Home:
    return shared_home(tmp_path_factory)


def test_fixture_home_came_from_the_pipeline(dash_home):
    from storage.shards import open_shard

    st = dict(catalog.query_rows(dash_home, "SELECT shard_id, any_value(status) FROM shards GROUP BY 1"))
    assert st == {0: "done", 1: "stale", 2: "failed"}
    tokens = sum(len(open_shard(p).tokens) for p in dash_home.shards.glob("*.bin"))
    assert tokens == catalog.query_rows(dash_home, "SELECT sum(n_tokens) FROM shards WHERE shard_id < 2")[0][0]
    assert np.isfinite(tokens) and tokens > 100_000
    if training_available():
        n = catalog.query_rows(dash_home, "SELECT count(*) FROM metrics WHERE run_id = 'tiny-fixture'")[0][0]
        assert n == TRAIN_STEPS
        assert catalog.query_rows(dash_home, "SELECT count(*) FROM checkpoints")[0][0] == 3
