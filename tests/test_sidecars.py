"""The documents sidecar streams (storage/sidecars.py): the same bytes however it is fed, its row groups written back
give its bytes again, nothing under the final name until commit, and a file's tokenizing holds no more of it in memory."""
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.sidecars import DocsWriter, row_groups
from tasks.tokenize import DOC_ARROW

ROOT = Path(__file__).resolve().parents[1]


def _docs(n: int) -> pa.Table:
    return pa.table({
        "doc_id": [f"<urn:uuid:{i:08d}>" for i in range(n)], "source_file": ["000_00000.parquet"] * n,
        "shard_id": pa.array([0] * n, pa.int32()), "split": [("train", "val", None)[i % 3] for i in range(n)],
        "dump": ["CC-MAIN-2024-10"] * n, "url": [f"https://site{i % 97}.org/page/{i}" for i in range(n)],
        "domain": [f"site{i % 97}.org" for i in range(n)], "int_score": [3 + i % 3 for i in range(n)],
        "language_score": [0.5 + (i % 50) / 100 for i in range(n)], "n_chars": list(range(n)),
        "n_tokens": [None if i % 3 == 2 else i // 4 for i in range(n)], "kept": [i % 3 != 2 for i in range(n)],
        "drop_reason": [None if i % 3 != 2 else "dup_id" for i in range(n)]}, schema=DOC_ARROW)


def _write(path: Path, table: pa.Table, batch: int, group_rows: int) -> bytes:
    w = DocsWriter(path, DOC_ARROW, group_rows=group_rows)
    for off in range(0, table.num_rows, batch):
        w.write(table.slice(off, batch))
    assert not path.exists()  # nothing under the final name before the commit
    w.commit()
    return path.read_bytes()


def test_streamed_sidecar_is_the_table_and_rewrites_to_the_same_bytes(tmp_path):
    t = _docs(10_000)
    a = _write(tmp_path / "a.parquet", t, 700, 2_000)
    assert _write(tmp_path / "again.parquet", t, 700, 2_000) == a  # deterministic
    assert pq.read_table(tmp_path / "a.parquet").equals(t)
    assert [g.num_rows for g in row_groups(tmp_path / "a.parquet")] == [2_100] * 4 + [1_600]
    w = DocsWriter(tmp_path / "b.parquet", DOC_ARROW, group_rows=2_000)
    for g in row_groups(tmp_path / "a.parquet"):  # what the dedup rewrite does
        w.write(g)
    w.commit()
    assert (tmp_path / "b.parquet").read_bytes() == a
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_abort_leaves_nothing_and_an_empty_commit_has_the_schema(tmp_path):
    w = DocsWriter(tmp_path / "x.parquet", DOC_ARROW, group_rows=10)
    w.write(_docs(25))
    w.abort()
    assert list(tmp_path.iterdir()) == []
    DocsWriter(tmp_path / "e.parquet", DOC_ARROW).commit()
    e = pq.read_table(tmp_path / "e.parquet")
    assert e.num_rows == 0 and e.schema.equals(DOC_ARROW)


# the child's own peak (getrusage's maxrss would carry the parent's over the exec), prepended to its script
HWM = r"""
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
"""
PREPARE = r"""
import sys
from pathlib import Path
import pyarrow as pa, pyarrow.parquet as pq
from storage.paths import Home
from storage.sources import list_local
from tasks.filter import FilterConfig
from tasks.scan import scan_file
from tasks.tokenizer import TokenizerConfig, train_tokenizer
root, n = Path(sys.argv[1]), int(sys.argv[2])
words = "the of a model data token shard train val index catalog parquet byte pair merge".split()
text = [" ".join(words[(i * 7 + k) % len(words)] for k in range(8)) + f" {i}" for i in range(n)]
(root / "src").mkdir(parents=True)
pq.write_table(pa.table({"id": [f"<urn:uuid:{i:09d}>" for i in range(n)], "text": text,
                         "dump": ["CC-MAIN-2024-10"] * n, "url": [f"https://example{i % 1000}.org/{'a' * 400}/{i}" for i in range(n)],
                         "int_score": [3] * n, "language_score": [0.9] * n}), root / "src" / "000_00000.parquet",
               row_group_size=10_000)  # FineWeb-Edu's files are read a row group at a time too
train_tokenizer(iter(text[:2000]), root / "tokenizer.json", TokenizerConfig(vocab_size=512))
scan_file(Home(root / "home").ensure(), list_local(root / "src")[0], FilterConfig(val_fraction=0.0))
"""
TOKENIZE = r"""
import json, sys
from pathlib import Path
from storage.paths import Home
from storage.sources import list_local
from tasks.filter import FilterConfig
from tasks.plan import plan_one
from tasks.tokenize import tokenize_file
from tasks.tokenizer import Encoder, file_sha256
root, n = Path(sys.argv[1]), int(sys.argv[2])
tok = root / "tokenizer.json"
home, cfg, sha = Home(root / "home"), FilterConfig(val_fraction=0.0), file_sha256(tok)
f = list_local(root / "src")[0]
_, job = plan_one(home, f, [], cfg, str(tok), sha, {})
enc = Encoder.cached(tok, sha)
before = hwm()
res = tokenize_file(home, job, enc)
assert res.status == "done" and res.kept == n, (res.status, res.error, res.kept)
print(json.dumps(dict(before_kb=before, after_kb=hwm())))
"""


def _child(script: str, *args: str) -> dict | None:
    """Run `script` (HWM's function defined first) in a fresh interpreter; its last stdout line as JSON."""
    import json
    out = subprocess.run([sys.executable, "-c", HWM + script, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else None


def _tokenize_peak_mb(tmp_path: Path, n: int) -> float:
    _child(PREPARE, str(tmp_path / str(n)), str(n))  # the scan's own peak stays in its process
    r = _child(TOKENIZE, str(tmp_path / str(n)), str(n))
    return (r["after_kb"] - r["before_kb"]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_tokenizing_a_file_holds_no_more_of_its_document_rows_in_memory(tmp_path):
    # 6x the rows, the same work a batch: the peak may grow by what is per row of the file (its dedup index,
    # ~200 bytes a row while computed; each document's offset) but not by its document rows (~450 bytes a row
    # here, with their 400-character urls; +2 x 300k x 450 B when they were all kept, then concatenated)
    small, large = _tokenize_peak_mb(tmp_path, 60_000), _tokenize_peak_mb(tmp_path, 360_000)
    assert large - small < 200, (small, large)


RECORD = r"""
import json, sys
from pathlib import Path
from storage.paths import Home
from storage.shard_catalog import record_shards
from storage import catalog
home = Home(Path(sys.argv[1]) / "home")
catalog.query_rows(home, "SELECT 1") if home.catalog.exists() else None
before = hwm()
record_shards(home, [(0, None)])
n = catalog.query_rows(home, "SELECT count(*) FROM documents WHERE shard_id = 0")[0][0]
print(json.dumps(dict(before_kb=before, after_kb=hwm(), rows=n)))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_recording_a_shard_streams_its_documents_into_the_catalog(tmp_path):
    n = 360_000
    _tokenize_peak_mb(tmp_path, n)  # a home with shard 0 and its sidecars (~160 MB of document rows as Arrow)
    r = _child(RECORD, str(tmp_path / str(n)))
    assert r["rows"] == n
    # DuckDB reads the sidecar a row group at a time and holds the new rows until the commit (~375 MB here);
    # loaded as Arrow first, the table and DuckDB's scan of it came on top (~750 MB)
    assert (r["after_kb"] - r["before_kb"]) / 1024 < 550, r
