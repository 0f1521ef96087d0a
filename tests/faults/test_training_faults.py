"""Training under faults: SIGKILL during checkpoint writes (10), kill and resume at random steps
(3 seeds x 2 points, losses identical to the uninterrupted run), and a full disk under checkpoints (5)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from model import checkpoint as ckpts
from tests.conftest import ROOT
from tests.faults import ledger
from tests.faults.test_disk_full import mount_tmpfs, umount
from tests.train_fixtures import FAST, metrics_rows, run_trainer, train_home  # noqa: F401


def _spawn(home, *args):
    return subprocess.Popen([sys.executable, "-m", "model.train", "--home", str(home.root), *args], cwd=ROOT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait(pred, proc, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if pred():
            return True
        time.sleep(0.002)
    return False


def test_sigkill_during_checkpoint_writes(train_home):
    r = ledger.rng("checkpoint-kill")
    root = ckpts.checkpoint_root(train_home, "ck")
    for it in range(10):
        # each kill lands while some checkpoint's temp directory is being written
        p = _spawn(train_home, *FAST, "--run-id", "ck", "--max-steps", "400", "--ckpt-every", "2",
                   "--eval-every", "1000", "--keep-last", "2", *(["--resume"] if it else []))
        # the 2nd or 3rd checkpoint this process writes: there is always an earlier one to resume from
        target = r.randint(2, 3)
        seen = set()
        def writing():
            temps = {t.name for t in root.glob(".step_*.tmp")} if root.exists() else set()
            seen.update(temps)
            return len(seen) >= target
        hit = _wait(writing, p)
        time.sleep(r.uniform(0, 0.02))
        p.send_signal(signal.SIGKILL)
        p.wait()
        before = ckpts.latest(root)
        ok = hit and before is not None
        ckpts.load_train_state(before.path)  # the newest complete checkpoint loads
        code, events, text = run_trainer(train_home, "--resume", "--run-id", "ck", "--max-steps",
                                         str(before.step + 2))
        resumed = events[0].get("resumed_from") if events else None
        ok &= code == 0 and (resumed or "").endswith(ckpts.step_dir_name(before.step))
        ledger.record("SIGKILL during a checkpoint write", ok, note=f"resumed from step {before.step}")
        assert ok, text[-800:]


def test_kill_and_resume_at_random_steps(train_home):
    r = ledger.rng("train-kill-resume")
    steps = 24
    for seed in (1, 2, 3):
        common = [*FAST, "--seed", str(seed), "--schedule-steps", str(steps), "--ckpt-every", "3",
                  "--eval-every", "12", "--keep-last", "3", "--dropout", "0.1"]
        assert run_trainer(train_home, *common, "--max-steps", str(steps), "--run-id", f"straight{seed}")[0] == 0
        rid = f"killed{seed}"
        points = sorted(r.sample(range(4, steps - 2), 2))
        for k, at in enumerate(points):
            p = _spawn(train_home, *common, "--max-steps", str(steps), "--run-id", rid,
                       *(["--resume"] if k else []))
            log = train_home.run_dir(rid) / "metrics.jsonl"
            _wait(lambda: log.exists() and f'"step": {at},' in log.read_text().replace('"step":', '"step": ')
                  .replace('"step":  ', '"step": '), p)
            p.send_signal(signal.SIGKILL)
            p.wait()
        code, _, text = run_trainer(train_home, "--resume", "--run-id", rid, "--max-steps", str(steps))
        a, va = metrics_rows(train_home, f"straight{seed}")
        b, vb = metrics_rows(train_home, rid)
        ok = code == 0 and a == b and va == vb and sorted(a) == list(range(1, steps + 1))
        for at in points:
            ledger.record("kill and resume training (CPU, bit-exact)", ok, note=f"seed {seed}, killed near step {at}")
        assert ok, (text[-500:], {s: (a.get(s), b.get(s)) for s in a if a.get(s) != b.get(s)})


def test_disk_full_during_checkpoint_writes(train_home, tmp_path):
    r = ledger.rng("checkpoint-disk-full")
    probe = tmp_path / "probe"
    if not mount_tmpfs(probe, 1024):
        pytest.skip("cannot mount a tmpfs here (needs root): disk-full checkpoint faults not run")
    umount(probe)
    code, _, text = run_trainer(train_home, *FAST, "--run-id", "size", "--max-steps", "2", "--ckpt-every", "2")
    one = sum(f.stat().st_size for f in ckpts.latest(ckpts.checkpoint_root(train_home, "size")).path and
              __import__("pathlib").Path(ckpts.latest(ckpts.checkpoint_root(train_home, "size")).path).iterdir())
    for it in range(5):
        runs = train_home.runs
        mnt = tmp_path / f"runs{it}"
        size_kb = int((r.uniform(1.3, 3.7) * one) / 1024) + 64
        assert mount_tmpfs(mnt, size_kb)
        try:
            old = runs.with_name(f"runs.before{it}")
            runs.rename(old)
            runs.symlink_to(mnt)
            code, events, text = run_trainer(train_home, *FAST, "--run-id", "full", "--max-steps", "40",
                                             "--ckpt-every", "2", "--keep-last", "100", "--eval-every", "1000")
            root = ckpts.checkpoint_root(train_home, "full")
            infos = ckpts.list_complete(root)
            ok = code != 0 and ("No space left" in text or "disk" in text.lower())
            ok &= all(p.name.startswith(".") or (p / ckpts.MARKER).exists() or not any(p.iterdir())
                      for p in root.iterdir()) if root.exists() else True
            if infos:
                ckpts.load_train_state(infos[-1].path)  # the previous checkpoint still loads
            ledger.record("disk full during checkpoint writes", ok,
                          note=f"{size_kb} KiB: {len(infos)} complete checkpoints kept; "
                               f"{next((l for l in text.splitlines() if 'space' in l.lower()), '')[:80]}")
            assert ok, text[-800:]
        finally:
            runs.unlink()
            umount(mnt)
            old.rename(runs)


def test_a_trainer_killed_by_sigkill_is_reported_as_likely_out_of_memory(tmp_path):
    """The kernel's OOM killer ends the child with SIGKILL and no message of its own: the flow's error says so
    and names the fix, instead of a bare negative exit code."""
    from tasks.train import exit_reason, run_child

    lines: list[str] = []
    code = run_child([sys.executable, "-c", "import os, signal; print('loading'); os.kill(os.getpid(), signal.SIGKILL)"],
                     lambda ev: None, lines.append)
    assert code == -signal.SIGKILL and lines == ["loading"]
    why = exit_reason(code)
    assert why.startswith("trainer killed by SIGKILL: most likely out of memory (the kernel's OOM killer); try ")
    assert "--micro-batch" in why and "--preset tiny" in why
    assert exit_reason(-signal.SIGTERM) == "trainer killed by SIGTERM" and exit_reason(3) == "trainer exited with code 3"
