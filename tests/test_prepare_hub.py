"""`langpwt prepare` against a fake Hub: download and tokenize in one flow run, failures kept apart."""
import pytest

from storage import catalog
from storage.paths import Home
from tests.conftest import run_cli
from tests.fakehub import FakeHub, Fault

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("hf_isolated")]


def test_prepare_downloads_and_tokenizes_in_one_flow_run(prefect_api, tmp_path, tree):
    h = Home.from_env(tmp_path / "h")
    with FakeHub(tree) as hub:
        env = {"HF_ENDPOINT": hub.endpoint, "PREFECT_API_URL": prefect_api}
        p = run_cli("--home", str(h.root), "prepare", "--subset", "sample-10BT", "--max-files", "3",
                    "--vocab-size", "1024", "--min-free", "0", env=env)
        assert p.returncode == 0, p.stderr
        files = catalog.query_rows(h, "SELECT file, status, revision FROM source_files ORDER BY position")
        assert [f[0] for f in files] == [f"sample/10BT/{i:03d}_00000.parquet" for i in range(3)]
        assert {f[1] for f in files} == {"verified"} and len({f[2] for f in files}) == 1
        shards = catalog.query_rows(h, "SELECT shard_id, status, flow_run_id FROM shards WHERE split='train' "
                                       "ORDER BY shard_id")
        assert [(s[0], s[1]) for s in shards] == [(0, "done"), (1, "done"), (2, "done")]
        runs = catalog.query_rows(h, "SELECT run_id, flow, status FROM pipeline_runs")
        assert len(runs) == 1 and runs[0][1:] == ("prepare", "completed")
        assert {s[2] for s in shards} == {runs[0][0]}  # the same flow run downloaded and tokenized
        for i in range(3):
            assert (h.raw / f"sample/10BT/{i:03d}_00000.parquet").read_bytes() == \
                tree[f"sample/10BT/{i:03d}_00000.parquet"].read_bytes()
        served = hub.bytes_served("sample/10BT/000_00000.parquet")
        # a rerun downloads nothing and rebuilds nothing
        again = run_cli("--home", str(h.root), "prepare", "--subset", "sample-10BT", "--max-files", "3",
                        "--vocab-size", "1024", "--min-free", "0", env=env)
        assert again.returncode == 0, again.stderr
        assert "0 shards built, 3 up to date" in again.stdout
        assert hub.bytes_served("sample/10BT/000_00000.parquet") == served
        # without --source, tokenize takes the downloaded files with their recorded positions
        redo = run_cli("--home", str(h.root), "tokenize", "--reprocess", "2", "--vocab-size", "1024", env=env)
        assert redo.returncode == 0, redo.stderr
        assert "1 shards built, 2 up to date" in redo.stdout


def test_prepare_never_tokenizes_a_file_that_fails_verification(prefect_api, tmp_path, tree):
    h = Home.from_env(tmp_path / "h")
    with FakeHub(tree) as hub:
        hub.faults["sample/10BT/001_00000.parquet"] = Fault(corrupt=True)
        env = {"HF_ENDPOINT": hub.endpoint, "PREFECT_API_URL": prefect_api}
        p = run_cli("--home", str(h.root), "prepare", "--subset", "sample-10BT", "--max-files", "3",
                    "--vocab-size", "1024", "--min-free", "0", "--retries", "0", env=env)
    assert p.returncode == 1
    assert "001_00000.parquet" in p.stderr and "sha256" in p.stderr
    st = dict(catalog.query_rows(h, "SELECT file, status FROM source_files"))
    assert st["sample/10BT/001_00000.parquet"] == "failed"
    assert not (h.raw / "sample/10BT/001_00000.parquet").exists()
    shards = dict(catalog.query_rows(h, "SELECT shard_id, any_value(status) FROM shards GROUP BY 1"))
    assert shards == {0: "done", 2: "done"}
    assert catalog.query_rows(h, "SELECT count(*) FROM documents WHERE source_file LIKE '%001_%'")[0][0] == 0


def test_a_file_that_lands_during_a_scan_is_scanned_at_once(prefect_api, tmp_path, tree, monkeypatch):
    """Two workers: file 1, downloaded while file 0 is being scanned, is scanned then, not after scan 0.
    Here scan 0 waits (up to 30 s) for scan 1 to begin: the flow must start it without waiting for scan 0."""
    import threading

    import tasks.stage as ft
    from flows.prepare import PrepareParams, prepare
    from tasks.tokenizer import TokenizerConfig, train_tokenizer
    from tests.conftest import sample_rows

    tok = tmp_path / "tokenizer.json"  # given, so each scan also encodes (tasks/stage.py)
    train_tokenizer((r["text"] for r in sample_rows()[:400]), tok, TokenizerConfig(vocab_size=1024))
    second_began, overlap = threading.Event(), {}
    stage_file = ft.stage_file

    def stage(home, src, cfg, path, sha):
        if src.shard_id == 1:
            second_began.set()
        else:
            overlap[src.shard_id] = second_began.wait(30)
        return stage_file(home, src, cfg, path, sha)

    monkeypatch.setattr(ft, "stage_file", stage)
    h = Home.from_env(tmp_path / "h")
    f1 = "sample/10BT/001_00000.parquet"
    with FakeHub(tree) as hub:
        hub.faults[f1] = Fault(rate=tree[f1].stat().st_size / 1.5)  # lands ~1.5 s in, while scan 0 runs
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        out = prepare(PrepareParams(home=str(h.root), subset="sample-10BT", max_files=2, tokenizer=str(tok),
                                    workers=2, min_free_bytes=0, retries=0))
    assert overlap == {0: True}
    assert out["built"] == 2 and not out["failed"]
    shards = catalog.query_rows(h, "SELECT shard_id, any_value(status) FROM shards GROUP BY 1 ORDER BY 1")
    assert shards == [(0, "done"), (1, "done")]
