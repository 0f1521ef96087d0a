"""Playground page (the original LangPWT's UI): pick a checkpoint, prompt it, watch the text stream in.
The model stays loaded per checkpoint (keyed by sha256): only the first generation pays for torch and weights."""
from __future__ import annotations

from pathlib import Path

import duckdb
import streamlit as st

from dashboards import common, generation
from storage.catalog import CatalogMissing
from storage.checkpoints import MARKER

st.title("Playground")
h = common.home()


@st.cache_resource(max_entries=2, show_spinner="loading the checkpoint…")
def _model(step_dir: str, sha256: str, tokenizer: str):
    return generation.load(Path(step_dir), Path(tokenizer))


def _md(text: str) -> str:
    return "".join(generation.markdown_literal([text]))


def controls(rows: list[dict]) -> dict | None:
    labels = [f"{r['run_id']} · step {r['step']}"
              + (f" · val {r['val_loss']:.3f}" if r["val_loss"] is not None else "") for r in rows]
    with st.form("generate"):
        i = st.selectbox("Checkpoint", range(len(rows)), format_func=lambda k: labels[k], key="pg_ckpt")
        prompt = st.text_area("Prompt", "The history of", height=90, key="pg_prompt")
        c = st.columns(5)
        temperature = c[0].slider("Temperature", 0.0, 2.0, 0.8, 0.05, key="pg_temp",
                                  help="0 picks the most likely token every time")
        top_k = c[1].number_input("Top-k", 0, 5000, 50, key="pg_topk", help="0: no limit")
        top_p = c[2].slider("Top-p", 0.05, 1.0, 1.0, 0.05, key="pg_topp", help="1.0: no nucleus cut")
        length = c[3].number_input("Length (tokens)", 1, 2048, 120, key="pg_len")
        seed = c[4].number_input("Seed", 0, 2**31 - 1, 0, key="pg_seed", help="same seed, same text")
        go = st.form_submit_button("Generate", type="primary", icon=":material/play_arrow:")
    if not go:
        return None
    return dict(row=rows[i], prompt=prompt, temperature=temperature, top_k=int(top_k), top_p=top_p,
                length=int(length), seed=int(seed))


def run(req: dict) -> None:
    row = req["row"]
    try:
        m = _model(row["path"], row["sha256"], str(h.tokenizer))
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        st.error(f"Cannot load {row['path']}: {str(e).splitlines()[0]}")
        return
    st.caption(generation.describe(m))
    with st.container(border=True, key="pg_output"):
        st.markdown(f"**{_md(req['prompt'])}**" if req["prompt"] else "*(no prompt: a new document)*")
        pieces = generation.stream(m, req["prompt"], req["length"], req["temperature"], req["top_k"],
                                   req["top_p"], req["seed"])
        text = st.write_stream(generation.markdown_literal(pieces))
    st.session_state["pg_last"] = dict(prompt=req["prompt"], text=text)


def complete_rows() -> list[dict] | None:
    try:
        tbl = common.checkpoints(h)
    except (CatalogMissing, duckdb.Error) as e:
        common.show_error(e)
        return None
    # a pruned checkpoint keeps no weights: offer only those still complete on disk
    rows = [r for r in tbl.to_pylist() if r["path"] and (Path(r["path"]) / MARKER).is_file()]
    if not rows:
        st.info("No checkpoint to try yet: run")
        st.code(common.TRAIN_HINT, language="bash")
        return None
    if not h.tokenizer.exists():
        st.warning(f"No tokenizer at {h.tokenizer}: run `{common.PREPARE_HINT}` first.")
        return None
    return rows


if common.need_catalog(h) is not None:
    rows = complete_rows()
    if rows:
        req = controls(rows)
        if req is not None:
            run(req)
        elif "pg_last" in st.session_state:
            last = st.session_state["pg_last"]
            with st.container(border=True, key="pg_output"):
                st.markdown(f"**{_md(last['prompt'])}**" if last["prompt"] else "")
                st.markdown(last["text"] if isinstance(last["text"], str) else "".join(map(str, last["text"])))
