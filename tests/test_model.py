"""The model in isolation: GPT-2 init and tying, padded ids, KV cache, the fused head, data, schedule.
Small shapes on CPU in float32/float64, so exact comparisons with reference computations hold."""
from __future__ import annotations

import math
import os
import threading

import numpy as np
import pytest
import torch

from model.config import REGIONS_MAX_STEPS, GPTConfig, TrainConfig, padded
from model.data import TokenWindows
from model.generate import pick, sample
from model.gpt import GPT, plain_loss
from model.head import FusedHeadLoss
from model.optim import WarmupCosine, make_optimizer
from storage.shards import ShardWriter
from tests.conftest import sample_rows

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=300, dropout=0.0)


def test_gpt2_init_tying_and_padding():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=32, vocab_size=1000))
    assert m.config.padded_vocab == 1024 == padded(1000) and padded(48_951) == 49_152
    assert m.lm_head.weight is m.transformer.wte.weight
    wte = m.transformer.wte.weight
    assert wte[1000:].abs().max() == 0 and wte[:1000].std().item() == pytest.approx(0.02, rel=0.05)
    proj = m.transformer.h[0].attn.c_proj.weight.std().item()
    assert proj == pytest.approx(0.02 / math.sqrt(8), rel=0.1)
    assert m.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.1)
    groups = make_optimizer(m, TrainConfig(), torch.device("cpu")).param_groups
    assert all(p.dim() == 2 for p in groups[0]["params"]) and all(p.dim() == 1 for p in groups[1]["params"])
    assert groups[0]["weight_decay"] > 0 and groups[1]["weight_decay"] == 0


def test_padded_ids_are_never_predicted_or_sampled():
    torch.manual_seed(0)
    m = GPT(CFG)
    with torch.no_grad():
        m.transformer.wte.weight[CFG.vocab_size:] = 5.0  # even if the pad rows held large values
    logits = m(torch.randint(0, CFG.vocab_size, (2, 8)))
    assert logits.shape[-1] == CFG.padded_vocab
    assert torch.isinf(logits[..., CFG.vocab_size:]).all() and torch.isfinite(logits[..., :CFG.vocab_size]).all()
    g = torch.Generator().manual_seed(1)
    picks = {pick(logits[0, -1], 5.0, None, None, g) for _ in range(400)}
    assert max(picks) < CFG.vocab_size and len(picks) > 50


def test_kv_cache_generation_equals_full_recompute():
    torch.manual_seed(0)
    m = GPT(CFG).eval()
    prompt = [5, 17, 42]
    fast = list(sample(m, prompt, 10, temperature=0))
    ids = list(prompt)
    for _ in range(10):  # reference: the whole sequence again for every token, no cache
        ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
    assert fast == ids[len(prompt):]
    # past the block: still yields, never an out-of-range position
    assert len(list(sample(m, prompt, 40, temperature=1.0, top_k=10, top_p=0.9, seed=3))) == 40


def test_background_sample_draws_the_in_line_text_from_the_weights_at_submit():
    from model.sampler import BackgroundSampler

    torch.manual_seed(0)
    m = GPT(CFG).train()
    prompt = [5, 17, 42]
    expected = list(sample(m, prompt, 12, top_k=50, seed=7))
    assert m.training  # sample() leaves the model as it found it
    got, threads = [], []
    bg = BackgroundSampler(m, lambda ids: ids, prompt, 12, background=True)
    rng = torch.get_rng_state()
    bg.submit(m, 7, lambda ids: (got.append(ids), threads.append(threading.current_thread().name)))
    with torch.no_grad():  # training goes on at once: the sample must come from the weights as they were
        for p in m.parameters():
            p.add_(1.0)
    bg.wait()
    assert got == [expected] and threads == ["eval-sample"]
    assert torch.equal(torch.get_rng_state(), rng)  # the copy's init drew from a forked RNG
    changed = list(sample(m, prompt, 12, top_k=50, seed=7))
    bg.submit(m, 7, got.append)  # the copy now follows the changed weights
    bg.wait()
    assert got[-1] == changed and changed != expected
    inline = BackgroundSampler(m, lambda ids: ids, prompt, 12, background=False)
    inline.submit(m, 7, got.append)
    assert got[-1] == changed and inline.thread is None

    def broken(ids):
        raise RuntimeError("decode failed")
    bg.submit(m, 7, broken)
    with pytest.raises(RuntimeError, match="decode failed"):
        bg.wait()  # a failure on the thread reaches the training loop


def test_fused_head_matches_autograd_loss_and_gradients():
    torch.manual_seed(0)
    h = torch.randn(4, 8, CFG.n_embd, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(CFG.padded_vocab, CFG.n_embd, dtype=torch.float64) * 0.3).requires_grad_()
    t = torch.randint(0, CFG.vocab_size, (4, 8))
    col = torch.arange(CFG.padded_vocab)
    ref = plain_loss((h @ w.t()).masked_fill(col >= CFG.vocab_size, float("-inf")), t)
    gh, gw = torch.autograd.grad(ref * 0.5, (h, w))
    got = FusedHeadLoss.apply(h, w, t, CFG.vocab_size)
    fh, fw = torch.autograd.grad(got * 0.5, (h, w))
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(fh, gh, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(fw, gw, rtol=1e-5, atol=1e-9)
    assert fw[CFG.vocab_size:].abs().max() == 0


def test_compiled_regions_compute_the_same_loss_and_gradients():
    """The regions path (trainer's --compile-scope regions) traced by Dynamo for real (eager backend:
    CPU has no Triton) against the plain module: same loss, same gradients, one graph for all blocks."""
    import torch._dynamo as dynamo
    from torch._dynamo.testing import CompileCounter

    cfg = GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=300, dropout=0.0)
    x, y = torch.randint(0, 300, (2, 3, 16))
    grads = []
    for regions in (False, True):
        torch.manual_seed(0)
        m = GPT(cfg)
        if regions:
            dynamo.reset()
            counter = CompileCounter()
            m.compile_regions(backend=counter)
        loss = m(x, y)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (l0, g0), (l1, g1) = grads
    torch.testing.assert_close(l1, l0)
    assert g0.keys() == g1.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], msg=k)
    # embedding, the block graph shared by the three blocks, ln_f + loss: three graphs, not five
    assert counter.frame_count == 3
    assert list(m.state_dict()) == list(GPT(cfg).state_dict())  # the compiled callables add no weights
    m.eval()  # evaluation and decoding take the eager path
    assert m(x[:, :4]).shape == (3, 1, cfg.padded_vocab) and counter.frame_count == 3
    # regions for runs short enough that the compile saved outweighs the slower steps, the whole model beyond
    assert TrainConfig(max_steps=5000).compile_scope == "regions"
    assert TrainConfig(max_steps=50_000).compile_scope == "model"
    assert TrainConfig(max_steps=REGIONS_MAX_STEPS).compile_scope == "regions"
    assert TrainConfig(max_steps=REGIONS_MAX_STEPS + 1).compile_scope == "model"


def _shard(tmp_path, n_docs=40):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = [r["text"] for r in sample_rows()[:n_docs]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    w = ShardWriter(tmp_path / "shard_000000.train.bin", 300)
    for t in texts:
        ids = np.array([0, *tok.encode(t).ids])
        w.append(ids, np.array([0]))
    w.close()
    return tmp_path / "shard_000000.train.bin"


def test_batches_are_a_function_of_seed_step_and_index(tmp_path):
    w = TokenWindows([_shard(tmp_path)], 16, 300)
    a = w.batch(7, 3, 1, 8)
    assert a.shape == (8, 17) and (a == w.batch(7, 3, 1, 8)).all()
    assert not (a == w.batch(7, 4, 1, 8)).all() and not (a == w.batch(7, 3, 2, 8)).all()
    # every window is a real contiguous slice of the shard
    flat = np.asarray(w.maps[0])
    starts = [np.flatnonzero(flat[:-16] == row[0]) for row in a]
    assert all(any((flat[s:s + 17] == row).all() for s in st) for st, row in zip(starts, a))
    v = w.fixed(5)
    assert (v == w.fixed(5)).all() and len({tuple(r) for r in v}) == 5
    with pytest.raises(ValueError, match="vocab_size 100"):
        TokenWindows([_shard(tmp_path)], 16, 100)


def test_warmup_then_cosine():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = WarmupCosine(opt, 1e-3, warmup=10, total=110, min_ratio=0.1)
    assert s.lr_at(0) == pytest.approx(1e-4) and s.lr_at(9) == pytest.approx(1e-3)
    assert s.lr_at(60) == pytest.approx(0.55e-3) and s.lr_at(110) == pytest.approx(1e-4)
    assert s.lr_at(500) == pytest.approx(1e-4)
    lrs = [s.lr_at(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_inductor_mix_order_reduction_is_off_only_with_dropout():
    import torch._inductor.config as ic

    from model.runtime import tune_inductor

    default = ic.triton.mix_order_reduction
    try:
        tune_inductor(0.1)
        assert ic.triton.mix_order_reduction is False
        tune_inductor(0.0)  # a later compile in the same process gets the default back
        assert ic.triton.mix_order_reduction is default
    finally:
        ic.triton.mix_order_reduction = default


def test_compile_caches_live_in_the_home_unless_the_environment_says_otherwise(tmp_path, monkeypatch):
    from model.runtime import use_compile_cache
    from storage.paths import Home

    from torch._inductor.runtime.cache_dir_utils import cache_dir  # what Inductor will use

    home = Home.from_env(tmp_path / "home")
    cache_dir()  # torch's first call writes its default (/tmp/...) into the environment: it must not win
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.environ["TORCHINDUCTOR_CACHE_DIR"])
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    got = use_compile_cache(home.compile_cache)  # only torch's default was there
    assert got == {"TORCHINDUCTOR_CACHE_DIR": str(home.root / "cache" / "compile" / "inductor"),
                   "TRITON_CACHE_DIR": str(home.root / "cache" / "compile" / "triton")}
    assert cache_dir() == got["TORCHINDUCTOR_CACHE_DIR"]
    # a folder the user gave at start stays
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    mine = use_compile_cache(home.compile_cache)
    assert mine["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine") and cache_dir() == str(tmp_path / "mine")
    assert mine["TRITON_CACHE_DIR"] == got["TRITON_CACHE_DIR"]


def test_gemm_head_matches_autograd_loss_and_gradients():
    """--head gemm (torch path, as CPU training runs it): the loss and both gradients of the plain cross-entropy,
    also for a confident row, where the target's p - 1 is tiny and computed from the other terms' sum."""
    from model.head_gemm import GemmHeadLoss

    torch.manual_seed(0)
    h = torch.randn(4, 8, CFG.n_embd, requires_grad=True)
    w = (torch.randn(CFG.padded_vocab, CFG.n_embd) * 0.3).requires_grad_()
    t = torch.randint(0, CFG.vocab_size, (4, 8))
    with torch.no_grad():
        h[0, 0] = w[t[0, 0]] * 10  # p_target ~ 1 - 1e-6
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    col = torch.arange(CFG.padded_vocab)
    logits = (hd @ wd.t()).masked_fill(col >= CFG.vocab_size, float("-inf"))
    # float64 throughout (plain_loss computes in fp32, whose p - 1 at a confident target loses digits)
    ref = torch.nn.functional.cross_entropy(logits.view(-1, CFG.padded_vocab), t.reshape(-1))
    gh, gw = torch.autograd.grad(ref * 0.5, (hd, wd))
    got = GemmHeadLoss.apply(h, w, t, CFG.vocab_size)
    fh, fw = torch.autograd.grad(got * 0.5, (h, w))
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(fh.double(), gh, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(fw.double(), gw, rtol=1e-4, atol=1e-9)
    # the confident row's gradient is ~1e-6 of the others' and still right to fp32's precision
    assert gh[0, 0].abs().max() < 1e-5 * gh[1].abs().max()
    torch.testing.assert_close(fh[0, 0].double(), gh[0, 0], rtol=1e-4, atol=1e-13)
    assert fw[CFG.vocab_size:].abs().max() == 0


def test_gemm_head_loss_is_finite_to_111_nats_behind_then_inf():
    """A target 100 nats below the row's top logit still gets its loss and gradient; past (128 + OFFSET2) / log2 e
    = 111 nats, E overflows and the loss is inf, which the trainer stops on as a diverged run."""
    from model.head_gemm import GemmHeadLoss

    k, v = 16, CFG.vocab_size
    w = torch.zeros(CFG.padded_vocab, k)
    w[:k] = torch.eye(k)  # logit j is h_j for j < k, 0 beyond
    t = torch.full((1, 2), 100)
    h = torch.zeros(1, 2, k)
    h[0, 0, 5], h[0, 1, 5] = 100.0, 120.0
    hh = h.clone().requires_grad_()
    loss_rows = [GemmHeadLoss.apply(hh[:, i:i + 1], w, t[:, i:i + 1], v) for i in range(2)]
    assert loss_rows[0].item() == pytest.approx(100.0, rel=1e-6)
    loss_rows[0].backward()
    assert torch.isfinite(hh.grad).all() and hh.grad[0, 0, 5].item() == pytest.approx(1.0, rel=1e-6)
    assert loss_rows[1].item() == float("inf")
