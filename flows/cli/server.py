"""`langpwt server up|down|status`: a local Prefect server and a process worker in one line each.
Pid files and logs live in $LANGPWT_HOME/prefect/; both processes run in their own session so a
closed terminal leaves them up. Trade-off: `down` stops in-flight runs of the worker too (they
could not report to a stopped server anyway); use the Prefect UI to cancel one run instead."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
POOLS = ("langpwt-cpu", "langpwt-gpu")  # the work pools prefect.yaml names


def err(msg: str) -> int:
    print(f"langpwt: error: {msg}", file=sys.stderr)
    return 2


def state_dir(create: bool = True) -> Path:
    from storage.paths import Home

    d = Home.from_env().root / "prefect"
    if create:
        d.mkdir(parents=True, exist_ok=True)
    return d


def running(pidfile: Path) -> int | None:
    """The pid recorded in `pidfile` if that process is alive and still a Prefect process (pids get reused)."""
    try:
        pid = int(pidfile.read_text().split()[0])
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, IndexError, ProcessLookupError):
        return None
    except PermissionError:
        return None
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists() and b"prefect" not in cmdline.read_bytes():
        return None
    return pid


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def spawn(cmd: list[str], log: Path, pidfile: Path, env: dict) -> subprocess.Popen:
    # own session: a Ctrl-C in the user's shell does not reach it, and `down` can signal its whole group
    with open(log, "ab") as out:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    pidfile.write_text(f"{p.pid}\n")
    return p


def last_line(log: Path) -> str:
    lines = [l for l in log.read_text(errors="replace").splitlines() if l.strip()] if log.exists() else []
    return lines[-1].strip() if lines else "(no output)"


def ensure_pools(api_url: str, names=POOLS) -> list[str]:
    """Create the process work pools that are missing; returns the names created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    created = []
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        for name in names:
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(
                    name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template()))
                created.append(name)
    return created


def worker_online(api_url: str, pool: str) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return any(w.status == "ONLINE" for w in client.read_workers_for_work_pool(pool))


def wait_for(pred, timeout: float, proc: subprocess.Popen | None = None, step: float = 0.5) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(step)
    return False


def cmd_up(args) -> int:
    d = state_dir()
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}/api"
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED=os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED", "false"))
    if (pid := running(d / "server.pid")) and healthy(url):
        print(f"server already up (pid {pid})")
    else:
        if not port_free(args.host, args.port):
            return err(f"{args.host}:{args.port} is in use (another Prefect server?); choose --port or stop it")
        env.pop("PREFECT_API_URL", None)
        p = spawn([sys.executable, "-m", "prefect", "server", "start", "--host", args.host, "--port", str(args.port)],
                  d / "server.log", d / "server.pid", env)
        if not wait_for(lambda: healthy(url), args.timeout, p):
            stop(d / "server.pid", 10, 10)
            return err(f"server did not become healthy in {args.timeout:.0f} s: {last_line(d / 'server.log')} "
                       f"(log: {d / 'server.log'})")
        print(f"server up (pid {p.pid}), log {d / 'server.log'}")
    (d / "api_url").write_text(url + "\n")
    env["PREFECT_API_URL"] = url
    created = ensure_pools(url)
    if created:
        print(f"created work pools: {', '.join(created)}")
    if args.deploy:
        r = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=ROOT, env=env,
                           capture_output=True, text=True)
        if r.returncode:
            return err(f"prefect deploy --all failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        print("deployed: prefect.yaml (all deployments)")
    if args.pool:
        if pid := running(d / "worker.pid"):
            print(f"worker already up (pid {pid})")
        else:
            env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "5")  # default 10 s: a run would wait that long to start
            p = spawn([sys.executable, "-m", "prefect", "worker", "start", "--pool", args.pool],
                      d / "worker.log", d / "worker.pid", env)
            if not wait_for(lambda: worker_online(url, args.pool), args.timeout, p, step=1.0):
                stop(d / "worker.pid", 3, 10)
                return err(f"worker for pool {args.pool} did not come online: {last_line(d / 'worker.log')}")
            print(f"worker up on pool {args.pool} (pid {p.pid}), log {d / 'worker.log'}")
    print(f"Prefect UI: {url.removesuffix('/api')}\nexport PREFECT_API_URL={url}")
    if args.host in ("0.0.0.0", "::"):
        print(f"workers on other machines: export PREFECT_API_URL=http://{socket.getfqdn()}:{args.port}/api")
    return 0


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop(pidfile: Path, grace: float, timeout: float) -> int | None:
    """Stop the process in `pidfile` and what it started; returns its pid, or None if it was not running.

    SIGTERM, then after `grace` seconds a second SIGTERM, then SIGKILL once `timeout` has passed."""
    pid = running(pidfile)
    if pid is None:
        pidfile.unlink(missing_ok=True)
        return None
    gone = lambda: running(pidfile) is None  # noqa: E731
    os.kill(pid, signal.SIGTERM)
    # a Prefect worker turns the first SIGTERM into a SIGINT it may sit on; the second one kills it
    if not wait_for(gone, grace, step=0.1):
        os.kill(pid, signal.SIGTERM)
        if not wait_for(gone, timeout, step=0.1):
            _signal_group(pid, signal.SIGKILL)
            wait_for(gone, 5, step=0.1)
    _signal_group(pid, signal.SIGTERM)  # flow runs the worker started, if any are left in its session
    time.sleep(0.2)
    _signal_group(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)
    return pid


def cmd_down(args) -> int:
    d = state_dir()
    stopped = []
    for what in ("worker", "server"):  # workers first: a worker without its server logs errors in a loop
        # a Prefect worker ignores its first SIGTERM, so it gets a short grace; the server stops on the first
        pid = stop(d / f"{what}.pid", 3.0 if what == "worker" else args.timeout, args.timeout)
        if pid:
            stopped.append(f"{what} (pid {pid})")
    print(f"stopped {', '.join(stopped)}" if stopped else f"nothing running (pid files in {d})")
    return 0


def cmd_status(args) -> int:
    d = state_dir()
    url = (d / "api_url").read_text().strip() if (d / "api_url").exists() else None
    up = True
    for what in ("server", "worker"):
        pid = running(d / f"{what}.pid")
        ok = pid is not None and (what != "server" or (url is not None and healthy(url)))
        up &= ok
        print(f"{what}: {'up, pid ' + str(pid) if ok else 'down'} (log {d / (what + '.log')})")
    if url and up:
        print(f"Prefect UI: {url.removesuffix('/api')}\nexport PREFECT_API_URL={url}")
    return 0 if up else 1


def register(sub) -> None:
    p = sub.add_parser("server", help="start/stop a local Prefect server and worker")
    s = p.add_subparsers(dest="server_command", metavar="up|down|status", required=True)
    up = s.add_parser("up", help="start the server, create the work pools, start a worker")
    up.add_argument("--host", default="127.0.0.1", help="0.0.0.0 lets workers on other machines connect")
    up.add_argument("--port", type=int, default=4200)
    up.add_argument("--pool", default=POOLS[0], help="pool the local worker serves ('' for no worker)")
    up.add_argument("--deploy", action="store_true", help="also run `prefect deploy --all` (prefect.yaml)")
    up.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for each process to be ready")
    up.set_defaults(handler=cmd_up)
    down = s.add_parser("down", help="stop the worker, then the server")
    down.add_argument("--timeout", type=float, default=20.0)
    down.set_defaults(handler=cmd_down)
    st = s.add_parser("status", help="whether the server and worker are up")
    st.set_defaults(handler=cmd_status)
