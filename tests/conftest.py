"""Shared fixtures: isolated homes, a Prefect test server for the session, FineWeb-Edu-style parquet.
Fixture data is real text (the bundled sample), rearranged by the tests, never hand-written rows."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
if not shutil.which("nvidia-smi"):
    # before anything imports Triton: without a GPU its kernels run in the interpreter (tests/test_kernels.py);
    # the CPU code paths never launch them
    os.environ.setdefault("TRITON_INTERPRET", "1")

SCHEMA = pa.schema([("text", pa.string()), ("id", pa.string()), ("dump", pa.string()), ("url", pa.string()),
                    ("file_path", pa.string()), ("language", pa.string()), ("language_score", pa.float64()),
                    ("score", pa.float64()), ("token_count", pa.int64()), ("int_score", pa.int64())])


@pytest.fixture(scope="session", autouse=True)
def _isolated_prefect_home(tmp_path_factory):
    # every Prefect client in this session and its subprocesses uses a throwaway database
    if "PREFECT_HOME" not in os.environ or not os.environ.get("LANGPWT_TEST_KEEP_PREFECT_HOME"):
        os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect_home"))
    yield


@pytest.fixture(scope="session")
def prefect_api():
    """A Prefect test server for the session; yields its API URL for subprocesses to use."""
    from prefect.settings import get_current_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield get_current_settings().api.url


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict[str, Path]:
    """FineWeb-Edu's repository laid out for the fake Hub (tests/fakehub.py), built once per module."""
    from tests.fakehub import build_fineweb_tree
    return build_fineweb_tree(tmp_path_factory.mktemp("hub_tree"))


@pytest.fixture
def hf_isolated(tmp_path, monkeypatch) -> None:
    """No developer login or Hub cache leaks into a test; subprocesses inherit this."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture
def home(tmp_path, monkeypatch):
    from storage.paths import Home

    h = tmp_path / "home"
    monkeypatch.setenv("LANGPWT_HOME", str(h))
    return Home.from_env(h)


def sample_rows() -> list[dict]:
    return pa.concat_tables([pq.read_table(p) for p in sorted(SAMPLE.glob("*.parquet"))]).to_pylist()


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 200) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path, row_group_size=row_group_size,
                   compression="zstd")
    return path


@pytest.fixture
def sample_source(tmp_path) -> Path:
    d = tmp_path / "source"
    shutil.copytree(SAMPLE, d, ignore=shutil.ignore_patterns("*.md"))
    return d


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
    """Run `langpwt` as users do, in a fresh process."""
    e = dict(os.environ, **(env or {}))
    p = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=e, capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"langpwt {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p
