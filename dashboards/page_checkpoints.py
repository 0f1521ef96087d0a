"""Checkpoints page: step, val loss, size, sha256, each checkpoint's evaluations, its Prefect flow run and artifacts.
The list is catalog-only (no torch); Prefect is asked about one checkpoint at a time, cached, with a timeout."""
from __future__ import annotations

import os
from pathlib import Path

import duckdb
import streamlit as st

from dashboards import common, prefect_info
from storage.catalog import CatalogMissing
from storage.checkpoints import MARKER

st.title("Checkpoints")
h = common.home()


@st.cache_data(ttl=60, max_entries=64, show_spinner="asking Prefect…")
def _details(flow_run_id: str, api: str, ui: str) -> dict | str:
    try:
        return prefect_info.flow_run_details(flow_run_id)
    except RuntimeError as e:
        return str(e)


def details(row: dict) -> None:
    st.subheader(f"{row['run_id']} · step {row['step']}")
    on_disk = (Path(row["path"]) / MARKER).is_file() if row["path"] else False
    st.markdown(f"- path: `{row['path']}` {'(complete)' if on_disk else '(**missing on disk**: pruned or moved)'}\n"
                f"- sha256 of model.safetensors: `{row['sha256']}`\n"
                f"- size: {common.human_bytes(row['size_bytes'])}, val loss: "
                f"{row['val_loss'] if row['val_loss'] is not None else '–'}")
    ev = common.evaluations(h, row["run_id"], row["step"])
    if ev.num_rows:
        st.markdown("**Evaluations**")
        st.dataframe(common.frame(ev), hide_index=True, width="stretch", column_config={
            "value": st.column_config.NumberColumn(format="%.4f"),
            "stderr": st.column_config.NumberColumn(format="%.4f"),
            "split_id": st.column_config.TextColumn("split (sha256)", width="small")})
    else:
        st.caption(f"no evaluations yet: `langpwt evaluate --checkpoint {row['path']}`")
    fr = row["flow_run_id"]
    if not fr:
        st.caption("no Prefect flow run recorded (trained with `python -m model.train` directly)")
        return
    url = prefect_info.flow_run_url(fr)
    st.markdown(f"- Prefect flow run: [{fr}]({url})" if url else f"- Prefect flow run: `{fr}` "
                "(set `PREFECT_UI_URL` for a link into the Prefect UI)")
    if not prefect_info.api_configured():
        st.caption("Set `PREFECT_API_URL` to list the run's state and artifacts here.")
        return
    info = _details(fr, os.environ.get("PREFECT_API_URL", ""), os.environ.get("PREFECT_UI_URL", ""))
    if isinstance(info, str):
        st.warning(info)
        return
    st.markdown(f"- flow `{info['flow']}`, run `{info['name']}`, state **{info['state']}**")
    if info["artifacts"]:
        st.markdown("**Artifacts of that run**")
        st.dataframe(info["artifacts"], hide_index=True, width="stretch", column_config={
            "url": st.column_config.LinkColumn("link", display_text="open in Prefect"),
        })
    else:
        st.caption("that flow run created no artifacts")


if common.need_catalog(h) is not None:
    try:
        tbl = common.checkpoints(h)
    except (CatalogMissing, duckdb.Error) as e:
        common.show_error(e)
        tbl = None
    if tbl is not None and tbl.num_rows == 0:
        st.info("No checkpoints yet: run")
        st.code(common.TRAIN_HINT, language="bash")
    elif tbl is not None:
        df = common.frame(tbl)
        df["size"] = [common.human_bytes(n) for n in df["size_bytes"]]
        df["flow_run"] = [prefect_info.flow_run_url(f) or f for f in df["flow_run_id"]]
        link = prefect_info.ui_url() is not None
        st.dataframe(df[["run_id", "step", "val_loss", "size", "sha256", "created_at", "preset", "run_status",
                         "flow_run"]], hide_index=True, width="stretch", column_config={
            "val_loss": st.column_config.NumberColumn("val loss", format="%.4f"),
            "sha256": st.column_config.TextColumn("sha256", width="medium"),
            "flow_run": (st.column_config.LinkColumn("Prefect flow run", display_text=r"runs/flow-run/(.{8})")
                         if link else st.column_config.TextColumn("Prefect flow run")),
        })
        rows = tbl.to_pylist()
        labels = [f"{r['run_id']} · step {r['step']}" for r in rows]
        pick = st.selectbox("Checkpoint", range(len(rows)), format_func=lambda i: labels[i], key="ckpt_pick")
        details(rows[pick])
