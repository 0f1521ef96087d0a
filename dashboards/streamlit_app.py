"""LangPWT viewer: routes to one module per page (dashboards/page_*.py) with st.navigation.
Start it with `langpwt dashboard`; pages read $LANGPWT_HOME's catalog read-only, never holding it."""
from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

# `streamlit run dashboards/streamlit_app.py` from a checkout that was not pip-installed
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dashboards.common import home  # noqa: E402

# page_*.py files, not a pages/ folder: with one next to the main script, Streamlit runs a session's
# first script run the v1 multipage way and a deep link such as /tokens shows "Page not found"
HERE = Path(__file__).parent
PAGES = [
    st.Page(HERE / "page_pipeline.py", title="Pipeline", icon=":material/conveyor_belt:",
            default=True),  # the root URL
    st.Page(HERE / "page_token_stats.py", title="Token stats", icon=":material/bar_chart:",
            url_path="tokens"),
    st.Page(HERE / "page_training.py", title="Training", icon=":material/show_chart:",
            url_path="training"),
    st.Page(HERE / "page_checkpoints.py", title="Checkpoints", icon=":material/save:",
            url_path="checkpoints"),
    st.Page(HERE / "page_playground.py", title="Playground", icon=":material/edit_note:",
            url_path="playground"),
]

st.set_page_config(page_title="LangPWT", page_icon=":material/school:", layout="wide")
page = st.navigation(PAGES)
with st.sidebar:
    st.caption(f"home: `{home().root}`")
page.run()
