"""The scale benchmark's generator: sample-10BT's schema and shape, the same bytes twice, and exactly
the cross-file duplicates it plants (no other repeated id or text), on real paragraphs of the bundled sample."""
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, SCHEMA

sys.path.insert(0, str(ROOT / "benchmarks"))
import scale_corpus as sc  # noqa: E402

SPEC = sc.Spec(docs_per_file=300, row_group=128)


@pytest.fixture(scope="module")
def pool() -> pa.Array:
    return pa.array(sc.paragraphs(sc.sample_texts()))


def _generate(pool, out: Path, n_files: int = 2) -> list[Path]:
    return [sc.write_file(out, pool, SPEC, i)[0] for i in range(n_files)]


def test_files_have_the_subsets_schema_and_shape(pool, tmp_path):
    files = _generate(pool, tmp_path)
    assert [f.name for f in files] == ["000_00000.parquet", "001_00000.parquet"]
    for f in files:
        meta = pq.ParquetFile(f).metadata
        assert meta.num_rows == 300 and meta.num_row_groups == 3
        assert meta.row_group(0).column(0).compression == "SNAPPY"
    t = pa.concat_tables([pq.read_table(f) for f in files])
    assert t.schema.equals(SCHEMA)
    assert pc.min(t["int_score"]).as_py() >= 3 and pc.max(t["int_score"]).as_py() <= 5
    # int_score is the rounded score, as in FineWeb-Edu
    assert (np.clip(np.rint(t["score"].to_numpy()), 3, 5) == t["int_score"].to_numpy()).all()
    assert set(t["language"].to_pylist()) == {"en"} and set(t["dump"].to_pylist()) <= set(sc.DUMPS)
    assert all(u.startswith("https://www.") for u in t["url"].to_pylist())
    n = pc.binary_length(t["text"]).to_numpy()
    assert 2000 <= np.median(n) <= 4500          # FineWeb-Edu's median document is ~3 kB
    assert n.max() <= SPEC.max_bytes + 10_000 and n.min() >= 100
    assert np.percentile(n, 95) > 2.5 * np.median(n)  # a long tail, not a fixed length


def test_same_arguments_same_bytes(pool, tmp_path):
    a = _generate(pool, tmp_path / "a")
    b = _generate(pool, tmp_path / "b")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    other = sc.write_file(tmp_path / "c", pool, sc.Spec(docs_per_file=300, row_group=128, seed=1), 0)[0]
    assert other.read_bytes() != a[0].read_bytes()


def test_only_the_planted_duplicates_repeat(pool, tmp_path):
    f0, f1 = (pl.read_parquet(p).with_columns(pl.lit(i).alias("file"))
              for i, p in enumerate(_generate(pool, tmp_path)))
    n = SPEC.n_dups(1)
    assert n == 2 and SPEC.n_dups(0) == 0
    same_id = f1.join(f0, on="id", suffix="_0")
    assert same_id.height == n // 2
    for c in SCHEMA.names[:1] + SCHEMA.names[2:]:  # the whole row again
        assert (same_id[c] == same_id[f"{c}_0"]).all(), c
    same_text = f1.join(f0, on="text", suffix="_0")
    assert same_text.height == n and same_text.filter(pl.col("id") != pl.col("id_0")).height == n - n // 2
    both = pl.concat([f0, f1])
    assert both["text"].n_unique() == both.height - n and both["id"].n_unique() == both.height - n // 2
    # duplicates are copies of the previous file's head and land after this file's head
    rows = f1.with_row_index("row").join(f0, on="text", how="semi")["row"].to_list()
    assert min(rows) >= SPEC.head()
    assert sc.expected_counts(SPEC, 2) == dict(docs=600, planted_dups=n, kept=600 - n)


def test_too_few_documents_for_the_duplicates_is_refused(pool, tmp_path):
    with pytest.raises(ValueError, match="--docs-per-file 3"):
        sc.write_file(tmp_path, pool, sc.Spec(docs_per_file=3), 1)
    assert not list(tmp_path.iterdir())  # nothing left under a final or temp name
