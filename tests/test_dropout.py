"""The hash dropout (model.dropout): the rate it promises, fresh masks per call, seeded, its gradient,
and the GPT built with it (the CLI flag, the checkpoint config)."""
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
    # seeds a golden step apart do not give shifted copies of one mask
    s = torch.tensor([11], dtype=torch.int32)
    m1 = keep_mask((4096,), 0.5, s)
    m2 = keep_mask((4096,), 0.5, s + torch.tensor([-1640531535], dtype=torch.int32))
    assert not torch.equal(m1[1:], m2[:-1]) and not torch.equal(m1[:-1], m2[1:])


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
    with pytest.raises(ValueError, match="--dropout-rng"):
        GPTConfig(dropout_rng="philox").validate()
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


def test_the_wide_and_the_wrapping_hash_agree(monkeypatch):
    import model.dropout as D
    for seed in (0, 12345, 2**31 - 2):
        s = torch.tensor([seed], dtype=torch.int32)
        narrow = D.keep_mask((257, 129), 0.1, s)
        monkeypatch.setattr(D, "WIDE", True)
        assert torch.equal(D.keep_mask((257, 129), 0.1, s), narrow)
        monkeypatch.setattr(D, "WIDE", False)
