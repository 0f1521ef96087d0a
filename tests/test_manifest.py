"""A local mirror checked against a manifest (sha256sum output or JSON): a file that differs, is missing
or is not listed is recorded failed and never tokenized, the others complete, the command exits non-zero."""
import hashlib
import json
import shutil

import pytest

from flows.tokenize import TokenizeParams, tokenize
from storage import catalog, sources
from tests.conftest import run_cli, sample_rows, write_parquet

VOCAB = 2048


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def mirror(tmp_path):
    """Four files laid out as the Hub names them, and their sha256sum manifest written from the parent
    folder (so names carry the `sample/10BT/` prefix the local paths do not)."""
    rows = sample_rows()
    d = tmp_path / "mirror" / "sample" / "10BT"
    for i in range(4):
        write_parquet(d / f"{i:03d}_00000.parquet", rows[i::4])
    sums = tmp_path / "SHA256SUMS"
    sums.write_text("".join(f"{_sha(p)}  sample/10BT/{p.name}\n" for p in sorted(d.glob("*.parquet"))))
    return d, sums


def test_manifest_formats(tmp_path):
    a, b = "a" * 64, "B" * 64
    sums = tmp_path / "SUMS"
    sums.write_text(f"# made by sha256sum\n{a}  ./x/000_00000.parquet\n{b} *001_00000.parquet\n\n")
    assert sources.read_manifest(sums) == {"x/000_00000.parquet": (a, None), "001_00000.parquet": (b.lower(), None)}
    # a saved Hub tree listing: directories skipped, sha256 and size from `lfs`, the git oid ignored
    hub = tmp_path / "tree.json"
    hub.write_text(json.dumps([{"type": "directory", "path": "sample/10BT"},
                               {"type": "file", "path": "sample/10BT/000_00000.parquet", "oid": "f" * 40,
                                "size": 7, "lfs": {"oid": a, "size": 7, "pointerSize": 133}}]))
    assert sources.read_manifest(hub) == {"sample/10BT/000_00000.parquet": (a, 7)}
    ours = tmp_path / "files.json"
    ours.write_text(json.dumps({"files": [{"file": "000_00000.parquet", "sha256": a, "size_bytes": 3}]}))
    assert sources.read_manifest(ours) == {"000_00000.parquet": (a, 3)}


@pytest.mark.parametrize("text,why", [
    ("not a sum line\n", "line 1: expected '<sha256>  <file>'"),
    (f"{'a' * 64}  x.parquet\n{'b' * 64}  x.parquet\n", "x.parquet is listed twice with different sha256"),
    ("# nothing\n", "lists no file"),
    ('[{"path": "x.parquet", "sha256": "abc"}]', "entry 0: no sha256"),
    ('[{"path": "x.parquet", "sha256": "' + "a" * 64 + '", "size": -1}]', "entry 0: size -1 is not a byte count"),
    ('{"files": 3}', "expected a list of objects"),
    ("[{", "not valid JSON"),
], ids=["bad-line", "twice", "empty", "short-sha", "bad-size", "not-a-list", "bad-json"])
def test_a_bad_manifest_is_one_line_naming_it(tmp_path, text, why):
    m = tmp_path / "m"
    m.write_text(text)
    with pytest.raises(ValueError) as e:
        sources.read_manifest(m)
    assert str(m) in str(e.value) and why in str(e.value) and "\n" not in str(e.value)


def test_list_verified_refuses_what_differs_and_keeps_positions(mirror, tmp_path):
    d, sums = mirror
    flipped = d / "001_00000.parquet"
    body = bytearray(flipped.read_bytes())
    body[len(body) // 2] ^= 0xFF  # same size, other bytes: only the sha256 can tell
    flipped.write_bytes(bytes(body))
    (d / "002_00000.parquet").unlink()  # listed, gone
    shutil.copy(d / "000_00000.parquet", d / "004_00000.parquet")  # here, not listed
    good, bad = sources.list_verified(d, sums)
    assert [(f.file, f.position) for f in good] == [("000_00000.parquet", 0), ("003_00000.parquet", 3)]
    why = {f.file: (f.position, w) for f, w in bad}
    assert set(why) == {"001_00000.parquet", "002_00000.parquet", "004_00000.parquet"}
    assert why["001_00000.parquet"][0] == 1 and "does not match --manifest" in why["001_00000.parquet"][1]
    assert why["002_00000.parquet"][0] == 2 and "listed in --manifest" in why["002_00000.parquet"][1]
    assert why["004_00000.parquet"][0] == 4 and "not listed in --manifest" in why["004_00000.parquet"][1]
    assert all(str(d / f) in w for f, (_, w) in why.items())
    # a size the manifest gives is checked too
    j = tmp_path / "sizes.json"
    j.write_text(json.dumps([{"path": f"sample/10BT/{p.name}", "sha256": _sha(p), "size": p.stat().st_size + 1}
                             for p in [d / "000_00000.parquet"]]))
    good, bad = sources.list_verified(d, j)
    assert not good and any("bytes, --manifest" in w and w.startswith(str(d / "000_00000.parquet"))
                            for _, w in bad)


def test_tokenize_builds_only_what_the_manifest_vouches_for(prefect_api, home, mirror):
    d, sums = mirror
    body = bytearray((d / "001_00000.parquet").read_bytes())
    body[-100] ^= 0x01
    (d / "001_00000.parquet").write_bytes(bytes(body))
    (d / "002_00000.parquet").unlink()
    params = TokenizeParams(source=str(d), manifest=str(sums), vocab_size=VOCAB)
    summary = tokenize(params)
    assert summary["built"] == 2 and set(summary["failed"]) == {"001_00000.parquet", "002_00000.parquet"}
    built = catalog.query_rows(home, "SELECT DISTINCT shard_id FROM shards WHERE status = 'done' ORDER BY 1")
    assert built == [(0,), (3,)]  # shard ids are the manifest's positions, not renumbered around the gaps
    assert sorted(p.name for p in home.shards.glob("*.bin")) == [
        "shard_000000.train.bin", "shard_000000.val.bin", "shard_000003.train.bin", "shard_000003.val.bin"]
    rows = dict(catalog.query_rows(home, "SELECT file, status FROM source_files"))
    assert rows == {"000_00000.parquet": "verified", "001_00000.parquet": "failed",
                    "002_00000.parquet": "failed", "003_00000.parquet": "verified"}
    errors = dict(catalog.query_rows(home, "SELECT file, error FROM source_files WHERE status = 'failed'"))
    assert "does not match --manifest" in errors["001_00000.parquet"]
    assert catalog.query_rows(home, "SELECT count(*) FROM documents WHERE source_file = '001_00000.parquet'") == [(0,)]
    # a rerun without --source takes the last run's source and manifest: the refused file stays refused
    again = tokenize(TokenizeParams(vocab_size=VOCAB))
    assert again["built"] == 0 and set(again["failed"]) == {"001_00000.parquet", "002_00000.parquet"}


def test_cli_exits_non_zero_with_one_line_per_refused_file(home, mirror):
    d, sums = mirror
    (d / "003_00000.parquet").unlink()
    p = run_cli("--home", str(home.root), "tokenize", "--source", str(d), "--manifest", str(sums),
                "--vocab-size", str(VOCAB), env={"PREFECT_LOGGING_LEVEL": "WARNING"})
    assert p.returncode == 1, p.stderr[-2000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("langpwt: error:")]
    assert errors == [f"langpwt: error: {d / '003_00000.parquet'}: listed in --manifest {sums} but not in --source"]
    assert "3 shards built" in p.stdout
    p = run_cli("--home", str(home.root), "status", check=True)
    assert f"source file 003_00000.parquet: failed: {d / '003_00000.parquet'}: listed in --manifest" in p.stdout
    bad = d.parent / "bad.sums"
    bad.write_text("nonsense\n")
    p = run_cli("--home", str(home.root), "tokenize", "--source", str(d), "--manifest", str(bad))
    assert p.returncode == 2 and f"--manifest {bad}: line 1" in p.stderr
