"""The catalog's `evals` table: one row per metric of a finished evaluation, with the identity of the data it read.
An evaluation's rows go in one transaction once it has completed, and redoing the same evaluation replaces them:
a reader never sees half an evaluation, at the price of keeping no history of identical reruns."""
from __future__ import annotations

import pyarrow as pa

from storage import catalog
from storage.catalog import utcnow
from storage.paths import Home

COLUMNS = [("run_id", pa.string()), ("step", pa.int32()), ("task", pa.string()), ("metric", pa.string()),
           ("value", pa.float64()), ("stderr", pa.float64()), ("n", pa.int64()), ("split_id", pa.string()),
           ("split_size", pa.int64()), ("checkpoint", pa.string()), ("device", pa.string()),
           ("seconds", pa.float64()), ("created_at", pa.timestamp("us"))]
SCHEMA = pa.schema(COLUMNS)


def rows(result: dict) -> list[dict]:
    """Catalog rows of one evaluation result (model.evaluate.run_bpb / model.hellaswag.run_hellaswag)."""
    now = utcnow()
    common = {k: result.get(k) for k in ("run_id", "step", "task", "split_id", "split_size", "checkpoint",
                                          "device", "seconds")}
    return [dict(common, metric=m["metric"], value=m["value"], stderr=m.get("stderr"), n=m["n"], created_at=now)
            for m in result["metrics"]]


def record(home: Home, result: dict) -> int:
    """Write an evaluation's rows, replacing those of the same evaluation (run, step, task, data, n)."""
    tbl = pa.Table.from_pylist(rows(result), schema=SCHEMA)  # noqa: F841 (read by DuckDB)
    with catalog.writer(home) as con:
        con.execute("DELETE FROM evals WHERE run_id IS NOT DISTINCT FROM ? AND step IS NOT DISTINCT FROM ? "
                    "AND task = ? AND split_id IS NOT DISTINCT FROM ? AND n IN (SELECT n FROM tbl)",
                    [result.get("run_id"), result.get("step"), result["task"], result.get("split_id")])
        con.execute("INSERT INTO evals BY NAME SELECT * FROM tbl")
    return len(result["metrics"])


def evals(home: Home, run_id: str | None = None) -> pa.Table:
    """Every evaluation row (of one run), oldest step first."""
    where, params = ("WHERE run_id = ?", [run_id]) if run_id else ("", [])
    return catalog.query(home, f"SELECT * FROM evals {where} ORDER BY run_id, step, task, metric", params)


def newest(home: Home, task: str | None = None) -> pa.Table:
    """The newest value of each (run, step, task, metric) over every data identity and n: one row per point a
    chart of evaluations over training steps draws."""
    where, params = ("WHERE task = ?", [task]) if task else ("", [])
    return catalog.query(home, f"SELECT * FROM evals {where} QUALIFY row_number() OVER (PARTITION BY run_id, step, "
                               f"task, metric ORDER BY created_at DESC) = 1 ORDER BY run_id, step, task, metric", params)


def table_rows(result: dict) -> list[dict]:
    """An evaluation as the rows of its Prefect table artifact."""
    return [{"metric": m["metric"], "value": round(m["value"], 6),
             "stderr": None if m.get("stderr") is None else round(m["stderr"], 6), "n": m["n"]}
            for m in result["metrics"]]
