"""The flow's catalog writes are batched: rows at most every `every_s` while a run goes on, all at the end."""
from tasks.record import ShardRecorder
from flows.tokenize import TokenizeParams, tokenize
from storage import catalog
from tasks.tokenize import ShardCounts


def _ids(home) -> list[int]:
    try:
        return [r[0] for r in catalog.query_rows(home, "SELECT DISTINCT shard_id FROM shards ORDER BY 1")]
    except catalog.CatalogMissing:
        return []


def test_rows_wait_for_the_interval_and_all_land_at_the_end(prefect_api, home, sample_source, tmp_path):
    out = tokenize(TokenizeParams(source=str(sample_source), vocab_size=4096))
    assert out["built"] == 2
    docs = catalog.query_rows(home, "SELECT count(*) FROM documents")[0][0]
    home.catalog.unlink()  # the shards and their sidecars stay: record them again through the recorder
    tok = dict(sha256="ab" * 32, path=str(home.tokenizer), vocab_size=4096, origin="trained", config={})

    slow = ShardRecorder(home, {}, None, every_s=3600)
    slow.tokenizer = tok
    slow.finished(None, ShardCounts(0, "000_00000.parquet", "done"))
    slow.flush()
    assert _ids(home) == []  # not due yet: nothing written
    slow.finished(None, ShardCounts(1, "001_00000.parquet", "done"))
    slow.flush(block=True)  # the end of the run: everything, in one go
    assert _ids(home) == [0, 1] and len(slow.results) == 2
    assert catalog.query_rows(home, "SELECT count(*) FROM documents")[0][0] == docs
    assert catalog.query_rows(home, "SELECT sha256 FROM tokenizers") == [("ab" * 32,)]

    home.catalog.unlink()
    eager = ShardRecorder(home, {}, None, every_s=0)
    eager.finished(None, ShardCounts(1, "001_00000.parquet", "done"))
    eager.flush()
    assert _ids(home) == [1]  # due at once: written without waiting for the end
