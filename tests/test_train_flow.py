"""The `train` flow under a Prefect test server: artifacts read back through the client, catalog rows.
Shares the session's harness; the trainer still runs as a real child process."""
from __future__ import annotations

import asyncio
import json

import pytest

from flows.train import TrainingFailed, TrainParams, train
from storage import catalog
from tasks.train import artifact_key
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
                            overrides={"eval_every": 6, "ckpt_every": 6, "keep_last": 5}))
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


def test_train_flow_failures(train_home):
    train(TrainParams(preset="tiny", run_id="nan", max_steps=3, device="cpu", overrides={"ckpt_every": 3}))
    with pytest.raises(TrainingFailed, match="non-finite loss"):
        train(TrainParams(preset="tiny", resume=True, max_steps=8, device="cpu",
                          overrides={"lr": 1e30, "warmup_steps": 1}))
    status, err = catalog.query_rows(train_home, "SELECT status, error FROM runs WHERE run_id = 'nan'")[0]
    assert status == "failed" and "step_000003" in err


def test_cli_train_reports_missing_shards(prefect_api, tmp_path):
    p = run_cli("--home", str(tmp_path / "empty"), "train", "--preset", "tiny", env={"PREFECT_API_URL": prefect_api})
    assert p.returncode == 2 and "no tokenizer; run `langpwt prepare` first" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
