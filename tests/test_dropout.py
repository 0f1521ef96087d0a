"""The hash dropout (model.dropout): the rate it promises, fresh masks per call, seeded, its gradient,
and the GPT built with it (auto resolved per device, the checkpoint config)."""
import pytest
import torch

from model.config import GPTConfig, preset
from model.dropout import Dropout, hash_dropout, keep_mask
from model.gpt import GPT


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_hash_dropout_drops_at_the_rate_and_scales_the_rest(p):
    torch.manual_seed(0)
    x = torch.rand(64, 256, 512) + 0.5  # no zeros of its own
    y = hash_dropout(x, p)
    dropped = (y == 0).double().mean().item()
    # 8.4M Bernoulli draws: the binomial standard deviation is ~1.7e-4
    assert abs(dropped - p) < 1e-3
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))


def test_hash_masks_are_fresh_per_call_and_seeded():
    x = torch.ones(128, 1024)
    torch.manual_seed(3)
    a, b = hash_dropout(x, 0.1) != 0, hash_dropout(x, 0.1) != 0
    # independent masks agree where both keep or both drop: 0.9**2 + 0.1**2
    assert abs(a.eq(b).double().mean().item() - 0.82) < 0.005
    torch.manual_seed(3)
    assert torch.equal(a, hash_dropout(x, 0.1) != 0)
    # neighbours are not correlated (an index hash that failed to mix would show it here)
    f = keep_mask((1 << 20,), 0.5, torch.tensor([7], dtype=torch.int32)).double()
    assert abs(torch.corrcoef(torch.stack([f[:-1], f[1:]]))[0, 1].item()) < 0.005
    # seeds one bit apart give unrelated masks, not shifted or permuted copies of each other
    for a, b in ((11, 10), (1 << 20, 0), (5, 4)):
        m1 = keep_mask((1 << 16,), 0.5, torch.tensor([a], dtype=torch.int32))
        m2 = keep_mask((1 << 16,), 0.5, torch.tensor([b], dtype=torch.int32))
        assert abs(m1.eq(m2).double().mean().item() - 0.5) < 0.01


def test_hash_dropout_gradient_is_the_mask_scaled():
    torch.manual_seed(1)
    x = torch.randn(32, 300, requires_grad=True)
    y = hash_dropout(x, 0.2)
    y.backward(torch.full_like(y, 3.0))
    torch.testing.assert_close(x.grad, (y != 0) * 3.0 / 0.8)
    assert torch.equal(hash_dropout(x, 0.2, training=False), x)


def test_hash_dropout_compiled_keeps_its_promises():
    torch.manual_seed(2)
    x = torch.randn(128, 512, requires_grad=True)
    f = torch.compile(lambda t: hash_dropout(t, 0.1) * 2.0)
    y = f(x)
    y.sum().backward()
    kept = y != 0
    assert abs((~kept).double().mean().item() - 0.1) < 0.005
    torch.testing.assert_close(x.grad, kept * 2.0 / 0.9)
    torch.testing.assert_close(y[kept], x[kept] * 2.0 / 0.9)


def test_gpt_with_hash_dropout_trains_and_says_so():
    with pytest.raises(ValueError, match="dropout_rng philox: expected auto, torch or hash"):
        GPTConfig(dropout_rng="philox").validate()
    for cuda, want in ((True, "hash"), (False, "torch")):  # auto, the default, is made concrete per device
        c = GPTConfig()
        c.resolve_dropout_rng(cuda)
        assert c.dropout_rng == want
        c.resolve_dropout_rng(not cuda)  # and stays what it was resolved to (a resumed run keeps its masks)
        assert c.dropout_rng == want
    assert all(d.rng == "torch" for d in GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=16,
                                                       vocab_size=64)).modules() if isinstance(d, Dropout))
    cfg = preset("tiny", 300).override({"dropout_rng": "hash", "dropout": 0.2})
    assert cfg.to_dict()["model"]["dropout_rng"] == "hash"
    torch.manual_seed(0)
    m = GPT(cfg.model)
    assert all(d.rng == "hash" for d in m.modules() if isinstance(d, Dropout))
    idx = torch.randint(0, 300, (4, 65))
    m.train()
    a, b = m(idx[:, :-1], idx[:, 1:]), m(idx[:, :-1], idx[:, 1:])
    assert a.item() != b.item()  # dropout on: two forwards differ
    m.eval()
    assert m(idx[:, :-1], idx[:, 1:]).item() == m(idx[:, :-1], idx[:, 1:]).item()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    m.train()
    losses = []
    for _ in range(30):
        loss = m(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0



def test_dropout_module_seeds_advance_per_training_call_and_reseed_restores_them():
    d = Dropout(0.1, "hash", site=3)
    x = torch.ones(64, 512)
    d.reseed(1234, 0)
    first, second = d(x), d(x)
    assert not torch.equal(first, second)  # a fresh mask per call
    d.eval()
    assert torch.equal(d(x), x) and d(x) is x  # eval: identity, the counter stays
    d.train()
    third = d(x)
    d.reseed(1234, 1)  # after one call: the second mask again
    assert torch.equal(d(x), second)
    d.reseed(1234, 2)
    assert torch.equal(d(x), third)
    other = Dropout(0.1, "hash", site=4)
    other.reseed(1234, 0)
    assert not torch.equal(other(x), first)  # another site, another mask
    assert "seed" not in d.state_dict()  # checkpoints keep the keys of torch's dropout


def test_compiled_hash_dropout_draws_the_eager_masks():
    # no RNG in the graph: the compiled module computes exactly what eager does, call after call
    torch.manual_seed(0)
    x = torch.randn(32, 128, requires_grad=True)
    eager, comp = Dropout(0.1, "hash", site=1), Dropout(0.1, "hash", site=1)
    f = torch.compile(comp)
    for _ in range(3):
        a, b = eager(x), f(x)
        assert torch.equal(a, b)
    (g1,) = torch.autograd.grad(eager(x).sum(), x)
    (g2,) = torch.autograd.grad(f(x).sum(), x)
    assert torch.equal(g1, g2)
    assert int(eager.seed) == int(comp.seed) == 1 * (1 << 27) + 4


def test_gpt_reseed_gives_the_same_losses():
    cfg = preset("tiny", 300).override({"dropout_rng": "hash"})
    idx = torch.randint(0, 300, (4, 65))
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        m = GPT(cfg.model)
        m.reseed_dropout(99, 5)
        losses.append([m(idx[:, :-1], idx[:, 1:]).item() for _ in range(3)])
    assert losses[0] == losses[1] and len(set(losses[0])) == 3
