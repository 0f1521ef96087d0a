"""LangPWT viewer: routes to one module per page under dashboards/pages/ with st.navigation.
Start with `langpwt dashboard`; every page reads the catalog of $LANGPWT_HOME read-only and briefly."""
from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

# `streamlit run dashboards/streamlit_app.py` from a checkout that was not pip-installed
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dashboards.common import home  # noqa: E402

HERE = Path(__file__).parent
PAGES = [
    st.Page(HERE / "pages" / "pipeline.py", title="Pipeline", icon=":material/conveyor_belt:",
            url_path="pipeline", default=True),
    st.Page(HERE / "pages" / "token_stats.py", title="Token stats", icon=":material/bar_chart:",
            url_path="tokens"),
    st.Page(HERE / "pages" / "training.py", title="Training", icon=":material/show_chart:",
            url_path="training"),
    st.Page(HERE / "pages" / "checkpoints.py", title="Checkpoints", icon=":material/save:",
            url_path="checkpoints"),
    st.Page(HERE / "pages" / "playground.py", title="Playground", icon=":material/edit_note:",
            url_path="playground"),
]

st.set_page_config(page_title="LangPWT", page_icon=":material/school:", layout="wide")
page = st.navigation(PAGES)
with st.sidebar:
    st.caption(f"home: `{home().root}`")
page.run()
