"""`langpwt dashboard [--port N]`: the Streamlit viewer over $LANGPWT_HOME, on 127.0.0.1 only.
Runs `streamlit run` as a child process and waits: the CLI stays import-light, Ctrl-C or SIGTERM stops both."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

APP = Path(__file__).resolve().parents[2] / "dashboards" / "streamlit_app.py"


def streamlit_command(port: int, address: str = "127.0.0.1") -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(APP),
            "--server.address", address, "--server.port", str(port),
            "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--client.toolbarMode", "viewer",  # no Deploy button: a local viewer has nothing to deploy
            "--server.fileWatcherType", "none",  # no file watching: saves a thread and inotify handles
            "--server.runOnSave", "false"]


def cmd_dashboard(args) -> int:
    from storage.paths import Home

    home = Home.from_env()
    env = dict(os.environ, LANGPWT_HOME=str(home.root))
    print(f"LangPWT dashboard on http://127.0.0.1:{args.port} over {home.root} (Ctrl-C stops it)", flush=True)
    if not home.catalog.exists():
        print(f"note: no catalog in {home.root} yet; the pages will say what to run first", flush=True)
    proc = subprocess.Popen(streamlit_command(args.port), env=env)
    # a service manager's SIGTERM must stop the server too, not orphan it
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return 130


def register(sub) -> None:
    p = sub.add_parser("dashboard", help="Streamlit viewer: pipeline, token stats, training, checkpoints, playground")
    p.add_argument("--port", type=int, default=8501, help="port on 127.0.0.1 (default 8501)")
    p.set_defaults(handler=cmd_dashboard)
