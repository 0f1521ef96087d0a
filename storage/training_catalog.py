"""Catalog rows for training: runs, per-step metrics, checkpoints, samples; and the shard list to train on.
Written only by the parent process in short batched transactions, so a held lock can delay the
catalog's view of a run by seconds but never stalls a training step."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow as pa

from storage import catalog
from storage.catalog import utcnow
from storage.paths import Home

METRIC_COLUMNS = ["run_id", "step", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu",
                  "memory_gb", "tokens", "elapsed_s", "val_bpb"]
METRIC_TYPES = [pa.string(), pa.int32()] + [pa.float64()] * 7 + [pa.int64(), pa.float64(), pa.float64()]
METRIC_SCHEMA = pa.schema(list(zip(METRIC_COLUMNS, METRIC_TYPES)))



def train_shards(home: Home, tokenizer_sha256: str | None = None) -> dict[str, list[str]]:
    """Finished shards per split, from the catalog; a glob of HOME/shards when there is no catalog.

    Shards of another tokenizer than `tokenizer_sha256` (done, or stale since it replaced theirs) are
    refused in one line rather than left out: a model must not train on a silently smaller set."""
    if not home.catalog.exists():
        return {s: [str(p) for p in sorted(home.shards.glob(f"shard_*.{s}.bin"))] for s in ("train", "val")}
    rows = catalog.query_rows(home, "SELECT shard_id, split, path, tokenizer_sha256, status FROM shards "
                                    "WHERE status IN ('done', 'stale') AND n_tokens > 0 ORDER BY shard_id, split")
    other = sorted({r[0] for r in rows if tokenizer_sha256 and r[3] not in (None, tokenizer_sha256)})
    if other:
        ids = ", ".join(f"{i:06d}" for i in other[:5]) + (", ..." if len(other) > 5 else "")
        raise ValueError(f"{home.catalog}: {len(other)} shard(s) ({ids}) were built with another tokenizer than "
                         f"{home.tokenizer} ({tokenizer_sha256[:12]}); run `langpwt tokenize` to rebuild them")
    out: dict[str, list[str]] = {"train": [], "val": []}
    for _, split, path, _, status in rows:
        if split in out and status == "done":
            out[split].append(path)
    return out


def start_run(home: Home, run_id: str, preset: str, config: dict, device: str, flow_run_id: str | None,
              resume_step: int | None = None) -> None:
    """A `running` row; on resume, metrics past the checkpoint (a failed attempt's) are dropped."""
    with catalog.writer(home) as con:
        if resume_step is not None:
            con.execute("DELETE FROM metrics WHERE run_id = ? AND step > ?", [run_id, resume_step])
        if resume_step is not None and con.execute("SELECT 1 FROM runs WHERE run_id = ?", [run_id]).fetchone():
            con.execute("UPDATE runs SET status = 'running', finished_at = NULL, error = NULL, flow_run_id = ?, "
                        "config = ? WHERE run_id = ?", [flow_run_id, json.dumps(config), run_id])
            return
        con.execute("DELETE FROM runs WHERE run_id = ?", [run_id])
        con.execute("INSERT INTO runs (run_id, preset, config, status, started_at, flow_run_id, device) "
                    "VALUES (?, ?, ?, 'running', ?, ?, ?)",
                    [run_id, preset, json.dumps(config, sort_keys=True), utcnow(), flow_run_id, device])


def finish_run(home: Home, run_id: str, status: str, error: str | None = None, device: str | None = None) -> None:
    with catalog.writer(home) as con:
        con.execute("UPDATE runs SET status = ?, error = ?, finished_at = ?, device = coalesce(?, device) "
                    "WHERE run_id = ?", [status, error, utcnow(), device, run_id])


def upsert_metrics(home: Home, run_id: str, rows: list[dict]) -> int:
    """Step rows replace earlier ones of the same step (a resumed run redoes steps); eval rows (val loss and
    bpb) update their step. One transaction for the whole batch."""
    train = [dict({c: r.get(c) for c in METRIC_COLUMNS}, run_id=run_id) for r in rows if "train_loss" in r]
    vals = {r["step"]: (r["val_loss"], r.get("val_bpb")) for r in rows if "val_loss" in r and "train_loss" not in r}
    for r in train:
        r["val_loss"], r["val_bpb"] = vals.pop(r["step"], (r.get("val_loss"), r.get("val_bpb")))
    tr = pa.Table.from_pylist(train, schema=METRIC_SCHEMA)  # noqa: F841 (read by DuckDB)
    va = pa.table({"step": pa.array(list(vals), pa.int32()),  # noqa: F841
                   "val_loss": pa.array([v[0] for v in vals.values()], pa.float64()),
                   "val_bpb": pa.array([v[1] for v in vals.values()], pa.float64())})
    with catalog.writer(home) as con:
        if train:
            con.execute("DELETE FROM metrics WHERE run_id = ? AND step IN (SELECT step FROM tr)", [run_id])
            con.execute("INSERT INTO metrics BY NAME SELECT * FROM tr")
        if vals:
            con.execute("UPDATE metrics SET val_loss = va.val_loss, val_bpb = va.val_bpb FROM va "
                        "WHERE metrics.run_id = ? AND metrics.step = va.step", [run_id])
    return len(train)


def add_checkpoint(home: Home, run_id: str, info: dict, flow_run_id: str | None, removed: list[int]) -> None:
    with catalog.writer(home) as con:
        con.execute("DELETE FROM checkpoints WHERE run_id = ? AND (step = ? OR list_contains(?, step))",
                    [run_id, info["step"], removed])
        con.execute("INSERT INTO checkpoints (run_id, step, path, val_loss, sha256, size_bytes, created_at, "
                    "flow_run_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [run_id, info["step"], info["path"], info.get("val_loss"), info["sha256"], info["size_bytes"],
                     dt.datetime.fromisoformat(info["created_at"]).replace(tzinfo=None), flow_run_id])


def add_samples(home: Home, run_id: str, rows: list[dict]) -> None:
    if not rows:
        return
    tbl = pa.Table.from_pylist([{"run_id": run_id, "step": r["step"], "prompt": r["prompt"],  # noqa: F841
                                 "text": r["text"]} for r in rows])
    with catalog.writer(home) as con:
        con.execute("DELETE FROM samples WHERE run_id = ? AND step IN (SELECT step FROM tbl)", [run_id])
        con.execute("INSERT INTO samples BY NAME SELECT * FROM tbl")


def metrics(home: Home, run_id: str) -> pa.Table:
    return catalog.query(home, "SELECT * FROM metrics WHERE run_id = ? ORDER BY step", [run_id])


class JsonlTail:
    """New complete lines of a growing JSONL file since the last call (a partial last line waits)."""

    def __init__(self, path: Path):
        self.path, self.offset = Path(path), 0

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        return [json.loads(line) for line in data[:end].splitlines() if line.strip()]


def _last_per_step(path: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(train rows, eval rows) of a run's metrics.jsonl by step, the last line of a step winning (a resumed
    run redoes the steps after its checkpoint)."""
    train: dict[int, dict] = {}
    val: dict[int, dict] = {}
    for r in JsonlTail(path).read():
        if "train_loss" in r:
            train[r["step"]] = r
        elif "val_loss" in r:
            val[r["step"]] = r
    return train, val


def _missing_metrics(home: Home, run_id: str, train: dict[int, dict], val: dict[int, dict]) -> list[dict]:
    rows = catalog.query_rows(home, "SELECT step, val_loss FROM metrics WHERE run_id = ?", [run_id])
    steps, vals = {r[0] for r in rows}, {r[0] for r in rows if r[1] is not None}
    missing = [r for s, r in train.items() if s not in steps]
    return missing + [v for s, v in val.items() if s not in vals and (s in steps or s in train)]


def _reconcile_run(home: Home, run: Path, known_runs: set[str]) -> dict[str, int]:
    from storage import checkpoints as ckpts

    run_id, added = run.name, {"runs": 0, "checkpoints": 0, "metrics": 0}
    infos = ckpts.list_complete(run / ckpts.CKPT_DIR)
    train, val = _last_per_step(run / "metrics.jsonl")
    if not infos and not train:
        return added  # a run that never trained (refused at start): no row for work not done
    if run_id not in known_runs:
        cfg = json.loads((run / "config.json").read_text()).get("train", {}) if (run / "config.json").is_file() else {}
        with catalog.writer(home) as con:
            con.execute("INSERT INTO runs (run_id, preset, config, status, started_at, error) "
                        "VALUES (?, ?, ?, 'interrupted', ?, ?)",
                        [run_id, cfg.get("preset"), json.dumps(cfg, sort_keys=True), utcnow(),
                         "rebuilt from the run folder: its flow ended before recording it"])
        added["runs"] = 1
    have = {r[0] for r in catalog.query_rows(home, "SELECT step FROM checkpoints WHERE run_id = ?", [run_id])}
    for info in infos:
        if info.step not in have:
            add_checkpoint(home, run_id, info.to_dict(), None, [])
            added["checkpoints"] += 1
    missing = _missing_metrics(home, run_id, train, val)
    if missing:
        upsert_metrics(home, run_id, missing)
        added["metrics"] = sum(1 for r in missing if "train_loss" in r)
    return added


def reconcile_runs(home: Home) -> dict[str, int]:
    """Rows for what run folders hold and the catalog lacks: a run, its complete checkpoints, its metrics rows
    (a flow killed, or cut off while the catalog was locked, leaves them only on disk). Idempotent: rows
    already there are kept as they are; returns how many rows of each kind were added."""
    total = {"runs": 0, "checkpoints": 0, "metrics": 0}
    if not home.runs.is_dir():
        return total
    try:
        known = {r[0] for r in catalog.query_rows(home, "SELECT run_id FROM runs")}
    except catalog.CatalogMissing:
        known = set()
    for run in sorted(p for p in home.runs.iterdir() if p.is_dir()):
        for k, v in _reconcile_run(home, run, known).items():
            total[k] += v
    return total
