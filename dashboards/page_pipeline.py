"""Pipeline page: source files and shards with status, tokens, documents kept/dropped, throughput.
Re-reads the catalog on a timer only while it shows a run; idle, it costs nothing."""
from __future__ import annotations

import duckdb
import pyarrow as pa
import streamlit as st

from dashboards import common, queries
from storage.catalog import CatalogMissing

# cell colors, not emoji: a browser without an emoji font (headless Chromium) draws those as boxes
STATUS_COLOR = {"done": "#d3f2dc", "failed": "#fbd5d5", "stale": "#fdecc8", "running": "#d6e8fb",
                "interrupted?": "#fdecc8", "partial": "#fdecc8"}

STALL_S = 120  # no catalog change for this long and no local lock holder: the run likely died

st.title("Pipeline")
h = common.home()


def run_state(v: dict) -> str:
    """idle | running | stalled. A run on another machine (shared storage) holds no lock visible
    here, so "stalled" also needs the catalog to have been quiet for a while."""
    if not queries.is_running(v):
        return "idle"
    if queries.pipeline_alive(h) or queries.catalog_idle_s(h) < STALL_S:
        return "running"
    return "stalled"


def _status_col(tbl: pa.Table, state: str) -> list[str]:
    return ["interrupted?" if s == "running" and state == "stalled" else s for s in tbl["status"].to_pylist()]


def _color(status: str) -> str:
    return f"background-color: {STATUS_COLOR[status]}" if status in STATUS_COLOR else ""


def render(initial_running: bool | None) -> None:
    try:
        v = common.pipeline(h)
    except (CatalogMissing, duckdb.Error) as e:
        common.show_error(e)
        return
    state = run_state(v)
    if initial_running is not None and (state != "idle") != initial_running:
        st.rerun()  # the run started or ended: re-render the whole page with(out) the refresh timer
    t = v["totals"].to_pylist()[0]
    if state == "running":
        st.info(f"A pipeline run is going: this page refreshes every {common.REFRESH_S:.0f} s.",
                icon=":material/autorenew:")
    elif state == "stalled":
        st.warning(f"The catalog shows a run as `running`, but it has not changed for {STALL_S // 60} min and "
                   "no process on this machine holds the pipeline lock: the run was probably interrupted. "
                   "`langpwt tokenize` resumes it (finished shards are kept).")
    c = st.columns(6)
    c[0].metric("Shards done", f"{t['done']}/{t['shards']}")
    c[1].metric("Failed", t["failed"])
    c[2].metric("Stale", t["stale"])
    c[3].metric("Tokens (done shards)", common.human_count(t["tokens"]))
    c[4].metric("Documents kept", common.human_count(t["docs_kept"]))
    c[5].metric("Tokens/s (per shard)", common.human_count(t["tokens_per_s"]))

    st.subheader("Shards")
    shards = v["shards"]
    if shards.num_rows:
        df = common.frame(shards)
        df["status"] = _status_col(shards, state)
        styled = df.style.map(_color, subset=["status"]).format(
            precision=3, thousands=",", na_rep="", formatter={"shard_id": "{:06d}"})
        st.dataframe(styled, hide_index=True, width="stretch", column_config={
            "shard_id": "shard", "tokens_per_s": "tokens/s", "error": st.column_config.TextColumn(width="large")})
        failed = df[df["error"].notna()]
        for row in failed.itertuples():
            st.error(f"shard {row.shard_id:06d} ({row.source_file}): {row.error}")
    else:
        st.caption("no shards yet")

    left, right = st.columns(2)
    with left:
        st.subheader("Documents kept and dropped")
        out = v["outcomes"].to_pandas()
        if len(out):
            st.bar_chart(out, x="outcome", y="documents", horizontal=True, height=220)
            st.dataframe(out, hide_index=True, width="stretch")
    with right:
        st.subheader("Source files")
        st.dataframe(common.frame(v["files"]), hide_index=True, width="stretch", column_config={
            "size_bytes": st.column_config.NumberColumn("bytes", format="localized"),
        })

    st.subheader("Pipeline runs")
    st.caption("Prefect flow runs that wrote this catalog (newest first); `seconds` is wall time.")
    st.dataframe(common.frame(v["runs"]), hide_index=True, width="stretch")


if common.need_catalog(h) is not None:
    try:
        is_live = run_state(common.pipeline(h)) != "idle"
    except (CatalogMissing, duckdb.Error) as e:
        common.show_error(e)
        is_live = None
    if is_live is not None:
        if common.home_state(h).shards == 0 and not is_live:
            st.info("The catalog holds no shards yet. Run the data pipeline first:")
            st.code(common.PREPARE_HINT, language="bash")
        st.fragment(run_every=common.REFRESH_S if is_live else None)(render)(is_live)
