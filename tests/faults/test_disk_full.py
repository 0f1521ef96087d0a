"""Disk full during shard writes, 5 times on small tmpfs mounts: a clear error, nothing partial under a
final name, and the catalog still opens. (Checkpoint writes on a full disk: test_training_faults.py.)"""
import shutil
import subprocess

import pytest

from storage import catalog
from storage.paths import Home
from tests.conftest import run_cli
from tests.faults import ledger
from tests.faults.corpus import final_files_complete, make_corpus


def mount_tmpfs(path, size_kb: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                       capture_output=True)
    return p.returncode == 0


def umount(path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("diskfull")
    make_corpus(d / "src", n_files=3, copies=2, with_dups=False)
    probe = d / "probe"
    if not mount_tmpfs(probe, 1024):
        pytest.skip("cannot mount a tmpfs here (needs root): disk-full faults not run")
    umount(probe)
    return d


def test_disk_full_during_shard_writes(prefect_api, src, tmp_path):
    r = ledger.rng("disk-full")
    tok_home = tmp_path / "tok"
    run_cli("--home", str(tok_home), "tokenize", "--source", str(src / "src"), "--vocab-size", "1024",
            env={"PREFECT_API_URL": prefect_api}, check=True)
    full_size = sum(p.stat().st_size for p in (tok_home / "shards").iterdir())
    for it in range(5):
        mnt = tmp_path / f"mnt{it}"
        # room for the catalog and the tokenizer, but only part of the shards
        size_kb = int((1.2 * 2**20 + r.uniform(0.1, 0.8) * full_size) / 1024)
        assert mount_tmpfs(mnt, size_kb)
        try:
            shutil.copytree(tok_home / "tokenizer", mnt / "home" / "tokenizer")
            p = run_cli("--home", str(mnt / "home"), "tokenize", "--source", str(src / "src"), "--tokenizer",
                        str(tok_home / "tokenizer" / "tokenizer.json"), env={"PREFECT_API_URL": prefect_api})
            h = Home.from_env(mnt / "home")
            errs = [l for l in p.stderr.splitlines() if l.startswith("langpwt: error:")]
            ok = p.returncode != 0 and any("No space left" in l or "full" in l.lower() for l in errs)
            ok &= final_files_complete(h)
            done = set()
            if h.catalog.exists():
                try:
                    done = {s for (s,) in catalog.query_rows(h, "SELECT DISTINCT shard_id FROM shards WHERE status='done'")}
                except Exception:
                    ok = False
            ok &= all(h.shard(s, "train").exists() and h.shard(s, "val").exists() for s in done)
            ledger.record("disk full during shard writes", ok,
                          note=f"{size_kb} KiB: {len(done)} of 3 shards done; {errs[-1][:80] if errs else 'no error'}")
            assert ok, (p.returncode, p.stderr[-800:])
        finally:
            umount(mnt)
