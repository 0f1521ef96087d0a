"""Deployments on a real Prefect server and process worker, as README "Run it for real" does it:
`prefect server start`, work pools, `prefect deploy --all`, a worker from the venv, `prefect deployment run`.
One server, pools, deployments and worker serve the whole module (the server start alone takes 5-15 s)."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from storage import catalog
from storage.paths import Home
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

FAST_TRAIN = json.dumps({"preset": "tiny", "device": "cpu", "max_steps": 4})  # the demo's training, shortened


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect(*args: str, env: dict, timeout: float = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """The `prefect` CLI of this venv, as a user types it."""
    return subprocess.run([sys.executable, "-m", "prefect", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def healthy(api: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def stop(p: subprocess.Popen, grace: float) -> None:
    """SIGTERM; a second one if it is still up after `grace` s (a worker may sit on the first)."""
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGTERM)
        p.wait(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Server, pools, deployments and a worker; yields the environment a user's shell would have."""
    tmp = tmp_path_factory.mktemp("deploy")
    api = f"http://127.0.0.1:{free_port()}/api"
    env = dict(os.environ, PREFECT_HOME=str(tmp / "prefect_home"), PREFECT_API_URL=api,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="2",
               LANGPWT_HOME=str(tmp / "default_home"), PREFECT_LOGGING_LEVEL="INFO")
    port = api.rsplit(":", 1)[1].split("/")[0]
    srv_log, wrk_log = open(tmp / "server.log", "wb"), open(tmp / "worker.log", "wb")
    srv = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", port],
                           env=env, stdout=srv_log, stderr=subprocess.STDOUT)
    worker = None
    try:
        end = time.monotonic() + 120
        while not healthy(api):
            assert srv.poll() is None and time.monotonic() < end, (tmp / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        for pool in ("langpwt-cpu", "langpwt-gpu"):
            r = prefect("work-pool", "create", pool, "--type", "process", "--overwrite", env=env)
            assert r.returncode == 0, r.stdout + r.stderr
        r = prefect("--no-prompt", "deploy", "--all", env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        # started away from the checkout: the deployment's pull step must find it by itself
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "langpwt-cpu"],
                                  cwd=tmp, env=env, stdout=wrk_log, stderr=subprocess.STDOUT)
        yield dict(env=env, tmp=tmp, worker=worker, server=srv)
    finally:
        if worker is not None:  # workers first: a worker without its server retries in a loop
            stop(worker, grace=5)
        stop(srv, grace=30)
        srv_log.close(), wrk_log.close()
    assert worker.returncode is not None and srv.returncode is not None


def client_call(env: dict, fn):
    """Run `fn(client)` against the module's server (a sync Prefect client)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as c:
        return fn(c)


def run_id(output: str) -> str:
    return re.search(r"UUID: ([0-9a-f-]{36})", output).group(1)


def test_deployments_declared(server):
    deps = client_call(server["env"], lambda c: c.read_deployments())
    by = {d.name: d for d in deps}
    assert set(by) >= {"sample-10bt", "seed", "demo", "latest"}
    assert by["latest"].work_pool_name == "langpwt-gpu"
    assert by["seed"].work_pool_name == "langpwt-gpu"
    assert by["demo"].work_pool_name == by["sample-10bt"].work_pool_name == "langpwt-cpu"
    assert all(d.pull_steps == [{"flows.runtime.project_dir": {}}] for d in by.values())
    assert all(d.enforce_parameter_schema for d in by.values())
    assert by["sample-10bt"].parameters == {"params": {"subset": "sample-10BT"}}
    assert set(by["demo"].parameter_openapi_schema["properties"]) == {"home", "prepare", "train", "evaluate"}
    # every deployment's parameters are valid for its flow's models
    from flows.evaluate import EvaluateParams
    from flows.prepare import PrepareParams
    from flows.train import TrainParams

    PrepareParams(**by["sample-10bt"].parameters["params"]), TrainParams(**by["seed"].parameters["params"])
    PrepareParams(**by["demo"].parameters["prepare"]), TrainParams(**by["demo"].parameters["train"])
    EvaluateParams(**by["demo"].parameters["evaluate"]), EvaluateParams(**by["latest"].parameters["params"])
    # the run form shows the trainer's knobs one by one, each with its help line (no free-form overrides dict)
    for dep in ("seed", "demo"):
        props = by[dep].parameter_openapi_schema["definitions"]["TrainParams"]["properties"]
        assert "overrides" not in props and {"lr", "micro_batch", "max_steps", "n_layer", "device"} <= set(props)
        assert all(p.get("description") for p in props.values()), props


def test_pipeline_demo_completes(server, tmp_path):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    env, home = server["env"], Home.from_env(tmp_path / "home")
    r = prefect("deployment", "run", "pipeline/demo", "--param", f"home={home.root}", "--param",
                f"train={FAST_TRAIN}", "--watch", env=env, timeout=900)
    log = (server["tmp"] / "worker.log").read_text()[-4000:]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + log
    rid = run_id(r.stdout)

    run = client_call(env, lambda c: c.read_flow_run(rid))
    assert run.state.is_completed()
    # prepare and train ran as subflows of this run: one id covers the whole job
    subs = client_call(env, lambda c: c.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id]))))
    flows = {client_call(env, lambda c, f=s.flow_id: c.read_flow(f)).name: s for s in subs}
    assert set(flows) == {"prepare", "train", "evaluate"} and all(s.state.is_completed() for s in subs)

    shards = catalog.query_rows(home, "SELECT shard_id, split, status, flow_run_id FROM shards ORDER BY 1, 2")
    assert [s[:3] for s in shards] == [(0, "train", "done"), (0, "val", "done"), (1, "train", "done"),
                                       (1, "val", "done")]
    assert {s[3] for s in shards} == {str(flows["prepare"].id)}
    ckpt = catalog.query_rows(home, "SELECT step, path, flow_run_id FROM checkpoints")
    assert [c[0] for c in ckpt] == [4] and Path(ckpt[0][1]).is_dir()
    assert ckpt[0][2] == str(flows["train"].id)

    arts = client_call(env, lambda c: c.read_artifacts())
    keys = {a.key for a in arts}
    assert {"pipeline-summary", "tokenize-summary"} <= keys, keys
    assert any(k.startswith("train-") and k.endswith("-report") for k in keys), keys
    table = json.loads(next(a for a in arts if a.key == "tokenize-summary").data)
    assert sorted(row["shard"] for row in table) == ["000000", "000001"]
    summary = next(a for a in arts if a.key == "pipeline-summary")
    assert str(home.root) in summary.data and summary.flow_run_id == run.id
    # the evaluation of the run just trained: its whole val split's bpb in the catalog, and in the summary
    ev = catalog.query_rows(home, "SELECT step, metric, value FROM evals WHERE task = 'bpb' ORDER BY metric")
    assert [(e[0], e[1]) for e in ev] == [(4, "val_bpb"), (4, "val_loss")] and 0 < ev[0][2] < 20
    assert "val_bpb" in summary.data and "Hugging Face folder" in summary.data


def test_wrong_type_param_is_rejected(server, tmp_path):
    env, home = server["env"], tmp_path / "never"
    before = len(client_call(env, lambda c: c.read_flow_runs()))
    r = prefect("deployment", "run", "pipeline/demo", "--param", f"home={home}",
                "--param", 'train={"preset": "tiny", "max_steps": "lots"}', env=env)
    assert r.returncode == 1
    out = " ".join((r.stdout + r.stderr).split())  # Rich wraps long lines
    assert "Validation failed for field 'train.max_steps'" in out and "'lots' is not valid" in out, out
    assert len(client_call(env, lambda c: c.read_flow_runs())) == before  # no run was created
    assert not home.exists()


def test_sample_10bt_downloads_and_tokenizes_on_dask(server, tmp_path):
    """`prepare/sample-10bt` against a fake Hub, its shards built on a 2-process Dask LocalCluster."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from tests.fakehub import FakeHub, build_fineweb_tree

    env, home = server["env"], Home.from_env(tmp_path / "home")
    tree = build_fineweb_tree(tmp_path / "hub")
    with FakeHub(tree) as hub:
        params = {"home": str(home.root), "max_files": 2, "vocab_size": 1024, "min_free_bytes": 0, "dask_local": 2}
        job_env = {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": ""}
        r = prefect("deployment", "run", "prepare/sample-10bt", "--param", f"params={json.dumps(params)}",
                    "--job-variable", f"env={json.dumps(job_env)}", "--watch", env=env, timeout=600)
    log = (server["tmp"] / "worker.log").read_text()[-4000:]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + log
    files = catalog.query_rows(home, "SELECT file, status FROM source_files ORDER BY position")
    assert files == [(f"sample/10BT/{i:03d}_00000.parquet", "verified") for i in range(2)]
    shards = catalog.query_rows(home, "SELECT shard_id, split, status FROM shards ORDER BY 1, 2")
    assert [s[2] for s in shards] == ["done"] * 4 and {s[0] for s in shards} == {0, 1}
    rid = run_id(r.stdout)
    logs = client_call(env, lambda c: c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[rid]))))
    assert any("tasks run on Dask" in l.message and "(2 workers)" in l.message for l in logs), \
        [l.message for l in logs][:20]
