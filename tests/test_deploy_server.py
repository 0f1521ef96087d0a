"""`langpwt server up|status|down`: a local server and worker in one line, pid files and logs under
$LANGPWT_HOME/prefect, workers stopped before the server, nothing left running, clear errors."""
from __future__ import annotations

import os
import socket

import pytest

from tests.conftest import SAMPLE, run_cli
from tests.test_deploy import free_port

pytestmark = pytest.mark.slow


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    stat = open(f"/proc/{pid}/stat").read() if os.path.exists(f"/proc/{pid}/stat") else ""
    return stat.split(")")[-1].split()[:1] != ["Z"]


def flow_runs(api_url: str, name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as c:
        return c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[name])))


def test_up_status_down(tmp_path):
    port = free_port()
    env = {"LANGPWT_HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / "prefect_home"),
           "PREFECT_WORKER_QUERY_SECONDS": "2"}
    env.pop("PREFECT_API_URL", None)
    state = tmp_path / "home" / "prefect"
    try:
        up = run_cli("server", "up", "--port", str(port), env=env, timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"export PREFECT_API_URL=http://127.0.0.1:{port}/api" in up.stdout
        server, worker = (int((state / f"{w}.pid").read_text()) for w in ("server", "worker"))
        assert alive(server) and alive(worker)
        assert (state / "server.log").exists() and "started" in (state / "worker.log").read_text()

        st = run_cli("server", "status", env=env)
        assert st.returncode == 0 and f"pid {server}" in st.stdout and f"pid {worker}" in st.stdout, st.stdout
        again = run_cli("server", "up", "--port", str(port), env=env)  # idempotent: nothing new started
        assert again.returncode == 0 and "already up" in again.stdout, again.stdout + again.stderr
        assert int((state / "server.pid").read_text()) == server

        other = run_cli("--home", str(tmp_path / "other"), "server", "up", "--port", str(port), "--pool", "", env=env)
        assert other.returncode == 2 and other.stderr.count("\n") == 1 and "in use" in other.stderr, other.stderr

        # with no PREFECT_API_URL set, a flow command of this home reports to the server that is up (its
        # own PREFECT_HOME: a temporary server would keep the run in another database)
        tok = run_cli("tokenize", "--source", str(SAMPLE), "--vocab-size", "1024",
                      env=dict(env, PREFECT_HOME=str(tmp_path / "cli_prefect_home")))
        assert tok.returncode == 0, tok.stdout + tok.stderr
        assert [r.state.type.value for r in flow_runs(f"http://127.0.0.1:{port}/api", "tokenize")] == ["COMPLETED"]
    finally:
        down = run_cli("server", "down", env=env, timeout=120)
    assert down.returncode == 0 and "stopped worker" in down.stdout and "server" in down.stdout, down.stdout
    assert not alive(server) and not alive(worker)
    assert not (state / "server.pid").exists() and not (state / "worker.pid").exists()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine, a listener is not
        s.bind(("127.0.0.1", port))
    st = run_cli("server", "status", env=env)
    assert st.returncode == 1 and "server: down" in st.stdout
    assert "nothing running" in run_cli("server", "down", env=env).stdout
