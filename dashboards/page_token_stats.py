"""Token stats page: tokens by dump and int_score, document lengths, top tokens, and a SQL box.
Charts draw DuckDB aggregates (hundreds of rows); the SQL box pays a process start per query (`langpwt sql`'s guard),
its catalog snapshot is taken when the page opens."""
from __future__ import annotations

import altair as alt
import duckdb
import pyarrow as pa
import pyarrow.csv as pcsv
import streamlit as st

from dashboards import common, queries
from storage.catalog import CatalogMissing

EXAMPLE_SQL = """SELECT dump, sum(n_tokens) AS tokens
FROM documents WHERE kept
GROUP BY dump ORDER BY dump"""

st.title("Token stats")
h = common.home()


def charts(v: dict) -> None:
    left, right = st.columns(2)
    with left:
        st.subheader("Tokens by dump")
        st.bar_chart(v["by_dump"].to_pandas(), x="dump", y="tokens", height=260)
    with right:
        st.subheader("Tokens by int_score")
        df = v["by_int_score"].to_pandas()
        df["int_score"] = df["int_score"].astype(str)
        st.bar_chart(df, x="int_score", y="tokens", height=260)
    left, right = st.columns(2)
    with left:
        st.subheader("Document length (tokens)")
        hist = v["length_hist"].to_pandas()
        if len(hist):
            last = hist["hi"].isna()
            hist["bin"] = [f"≥{lo:,}" if open_ else f"{lo:,}–{int(hi):,}"
                           for lo, hi, open_ in zip(hist["lo"], hist["hi"], last)]
            chart = alt.Chart(hist).mark_bar().encode(
                x=alt.X("bin:N", sort=None, title="tokens per kept document (last bin: top 1 %)"),
                y=alt.Y("documents:Q"), tooltip=["bin", "documents"])
            st.altair_chart(chart, height=260)
        else:
            st.caption("no kept documents")
    with right:
        st.subheader("Top tokens")
        top = v["top_tokens"].to_pandas()
        if len(top) and h.tokenizer.exists():
            pieces = common.decoded(h, top["token_id"].tolist())
            top.insert(1, "text", [t for _, t in pieces])
            top.insert(2, "piece", [p for p, _ in pieces])
        st.dataframe(top, hide_index=True, height=260, width="stretch", column_config={
            "share": st.column_config.ProgressColumn(format="percent", min_value=0.0,
                                                     max_value=float(top["share"].max()) if len(top) else 1.0),
            "count": st.column_config.NumberColumn(format="localized"),
        })
        st.caption("`text`: the token decoded (· space, ⏎ newline); `piece`: its byte-level BPE entry.")


def sql_chart(tbl: pa.Table) -> None:
    """Chart a two-column result: bars for a category, a line for a numeric x."""
    x, y = tbl.column_names
    if not (pa.types.is_integer(tbl.schema.field(y).type) or pa.types.is_floating(tbl.schema.field(y).type)
            or pa.types.is_decimal(tbl.schema.field(y).type)):
        return
    df = tbl.to_pandas()
    df[y] = df[y].astype(float)
    numeric_x = pa.types.is_integer(tbl.schema.field(x).type) or pa.types.is_floating(tbl.schema.field(x).type)
    if numeric_x and df[x].nunique() > 30:
        st.line_chart(df, x=x, y=y, height=280)
    else:
        df[x] = df[x].astype(str)
        st.bar_chart(df, x=x, y=y, height=280)


def sql_box() -> None:
    st.subheader("SQL over the catalog")
    st.caption(f"Read-only DuckDB SQL, one statement, at most {queries.SQL_MAX_ROWS:,} rows, "
               f"{queries.SQL_TIMEOUT_S:.0f} s and {queries.SQL_MEMORY_MB:,} MB; for more, use `langpwt sql` "
               "with --max-rows, --timeout, --memory-mb. Tables: source_files, "
               "shards, documents, token_counts, tokenizers, pipeline_runs, runs, metrics, checkpoints, samples.")
    with st.form("sql"):
        text = st.text_area("Query", EXAMPLE_SQL, height=120, key="sql_text")
        submitted = st.form_submit_button("Run query", type="primary")
    if not submitted and "sql_last" not in st.session_state:
        return
    if submitted:
        st.session_state["sql_last"] = text
    text = st.session_state["sql_last"]
    try:
        res = common.sql(h, text)
    except queries.SqlRefused as e:
        st.error(str(e), icon=":material/block:")
        return
    except (duckdb.Error, CatalogMissing) as e:
        st.error(str(e), icon=":material/error:")
        return
    tbl = res.table
    more = f" (first {tbl.num_rows:,} shown)" if res.truncated else ""
    st.caption(f"{tbl.num_rows:,} rows × {tbl.num_columns} columns{more} in {res.seconds * 1000:.0f} ms")
    st.dataframe(common.frame(tbl), hide_index=True, width="stretch")
    if tbl.num_columns == 2 and tbl.num_rows:
        sql_chart(tbl)
    buf = pa.BufferOutputStream()
    pcsv.write_csv(tbl, buf)
    st.download_button("Download CSV", buf.getvalue().to_pybytes(), file_name="query.csv", mime="text/csv",
                       icon=":material/download:")


if common.need_data(h) is not None:
    queries.warm_sql(h)  # the SQL box's snapshot, made while the charts draw and the query is typed
    try:
        charts(common.token_stats(h))
    except (CatalogMissing, duckdb.Error) as e:
        common.show_error(e)
    st.divider()
    sql_box()
