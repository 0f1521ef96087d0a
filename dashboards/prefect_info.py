"""Links into the Prefect UI and a flow run's state and artifacts, for the Checkpoints page.
Asks the API only when PREFECT_API_URL is set (never starts a temporary server), with a short timeout."""
from __future__ import annotations

import os
import uuid


def ui_url() -> str | None:
    url = os.environ.get("PREFECT_UI_URL", "").strip().rstrip("/")
    return url or None


def flow_run_url(flow_run_id: str | None) -> str | None:
    base = ui_url()
    if not base or not flow_run_id:
        return None
    return f"{base}/runs/flow-run/{flow_run_id}"


def artifact_url(key: str | None, flow_run_id: str | None) -> str | None:
    """Keyed artifacts have a page of their own; others show on their flow run's page."""
    base = ui_url()
    if not base:
        return None
    if key:
        return f"{base}/artifacts/key/{key}"
    return flow_run_url(flow_run_id)


def api_configured() -> bool:
    return bool(os.environ.get("PREFECT_API_URL", "").strip())


def flow_run_details(flow_run_id: str, timeout_s: float = 5.0) -> dict:
    """{name, flow, state, start, end, artifacts: [{key, type, description, url}]} from the API.
    Raises RuntimeError with a one-line reason when the API is not set or cannot answer."""
    if not api_configured():
        raise RuntimeError("PREFECT_API_URL is not set: start the dashboard with it to list artifacts")
    try:
        run_uuid = uuid.UUID(str(flow_run_id))
    except ValueError:
        raise RuntimeError(f"{flow_run_id!r} is not a Prefect flow run id") from None
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    try:
        with get_client(sync_client=True, httpx_settings={"timeout": timeout_s}) as client:
            run = client.read_flow_run(run_uuid)
            flow = client.read_flow(run.flow_id)
            arts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_uuid])))
    except Exception as e:  # any transport or API error: the page shows it in one line
        raise RuntimeError(f"Prefect API: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return dict(
        name=run.name, flow=flow.name, state=run.state.name if run.state else None,
        start=run.start_time, end=run.end_time,
        artifacts=[dict(key=a.key, type=a.type, description=a.description,
                        url=artifact_url(a.key, flow_run_id)) for a in arts])
