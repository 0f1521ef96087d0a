"""What every page shares: the home, cached catalog reads, empty-home messages, small formatters.
Caches are keyed by the catalog's mtime: never older than the last commit, no re-query while idle."""
from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import streamlit as st

from dashboards import queries
from storage.catalog import CatalogMissing
from storage.paths import Home
from storage.user_sql import one_line

TTL_S = 60
REFRESH_S = 2.0  # how often a page re-reads the catalog while a pipeline or a training run is going

PREPARE_HINT = "langpwt prepare --source data/sample --vocab-size 8192"
TRAIN_HINT = "langpwt train --preset tiny"


def home() -> Home:
    return Home.from_env()


def _key(h: Home) -> tuple[str, tuple[int, int]]:
    return str(h.root), queries.catalog_version(h)


@st.cache_data(ttl=TTL_S, max_entries=32, show_spinner=False)
def _home_state(root: str, version: tuple) -> queries.HomeState:
    return queries.home_state(Home(Path(root)))


@st.cache_data(ttl=TTL_S, max_entries=32, show_spinner=False)
def _pipeline(root: str, version: tuple) -> dict:
    return queries.pipeline(Home(Path(root)))


@st.cache_data(ttl=TTL_S, max_entries=32, show_spinner=False)
def _token_stats(root: str, version: tuple, top_n: int, bins: int) -> dict:
    return queries.token_stats(Home(Path(root)), top_n, bins)


@st.cache_data(ttl=TTL_S, max_entries=64, show_spinner=False)
def _sql(root: str, version: tuple, sql: str) -> queries.SqlResult:
    return queries.run_sql(Home(Path(root)), sql)


@st.cache_data(ttl=TTL_S, max_entries=32, show_spinner=False)
def _runs(root: str, version: tuple) -> pa.Table:
    return queries.runs(Home(Path(root)))


@st.cache_data(ttl=TTL_S, max_entries=32, show_spinner=False)
def _training(root: str, version: tuple, run_ids: tuple[str, ...]) -> dict:
    return queries.training(Home(Path(root)), list(run_ids))


@st.cache_data(ttl=TTL_S, max_entries=32, show_spinner=False)
def _checkpoints(root: str, version: tuple) -> pa.Table:
    return queries.checkpoints(Home(Path(root)))


@st.cache_data(ttl=TTL_S, max_entries=64, show_spinner=False)
def _evaluations(root: str, version: tuple, run_id: str, step: int) -> pa.Table:
    return queries.evaluations(Home(Path(root)), run_id, step)


@st.cache_resource(max_entries=2, show_spinner=False)
def _tokenizer(path: str, mtime: int):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)  # parsing a large vocabulary is not free: once per server, not per view


@st.cache_data(ttl=3600, max_entries=8, show_spinner=False)
def _decoded(tokenizer: str, mtime: int, ids: tuple[int, ...]) -> list[tuple[str, str]]:
    return queries.decode_tokens(_tokenizer(tokenizer, mtime), list(ids))


def home_state(h: Home) -> queries.HomeState:
    return _home_state(*_key(h))


def pipeline(h: Home) -> dict:
    return _pipeline(*_key(h))


def token_stats(h: Home, top_n: int = 40, bins: int = 40) -> dict:
    return _token_stats(*_key(h), top_n, bins)


def sql(h: Home, text: str) -> queries.SqlResult:
    return _sql(*_key(h), text)


def runs(h: Home) -> pa.Table:
    return _runs(*_key(h))


def training(h: Home, run_ids: list[str]) -> dict:
    return _training(*_key(h), tuple(run_ids))


def checkpoints(h: Home) -> pa.Table:
    return _checkpoints(*_key(h))


def evaluations(h: Home, run_id: str, step: int) -> pa.Table:
    return _evaluations(*_key(h), run_id, step)


def decoded(h: Home, ids: list[int]) -> list[tuple[str, str]]:
    return _decoded(str(h.tokenizer), h.tokenizer.stat().st_mtime_ns, tuple(ids))


def need_catalog(h: Home) -> queries.HomeState | None:
    """The home's state, or None after telling the user what to run first."""
    if not h.root.exists():
        st.info(f"**{h.root}** does not exist yet. Create it with the data pipeline:")
        st.code(PREPARE_HINT, language="bash")
        st.caption("or point the dashboard at another home: `langpwt --home DIR dashboard`")
        return None
    try:
        state = home_state(h)
    except (CatalogMissing, duckdb.Error) as e:
        st.warning(f"Cannot read the catalog: {one_line(str(e))}")
        return None
    if not state.catalog:
        st.info(f"No catalog in **{h.root}** yet. Run the data pipeline first:")
        st.code(PREPARE_HINT, language="bash")
        return None
    return state


def need_data(h: Home) -> queries.HomeState | None:
    state = need_catalog(h)
    if state is not None and state.shards == 0 and state.documents == 0:
        st.info("The catalog holds no shards yet. Run the data pipeline first:")
        st.code(PREPARE_HINT, language="bash")
        return None
    return state


def need_runs(h: Home) -> queries.HomeState | None:
    state = need_catalog(h)
    if state is not None and state.runs == 0:
        st.info("No training runs yet: run")
        st.code(TRAIN_HINT, language="bash")
        return None
    return state


def show_error(e: Exception) -> None:
    """A one-line error for catalog trouble (e.g. a writer holding the file for too long)."""
    st.warning(f"Cannot read the catalog right now: {one_line(str(e))}")


_NULLABLE_INTS = {pa.int8(): pd.Int8Dtype(), pa.int16(): pd.Int16Dtype(), pa.int32(): pd.Int32Dtype(),
                  pa.int64(): pd.Int64Dtype()}


def frame(tbl: pa.Table) -> pd.DataFrame:
    """Arrow -> pandas keeping integer columns integers when they hold nulls (no 1309.000000)."""
    return tbl.to_pandas(types_mapper=_NULLABLE_INTS.get)


def human_bytes(n: int | None) -> str:
    if n is None or pd.isna(n):
        return ""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_count(n: float | None) -> str:
    if n is None or pd.isna(n):
        return "–"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:,.0f}" if float(n).is_integer() else f"{n:.3g}"
