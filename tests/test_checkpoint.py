"""Checkpoint directories: atomic with a completion marker, keep-K + best, safetensors export.
A one-layer model keeps each save in milliseconds; the format is the same as the seed model's."""
from __future__ import annotations

import torch

from model.config import GPTConfig
from model.gpt import GPT
from storage import checkpoints as ckpts
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
