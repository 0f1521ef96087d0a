"""The `train` flow under a Prefect test server: artifacts read back through the client, catalog rows.
Shares the session's harness; the trainer still runs as a real child process."""
from __future__ import annotations

import asyncio
import json

import pytest

from flows.train import TrainingFailed, TrainParams, artifact_key, train
from storage import catalog
from tests.conftest import run_cli
from tests.train_fixtures import train_home  # noqa: F401


async def _artifacts(flow_run_id: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def test_train_flow_registers_artifacts_and_rows(train_home):
    out = train(TrainParams(preset="tiny", run_id="flow", max_steps=12, device="cpu",
                            eval_every=6, ckpt_every=6, keep_last=5))
    assert out["exit_code"] == 0 and out["checkpoint"].endswith("step_000012")
    run = catalog.query_rows(train_home, "SELECT status, preset, flow_run_id, finished_at, config FROM runs "
                                         "WHERE run_id = 'flow'")
    assert len(run) == 1 and run[0][:2] == ("completed", "tiny") and run[0][3] is not None
    assert json.loads(run[0][4])["max_steps"] == 12
    flow_run_id = run[0][2]
    m = catalog.query_rows(train_home, "SELECT step, train_loss, val_loss, lr, grad_norm, tokens_per_s "
                                       "FROM metrics WHERE run_id = 'flow' ORDER BY step")
    assert [r[0] for r in m] == list(range(1, 13)) and all(r[1] and r[3] and r[4] and r[5] for r in m)
    assert [r[0] for r in m if r[2] is not None] == [6, 12]
    # each periodic eval also gives the bpb of its sampled windows; the run ends with the whole split's
    bpb = catalog.query_rows(train_home, "SELECT step, val_bpb FROM metrics WHERE run_id = 'flow' AND val_bpb "
                                         "IS NOT NULL ORDER BY step")
    assert [r[0] for r in bpb] == [6, 12] and all(0 < r[1] < 20 for r in bpb)
    ev = catalog.query_rows(train_home, "SELECT step, task, metric, value, n, split_id, split_size FROM evals "
                                        "WHERE run_id = 'flow' ORDER BY metric")
    assert [(r[0], r[1], r[2]) for r in ev] == [(12, "bpb", "val_bpb"), (12, "bpb", "val_loss")]
    assert len(ev[0][5]) == 64 and ev[0][6] > ev[0][4] > 0 and 0 < ev[0][3] < 20
    ck = catalog.query_rows(train_home, "SELECT step, sha256, size_bytes FROM checkpoints WHERE run_id = 'flow' "
                                        "ORDER BY step")
    assert [c[0] for c in ck] == [6, 12] and all(len(c[1]) == 64 and c[2] > 0 for c in ck)
    assert catalog.query_rows(train_home, "SELECT count(*) FROM samples WHERE run_id = 'flow'")[0][0] == 2

    # one version of the metrics table per evaluation: the newest holds every row
    arts = {a.key: a for a in sorted(asyncio.run(_artifacts(flow_run_id)), key=lambda a: a.created)}
    table = arts[artifact_key("flow", "metrics")]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["step"] for r in rows] == [6, 12] and all(r["val_loss"] for r in rows)
    for step, (_, sha, _) in zip((6, 12), ck):
        md = arts[artifact_key("flow", f"checkpoint-{step:06d}")].data
        assert sha in md and f"step_{step:06d}" in md
    report = arts[artifact_key("flow", "report")].data
    assert "data:image/png;base64," in report and "step_000012" in report
    assert (train_home.run_dir("flow") / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "val bpb, whole split" in report and ev[0][5][:12] in report
    # the best checkpoint, exported for the Hugging Face ecosystem and linked
    hf = train_home.run_dir("flow") / "hf"
    assert out["hf"] == str(hf) and json.loads((hf / "config.json").read_text())["model_type"] == "gpt2"
    assert (hf / "model.safetensors").is_file() and (hf / "tokenizer.json").is_file()
    assert f"({hf.resolve().as_uri()})" in arts[artifact_key("flow", "hf")].data


def test_train_flow_failures(train_home):
    train(TrainParams(preset="tiny", run_id="nan", max_steps=3, device="cpu", ckpt_every=3))
    assert (train_home.run_dir("nan") / "tokenizer.json").read_bytes() == train_home.tokenizer.read_bytes()
    # a resume the trainer refuses, and one with nothing to resume, leave the run's recorded status alone
    with pytest.raises(TrainingFailed, match="a resumed run keeps its model"):
        train(TrainParams(preset="tiny", resume=True, run_id="nan", max_steps=8, device="cpu", n_layer=3))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint under .*runs/nope"):
        train(TrainParams(preset="tiny", resume=True, run_id="nope", max_steps=8, device="cpu"))
    assert catalog.query_rows(train_home, "SELECT run_id, status, error FROM runs") == [("nan", "completed", None)]
    with pytest.raises(TrainingFailed, match="non-finite loss"):
        train(TrainParams(preset="tiny", resume=True, max_steps=8, device="cpu", lr=1e30, warmup_steps=1))
    status, err = catalog.query_rows(train_home, "SELECT status, error FROM runs WHERE run_id = 'nan'")[0]
    assert status == "failed" and "step_000003" in err


def test_cli_train_reports_missing_shards(prefect_api, tmp_path):
    p = run_cli("--home", str(tmp_path / "empty"), "train", "--preset", "tiny", env={"PREFECT_API_URL": prefect_api})
    assert p.returncode == 2 and "no tokenizer; run `langpwt prepare` first" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_cli_train_refuses_bad_values_in_one_line(train_home):
    """Any invalid value: one line, exit 2, quickly, and nothing started: no Prefect server (no import of it),
    no runs/ folder, no catalog row."""
    import time

    for flags, msg in ((["--max-steps", "-5"], "--max-steps -5: must be positive"),
                       (["--lr", "nan"], "--lr nan: must be a non-negative number"),
                       (["--device", "gpu"], "--device gpu: expected auto, cpu or cuda"),
                       (["--resume", "--run-id", "nope"], "--resume: no complete checkpoint under"),
                       # far beyond any machine's memory: refused before a child starts, naming the fix
                       (["--n-layer", "64", "--n-embd", "8192", "--device", "cpu"], "--micro-batch 128: the seed "
                                                                                      "model needs about")):
        t = time.monotonic()
        p = run_cli("train", *flags, env={"PREFECT_API_URL": "http://127.0.0.1:9/api"})
        assert p.returncode == 2 and p.stderr.startswith(f"langpwt: error: {msg}"), p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and time.monotonic() - t < 10, p.stderr
    assert "--preset tiny" in p.stderr
    assert not train_home.runs.exists() or not any(train_home.runs.iterdir())  # no run folder
    assert catalog.query_rows(train_home, "SELECT count(*) FROM runs")[0][0] == 0


def test_memory_estimate_refuses_the_seed_model_on_a_small_cpu():
    """`langpwt train` with no preset on a 24 GB CPU machine (seed model, micro-batch 128, vocab 48,951) was
    killed by the kernel's OOM killer; it is refused up front, naming a micro-batch that fits."""
    from model.config import preset
    from tasks.train import check_memory, estimate_bytes

    seed = preset("seed", 48_951).override({"device": "cpu"})
    with pytest.raises(ValueError, match=r"^--micro-batch 128: .* 24\.0 GB available; try --micro-batch (\d+) "
                                         r".* or --preset tiny$") as e:
        check_memory(seed, available=24 * 10**9)
    fit = int(str(e.value).split("try --micro-batch ")[1].split()[0])
    assert estimate_bytes(seed.override({"micro_batch": fit})) <= 24e9 < estimate_bytes(seed)
    assert (seed.batch_tokens // seed.model.block_size) % fit == 0
    check_memory(preset("tiny", 48_951).override({"device": "cpu"}), available=24 * 10**9)
    check_memory(seed, cuda=True, available=1)  # CUDA: the trainer's own out-of-memory report covers it


def test_reconcile_rebuilds_rows_a_killed_flow_left_on_disk(train_home):
    """A run trained without its flow's recorder (as when the flow is killed): checkpoints and metrics on disk,
    no catalog rows. reconcile_runs adds them, once."""
    from storage import training_catalog as tc
    from tests.train_fixtures import FAST, metrics_rows, run_trainer

    assert run_trainer(train_home, *FAST, "--run-id", "lost", "--max-steps", "6", "--ckpt-every", "3",
                       "--eval-every", "3", "--keep-last", "5")[0] == 0
    q = "SELECT count(*) FROM {} WHERE run_id = 'lost'"
    assert [catalog.query_rows(train_home, q.format(t))[0][0] for t in ("runs", "checkpoints", "metrics")] == [0, 0, 0]
    assert tc.reconcile_runs(train_home) == {"runs": 1, "checkpoints": 2, "metrics": 6}
    assert tc.reconcile_runs(train_home) == {"runs": 0, "checkpoints": 0, "metrics": 0}
    status, preset = catalog.query_rows(train_home, "SELECT status, preset FROM runs WHERE run_id = 'lost'")[0]
    assert status == "interrupted" and preset == "tiny"
    assert [r[0] for r in catalog.query_rows(train_home, "SELECT step FROM checkpoints WHERE run_id = 'lost' "
                                                         "ORDER BY step")] == [3, 6]
    rows = catalog.query_rows(train_home, "SELECT step, train_loss, val_loss FROM metrics WHERE run_id = 'lost' "
                                          "ORDER BY step")
    train_loss, val_loss = metrics_rows(train_home, "lost")
    assert {r[0]: r[1] for r in rows} == train_loss and {r[0]: r[2] for r in rows if r[2] is not None} == val_loss
