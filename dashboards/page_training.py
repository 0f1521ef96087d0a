"""Training page: the runs, and one or two side by side with loss, val bpb, lr, tokens/s and MFU curves.
Curves are bucketed in DuckDB to ~1,000 points per run, so a 100k-step run draws as fast as a short one."""
from __future__ import annotations

import altair as alt
import duckdb
import pandas as pd
import streamlit as st

from dashboards import common, queries
from storage.catalog import CatalogMissing

STALL_S = 300

st.title("Training")
h = common.home()


def loss_chart(curves: pd.DataFrame, val: pd.DataFrame, color_by_run: bool = False) -> alt.Chart:
    """Train loss as a line, val loss as a line with points; one color per run when comparing."""
    train = curves[["run_id", "step", "train_loss"]].rename(columns={"train_loss": "loss"}).assign(split="train")
    v = val.rename(columns={"val_loss": "loss"}).assign(split="val")
    df = pd.concat([train, v], ignore_index=True).dropna(subset=["loss"])
    df["series"] = (df["run_id"] + " " + df["split"]) if color_by_run else df["split"]
    return alt.Chart(df).mark_line(point=alt.OverlayMarkDef(size=20, filled=True)).encode(
        x=alt.X("step:Q"), y=alt.Y("loss:Q", scale=alt.Scale(zero=False)),
        color=alt.Color("series:N", title=None), strokeDash=alt.StrokeDash("split:N", legend=None),
        tooltip=["run_id", "split", "step", alt.Tooltip("loss:Q", format=".4f")])


def bpb_chart(val: pd.DataFrame, whole: pd.DataFrame, color_by_run: bool = False) -> alt.Chart:
    """Val bits per byte: the periodic evals' sampled windows as a line, the whole split's as squares."""
    s = val[["run_id", "step", "val_bpb"]].dropna().assign(kind="sampled windows")
    w = whole[["run_id", "step", "val_bpb"]].assign(kind="whole split")
    df = pd.concat([s, w], ignore_index=True)
    df["series"] = (df["run_id"] + " " + df["kind"]) if color_by_run else df["kind"]
    base = alt.Chart(df).encode(x="step:Q", y=alt.Y("val_bpb:Q", title="val bpb", scale=alt.Scale(zero=False)),
                                color=alt.Color("series:N", title=None),
                                tooltip=["run_id", "kind", "step", alt.Tooltip("val_bpb:Q", format=".4f")])
    return (base.transform_filter(alt.datum.kind == "sampled windows").mark_line(point=True)
            + base.transform_filter(alt.datum.kind == "whole split").mark_square(size=80))


def series_chart(curves: pd.DataFrame, col: str, fmt: str = ".3g") -> alt.Chart:
    return alt.Chart(curves.dropna(subset=[col])).mark_line().encode(
        x="step:Q", y=alt.Y(f"{col}:Q", scale=alt.Scale(zero=False)),
        tooltip=["step", alt.Tooltip(f"{col}:Q", format=fmt)])


def one_run(run: dict, curves: pd.DataFrame, val: pd.DataFrame, whole: pd.DataFrame, samples: pd.DataFrame) -> None:
    st.subheader(run["run_id"])
    st.caption(f"preset `{run['preset']}` · {run['status']} · {run['device'] or '?'}"
               + (f" · error: {run['error']}" if run["error"] else ""))
    c = st.columns(4)
    c[0].metric("Step", run["last_step"] if run["last_step"] is not None else "–")
    c[1].metric("Best val loss", f"{run['best_val_loss']:.4f}" if run["best_val_loss"] is not None else "–")
    c[2].metric("Tokens/s", common.human_count(run["tokens_per_s"]))
    c[3].metric("MFU", f"{run['mfu']:.1%}" if run["mfu"] is not None else "–")
    if not len(curves):
        st.caption("no metrics yet")
        return
    st.markdown("**Loss**")
    st.altair_chart(loss_chart(curves, val), height=240)
    if val["val_bpb"].notna().any() or len(whole):
        st.markdown("**Val bits per byte**")
        st.altair_chart(bpb_chart(val, whole), height=200)
        if len(whole):
            last = whole.iloc[-1]
            st.caption(f"whole split at step {last['step']}: {last['val_bpb']:.4f} bpb over {last['split_size']:,} "
                       f"tokens (split {last['split_id'][:12]}); the line: each eval's sampled windows")
    st.markdown("**Learning rate**")
    st.altair_chart(series_chart(curves, "lr", ".2e"), height=160)
    st.markdown("**Tokens/s**")
    st.altair_chart(series_chart(curves, "tokens_per_s", ",.0f"), height=160)
    if curves["mfu"].notna().any():
        st.markdown("**MFU**")
        st.altair_chart(series_chart(curves, "mfu", ".1%"), height=160)
    else:
        st.caption("MFU: not measured on this device (no known peak FLOP/s)")
    if len(samples):
        with st.expander(f"Samples ({len(samples)})"):
            for s in samples.head(5).itertuples():
                st.markdown(f"step {s.step}, prompt `{s.prompt}`")
                st.text(s.text)


def render(initial_running: bool | None) -> None:
    try:
        runs = common.runs(h)
    except (CatalogMissing, duckdb.Error) as e:
        common.show_error(e)
        return
    running = "running" in runs["status"].to_pylist()
    if initial_running is not None and running != initial_running:
        st.rerun()
    if running:
        st.info(f"A run is going: this page refreshes every {common.REFRESH_S:.0f} s.", icon=":material/autorenew:")
        quiet = queries.catalog_idle_s(h)
        if quiet > STALL_S:  # the trainer's parent writes metrics every ~10 s while it lives
            st.warning(f"No new metrics for {quiet / 60:.0f} min: the run may have died without recording it. "
                       "`langpwt train --resume` continues from its last checkpoint.")
    rows = runs.to_pylist()
    ids = [r["run_id"] for r in rows]
    st.dataframe(common.frame(runs), hide_index=True, width="stretch", column_config={
        "tokens": st.column_config.NumberColumn(format="localized"),
        "tokens_per_s": st.column_config.NumberColumn("tokens/s", format="localized"),
        "mfu": st.column_config.NumberColumn("MFU", format="percent"),
    })
    chosen = st.multiselect("Runs to show (two side by side)", ids, default=ids[:2], max_selections=2,
                            key="train_runs")
    if not chosen:
        return
    v = common.training(h, chosen)
    curves, val, whole, samples = (v[k].to_pandas() for k in ("curves", "val", "whole", "samples"))
    if len(chosen) == 2 and len(curves):
        st.markdown("**Loss, both runs**")
        st.altair_chart(loss_chart(curves, val, color_by_run=True), height=260)
        if queries.comparable(v["whole"]):
            st.markdown("**Val bits per byte, both runs**")
            st.altair_chart(bpb_chart(val, whole, color_by_run=True), height=220)
        else:
            st.warning("The two runs' val bpb were measured on different val splits (token count or sha256 "
                       "differ): they are shown per run, not compared.")
    cols = st.columns(len(chosen))
    by_id = {r["run_id"]: r for r in rows}
    for col, rid in zip(cols, chosen):
        with col:
            one_run(by_id[rid], curves[curves["run_id"] == rid], val[val["run_id"] == rid],
                    whole[whole["run_id"] == rid], samples[samples["run_id"] == rid])


if common.need_runs(h) is not None:
    try:
        live = "running" in common.runs(h)["status"].to_pylist()
    except (CatalogMissing, duckdb.Error) as e:
        common.show_error(e)
    else:
        st.fragment(run_every=common.REFRESH_S if live else None)(render)(live)
