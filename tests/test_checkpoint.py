"""Checkpoint directories: atomic with a completion marker, keep-K + best, safetensors export.
A one-layer model keeps each save in milliseconds; the format is the same as the seed model's."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.config import GPTConfig
from model.gpt import GPT
from model import checkpoint as ckpts
from storage.paths import Home


def _save(root, step, model, val):
    return ckpts.save(root, step, model_state=model.state_dict(), optim_state={"s": torch.tensor([step])},
                      train_state={"step": step}, config={"train": {"model": model.config.__dict__}},
                      val_loss=val, run_id="r")


def test_save_list_prune_and_export(tmp_path):
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=100))
    root = tmp_path / "runs" / "r" / "checkpoints"
    for step, val in [(10, 3.0), (20, 2.0), (30, 2.5), (40, 2.6)]:
        info = _save(root, step, m, val)
        assert (root / f"step_{step:06d}" / ckpts.MARKER).is_file()
    assert info.size_bytes > 0 and len(info.sha256) == 64
    # the recorded sha256 is the exported file's, and the export loads back as the model
    from storage.shards import file_sha256
    assert info.sha256 == file_sha256(Path(info.path) / ckpts.WEIGHTS)
    _, sd = ckpts.load_weights(info.path, "cpu")
    assert torch.equal(sd["transformer.wte.weight"], m.state_dict()["transformer.wte.weight"])
    # a crash after the rename but before the marker: that folder does not count
    (root / "step_000050").mkdir()
    (root / "step_000050" / "model.pt").write_bytes(b"partial")
    assert ckpts.latest(root).step == 40 and ckpts.best(root).step == 20
    assert ckpts.prune(root, keep_last=2) == [10]
    assert [i.step for i in ckpts.list_complete(root)] == [20, 30, 40]
    assert not list(root.glob(".*tmp"))  # no temp dirs left
    cfg, sd = ckpts.load_weights(root / "step_000040")
    assert sd["lm_head.weight"] is sd["transformer.wte.weight"]
    for k, v in m.state_dict().items():
        assert torch.equal(sd[k], v), k
    st = ckpts.load_train_state(root / "step_000030")
    assert st["state"]["step"] == 30 and torch.equal(st["optimizer"]["s"], torch.tensor([30]))
    home = Home.from_env(tmp_path)
    assert ckpts.resolve("latest", home) == root / "step_000040"
    assert ckpts.resolve("r", home) == root / "step_000040"
    assert ckpts.resolve(str(root / "step_000020"), home) == root / "step_000020"


def test_rewriting_a_step_replaces_it_whole(tmp_path):
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=100))
    root = tmp_path / "ck"
    a = _save(root, 5, m, 1.0)
    with torch.no_grad():
        m.transformer.wpe.weight.add_(1.0)
    b = _save(root, 5, m, 0.5)
    assert a.sha256 != b.sha256 and ckpts.read_info(root / "step_000005").sha256 == b.sha256
    assert [p.name for p in root.iterdir()] == ["step_000005"]


def test_background_saver_writes_the_state_of_its_step(tmp_path):
    """Training goes on while a checkpoint is written: the files hold the state at `submit`, whatever the
    model does next; a failed write surfaces on the next call, with nothing left under a final name."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=100))
    root = tmp_path / "runs" / "r" / "checkpoints"
    saver = ckpts.BackgroundSaver(keep_last=1)
    kept = {k: v.clone() for k, v in m.state_dict().items()}
    opt_state = {"s": torch.tensor([10])}
    assert saver.submit(root, 10, model_state=m.state_dict(), optim_state=opt_state, train_state={"step": 10},
                        config={"train": {"model": m.config.__dict__}}, val_loss=3.0, run_id="r") == []
    with torch.no_grad():  # the next steps change the live tensors in place
        for p in m.parameters():
            p.add_(1.0)
    opt_state["s"].add_(5)
    done = saver.submit(root, 20, model_state=m.state_dict(), optim_state=opt_state, train_state={"step": 20},
                        config={"train": {"model": m.config.__dict__}}, val_loss=2.0, run_id="r")
    assert [(i.step, removed) for i, removed in done] == [(10, [])]
    (info, removed), = saver.wait()
    assert info.step == 20 and removed == [10] and saver.wait() == [] and saver.poll() == []
    assert not (root / "step_000010").exists()  # pruned: keep_last=1 and step 20 is the best
    cfg, sd = ckpts.load_weights(root / "step_000020")
    for k, v in m.state_dict().items():
        assert torch.equal(sd[k], v) and not torch.equal(sd[k], kept[k]), k
    assert torch.equal(ckpts.load_train_state(root / "step_000020")["optimizer"]["s"], torch.tensor([15]))

    # a write that cannot happen: a file where the checkpoint folder must go
    bad = tmp_path / "blocked"
    bad.write_text("not a folder")
    saver.submit(bad, 30, model_state=m.state_dict(), optim_state=opt_state, train_state={"step": 30},
                 config={}, val_loss=None)
    with pytest.raises(ckpts.CheckpointWriteError, match="blocked/step_000030: checkpoint not written"):
        saver.wait()
    assert saver.wait() == [] and not list(tmp_path.glob("blocked*/step_*"))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the device snapshot needs CUDA (benchmarks/ckpt_probe.py runs it there)"))])
def test_background_saver_snapshot_ignores_later_steps(tmp_path, device):
    """The same with the first checkpoint kept: its bytes are those of step 10, not of what came after
    (on CUDA the later steps are queued on the loop's stream while the copy to host runs on another)."""
    torch.manual_seed(1)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=100)).to(device)
    root = tmp_path / "ck"
    before = {k: v.clone() for k, v in m.state_dict().items()}
    saver = ckpts.BackgroundSaver(keep_last=5)
    saver.submit(root, 10, model_state=m.state_dict(), optim_state={}, train_state={"step": 10},
                 config={"train": {"model": m.config.__dict__}}, val_loss=1.0)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(-3.0)
    saver.wait()
    _, sd = ckpts.load_weights(root / "step_000010")
    for k, v in before.items():
        assert torch.equal(sd[k], v.cpu()), k
    # the tied matrix is copied and saved once: model.pt holds one storage for wte and lm_head
    saved = ckpts.load_train_state(root / "step_000010")["model"]
    assert saved["lm_head.weight"].untyped_storage().data_ptr() == saved["transformer.wte.weight"].untyped_storage().data_ptr()


def test_storage_checkpoints_imports_no_torch():
    """The dashboards and the catalog list checkpoints through storage.checkpoints: it must not pull in torch."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = "import sys, storage.checkpoints; print(sorted(m for m in ('torch', 'safetensors') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_find_resume_is_the_newest_checkpoint_of_the_run(tmp_path):
    """The one resume finder (the CLI's check, the plan and the trainer all ask it): a run id's newest checkpoint,
    else the newest run's; a missing run or an empty home is a one-line FileNotFoundError."""
    from storage import checkpoints as plain

    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=100))
    home = Home.from_env(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"--resume: no complete checkpoint under .*runs$"):
        plain.find_resume(home)
    for run, steps in (("a", (10, 20)), ("b", (5,))):
        for step in steps:
            _save(ckpts.checkpoint_root(home, run), step, m, 1.0)
    assert plain.find_resume(home).path == str(ckpts.checkpoint_root(home, "b") / "step_000005")  # written last
    info = plain.find_resume(home, "a")
    assert info.step == 20 and plain.run_of(info.path).name == "a"
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint under .*runs/nope"):
        plain.find_resume(home, "nope")
