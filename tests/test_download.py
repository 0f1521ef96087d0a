"""Downloading from a fake Hub on 127.0.0.1 that speaks the real endpoints: clean, resumed, rate-limited,
corrupt, short of disk; the real huggingface_hub client code runs end to end, nothing is mocked."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from storage import catalog
from storage.hub import DiskSpaceError, Hub, HubFile, part_path
from tasks.download import DownloadError, DownloadParams, download, fetch_file, plan_download, record_fetch
from tests.fakehub import Fault, FakeHub

BIG = "sample/10BT/004_00000.parquet"
TEN = [f"sample/10BT/{i:03d}_00000.parquet" for i in range(5)]


pytestmark = pytest.mark.usefixtures("hf_isolated")


@pytest.fixture
def hub(tree):
    with FakeHub(tree, page_size=2) as h:  # 2 per page: the listing must follow pagination
        yield h


def params(hub: FakeHub, **kw) -> DownloadParams:
    base = dict(endpoint=hub.endpoint, backoff_s=0.02, retries=3, progress=False, min_free_bytes=0)
    return DownloadParams(**{**base, **kw})


def rows(home) -> dict[str, dict]:
    t = catalog.query(home, "SELECT * FROM source_files").to_pylist()
    return {r["file"]: r for r in t}


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_clean_download_of_a_subset_pins_the_commit_and_records_each_file(home, hub, tree):
    got = download(home, params(hub, token="hf_secret_test"))
    assert [s.file for s in got] == TEN and [s.position for s in got] == list(range(5))
    for s in got:
        assert Path(s.path) == home.raw / s.file
        assert Path(s.path).read_bytes() == tree[s.file].read_bytes()
        assert s.sha256 == sha(tree[s.file])
        assert pq.ParquetFile(s.path).metadata.num_rows > 0
    assert not list(home.raw.rglob("*.part"))
    cat = rows(home)
    assert set(cat) == set(TEN)  # exact pattern: nothing of sample/100BT, the crawl or the README
    for f, r in cat.items():
        assert (r["status"], r["revision"], r["dataset"]) == ("verified", hub.sha, "HuggingFaceFW/fineweb-edu")
        assert r["url"] == f"{hub.endpoint}/datasets/HuggingFaceFW/fineweb-edu/resolve/{hub.sha}/{f}"
        assert r["downloaded_at"] is not None and r["seconds"] >= 0 and r["error"] is None
    resolves = [h for h in hub.hits() if "/resolve/" in h.url]
    assert resolves and all(f"/resolve/{hub.sha}/" in h.url for h in resolves)  # pinned, never `main`
    assert len(hub.hits(method="GET", body=False)) and len([h for h in hub.hits() if "/tree/" in h.url]) == 3
    assert {h.file for h in hub.hits(body=True)} == set(TEN)
    assert all(h.auth for h in resolves) and not any(h.auth for h in hub.hits(body=True))  # token stays on the Hub

    before = len(hub.hits(body=True))
    again = download(home, params(hub))
    assert again == got and len(hub.hits(body=True)) == before  # a rerun fetches no byte


def test_crawl_subset_include_and_max_files_select_exact_paths(home, hub):
    crawl = download(home, params(hub, subset="CC-MAIN-2024-10"))
    assert [s.file for s in crawl] == ["data/CC-MAIN-2024-10/000_00000.parquet"]
    picked = download(home, params(hub, include="sample/10BT/00[13]_*"))
    assert [(s.file, s.position) for s in picked] == [(TEN[1], 1), (TEN[3], 3)]  # shard ids from the full list
    assert [s.file for s in download(home, params(hub, max_files=2))] == TEN[:2]
    with pytest.raises(ValueError, match="--subset sample-7BT"):
        params(hub, subset="sample-7BT")


def test_dropped_connection_resumes_from_the_bytes_on_disk(home, hub, tree):
    size = tree[BIG].stat().st_size
    hub.faults[BIG] = Fault(drop_after=1_000_000)
    got = download(home, params(hub, include=BIG))
    assert Path(got[0].path).read_bytes() == tree[BIG].read_bytes()
    gets = hub.hits(BIG, "GET", body=True)
    assert [(h.range, h.bytes_sent) for h in gets] == [(None, 1_000_000), ("bytes=1000000-", size - 1_000_000)]
    assert hub.bytes_served(BIG) == size  # not one byte fetched twice


def test_a_wrong_prefix_left_on_disk_is_detected_and_refetched_from_zero(home, hub, tree):
    size = tree[BIG].stat().st_size
    part = part_path(home.raw / BIG)
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * 1000)  # e.g. a power cut that kept the length but not the bytes
    got = download(home, params(hub, include=BIG))
    assert sha(Path(got[0].path)) == sha(tree[BIG])
    assert [(h.range, h.bytes_sent) for h in hub.hits(BIG, "GET", body=True)] == [
        ("bytes=1000-", size - 1000), (None, size)]


@pytest.mark.parametrize("headers", [
    {"RateLimit": '"resolvers";r=0;t=1', "RateLimit-Policy": '"fixed window";"resolvers";q=3000;w=300'},
    {"Retry-After": "1"}], ids=["ratelimit-header", "retry-after"])
def test_429_waits_for_the_reset_the_hub_announces(home, hub, headers):
    f = TEN[1]
    hub.faults[f] = Fault(statuses=[429], status_headers=headers)
    got = download(home, params(hub, include=f, backoff_s=0.01))  # own backoff alone would wait ~10 ms
    assert got[0].file == f and rows(home)[f]["status"] == "verified"
    gets = [h for h in hub.hits(f, "GET") if "/resolve/" in h.url]
    assert [h.status for h in gets] == [429, 302]
    assert gets[1].t0 - gets[0].t1 >= 1.0


def test_bytes_that_do_not_match_the_sha256_are_rejected_and_never_listed(home, hub):
    bad = TEN[2]
    hub.faults[bad] = Fault(corrupt=True)
    with pytest.raises(DownloadError, match=rf"{bad}: sha256 .* does not match the Hub's"):
        download(home, params(hub, max_files=3))
    assert not (home.raw / bad).exists() and not part_path(home.raw / bad).exists()
    cat = rows(home)
    assert cat[bad]["status"] == "failed" and "sha256" in cat[bad]["error"]
    assert [cat[f]["status"] for f in TEN[:2]] == ["verified", "verified"]  # the others complete
    del hub.faults[bad]
    assert [s.file for s in download(home, params(hub, max_files=3))] == TEN[:3]  # and a rerun repairs it
    assert rows(home)[bad]["status"] == "verified"


def test_persistent_500_gives_up_with_one_line_and_no_final_file(home, hub):
    bad = TEN[1]
    hub.faults[bad] = Fault(always_status=500)
    with pytest.raises(DownloadError) as e:
        download(home, params(hub, max_files=2, retries=2))
    msg = str(e.value)
    assert "\n" not in msg and bad in msg and "HTTP 500" in msg and "gave up after 3 attempts" in msg
    assert len([h for h in hub.hits(bad, "GET") if "/resolve/" in h.url]) == 3
    assert not (home.raw / bad).exists() and not part_path(home.raw / bad).exists()
    assert rows(home)[bad]["status"] == "failed" and (home.raw / TEN[0]).exists()


def test_disk_shortfall_is_found_before_any_byte_is_fetched(home, hub, tree):
    free = shutil.disk_usage(home.root.parent).free
    with pytest.raises(DiskSpaceError, match=r"not enough disk space: .* reserve \(--min-free\)"):
        download(home, params(hub, min_free_bytes=free + 10**12))
    assert not [h for h in hub.hits() if "/resolve/" in h.url or h.served]
    assert not home.catalog.exists() or not rows(home)  # no row claims anything


def test_disk_shortfall_on_a_small_filesystem(tmp_path, hub, tree, monkeypatch):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        from storage.paths import Home
        home = Home.from_env(mnt / "home")
        with pytest.raises(DiskSpaceError, match=str(home.raw)):
            download(home, params(hub, include=BIG))  # 4.5 MB into 2 MB, with no reserve at all
        assert not [h for h in hub.hits() if "/resolve/" in h.url or h.served]
        assert [s.file for s in download(home, params(hub, max_files=2))] == TEN[:2]  # what fits, fits
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_concurrency_is_bounded_by_workers(home, hub):
    for f in TEN[:4]:
        hub.faults[f] = Fault(rate=400_000)
    download(home, params(hub, max_files=4, workers=2))
    spans = [(h.t0, h.t1) for h in hub.hits(body=True)]
    peak = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
    assert peak == 2


def test_a_file_kept_in_git_is_verified_by_its_blob_sha1(tmp_path, hub, tree):
    e = hub.entries["README.md"]
    h = Hub("HuggingFaceFW/fineweb-edu", hub.endpoint, retries=1, backoff_s=0.01)
    dest = tmp_path / "README.md"
    assert h.fetch(hub.sha, HubFile("README.md", e.size, None, e.blob_oid), dest) == sha(tree["README.md"])
    with pytest.raises(Exception, match="git sha1"):
        h.fetch(hub.sha, HubFile("README.md", e.size, None, "0" * 40), tmp_path / "other.md")
    assert not (tmp_path / "other.md").exists()


def test_an_unrecorded_final_file_is_hashed_not_refetched(home, hub, tree):
    plan = plan_download(home, params(hub, max_files=1))
    dest = Path(plan.items[0].dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(tree[TEN[0]], dest)  # as if killed between the rename and the catalog write
    got = fetch_file(home, plan, plan.items[0], params(hub))
    assert got.source.sha256 == sha(tree[TEN[0]]) and not hub.hits(body=True)
    assert rows(home)[TEN[0]]["status"] == "pending"  # the task writes no catalog row: its caller does
    record_fetch(home, plan, plan.items[0], got)
    assert rows(home)[TEN[0]]["status"] == "verified"


def test_the_fake_hub_serves_huggingface_hub_own_downloaders(tmp_path, hub, tree):
    from huggingface_hub import hf_hub_download, snapshot_download

    p = hf_hub_download("HuggingFaceFW/fineweb-edu", TEN[0], repo_type="dataset", endpoint=hub.endpoint,
                        cache_dir=tmp_path / "c1")
    assert Path(p).read_bytes() == tree[TEN[0]].read_bytes()
    d = snapshot_download("HuggingFaceFW/fineweb-edu", repo_type="dataset", endpoint=hub.endpoint,
                          allow_patterns=["data/*/*.parquet", "*.md"], cache_dir=tmp_path / "c2")
    got = sorted(str(p.relative_to(d)) for p in Path(d).rglob("*") if p.is_file())
    assert got == ["README.md", "data/CC-MAIN-2024-10/000_00000.parquet"]
    assert os.path.getsize(Path(d) / "README.md") == tree["README.md"].stat().st_size


def test_two_downloaders_of_one_file_do_not_share_its_part(tmp_path, hub, tree):
    import fcntl

    e = hub.entries[TEN[0]]
    f = HubFile(TEN[0], e.size, e.sha256, e.blob_oid)
    dest = tmp_path / "x.parquet"
    with open(part_path(dest), "a+b") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as another process mid-download would
        with pytest.raises(Exception, match="another process is downloading it"):
            Hub("HuggingFaceFW/fineweb-edu", hub.endpoint).fetch(hub.sha, f, dest)
    assert not hub.hits(body=True) and not dest.exists()
