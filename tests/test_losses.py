"""Shared losses checked against hand computations (explicit softmax / log formulas)."""

import math

import pytest
import torch

from mdistiller_blockkd.distillers import losses


def _softmax(z, T):
    """Row softmax from exp / sum in float64 (max-shifted)."""
    z = z.double() / T
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def _kl_rows(p, q):
    """Per-row KL(p || q) = sum p (log p - log q), with 0 log 0 = 0."""
    terms = torch.where(p > 0, p * (torch.log(p) - torch.log(q)), torch.zeros_like(p))
    return terms.sum(dim=1)


def _fixed_logits():
    zs = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0], [0.3, 0.1, -2.0, 1.5, 4.0], [-1.0, 2.5, 2.0, 0.0, -0.5]])
    zt = torch.tensor([[4.0, 0.0, -1.0, 1.0, 2.0], [1.0, -1.0, 0.0, 3.5, 2.0], [0.0, 5.0, 1.0, -2.0, 0.5]])
    y = torch.tensor([0, 3, 1])
    return zs, zt, y


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_loss_is_T2_times_batch_mean_kl(T):
    torch.manual_seed(0)
    zs, zt = torch.randn(6, 10) * 3, torch.randn(6, 10) * 3
    want = T * T * _kl_rows(_softmax(zt, T), _softmax(zs, T)).mean()
    got = losses.kd_loss(zs, zt, T)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    # identical distributions: zero
    assert losses.kd_loss(zt, zt, T).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_on_fixed_logits():
    zs, zt, _ = _fixed_logits()
    T = 4.0
    total = 0.0
    for n in range(zs.shape[0]):
        ps = [math.exp(v / T) for v in zs[n].tolist()]
        pt = [math.exp(v / T) for v in zt[n].tolist()]
        ps = [v / sum(ps) for v in ps]
        pt = [v / sum(pt) for v in pt]
        total += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
    want = T * T * total / zs.shape[0]
    assert losses.kd_loss(zs, zt, T).item() == pytest.approx(want, rel=1e-5)


def _dkd_by_hand(zs, zt, y, T):
    """(TCKD, NCKD) from explicit probabilities: b = [p_gt, 1 - p_gt], p_hat = p / (1 - p_gt) off the target."""
    tckd, nckd = 0.0, 0.0
    N = zs.shape[0]
    for n in range(N):
        ps, pt = _softmax(zs[n : n + 1], T)[0].tolist(), _softmax(zt[n : n + 1], T)[0].tolist()
        g = int(y[n])
        bs, bt = [ps[g], 1 - ps[g]], [pt[g], 1 - pt[g]]
        tckd += sum(a * math.log(a / b) for a, b in zip(bt, bs))
        hs = [v / (1 - ps[g]) for k, v in enumerate(ps) if k != g]
        ht = [v / (1 - pt[g]) for k, v in enumerate(pt) if k != g]
        nckd += sum(a * math.log(a / b) for a, b in zip(ht, hs))
    return T * T * tckd / N, T * T * nckd / N


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_parts_match_hand_computation(T):
    zs, zt, y = _fixed_logits()
    tckd, nckd = losses.dkd_parts(zs, zt, y, T)
    want_t, want_n = _dkd_by_hand(zs, zt, y, T)
    assert tckd.item() == pytest.approx(want_t, rel=1e-5, abs=1e-7)
    assert nckd.item() == pytest.approx(want_n, rel=1e-5, abs=1e-7)
    full = losses.dkd_loss(zs, zt, y, alpha=1.5, beta=8.0, T=T)
    assert full.item() == pytest.approx(1.5 * want_t + 8.0 * want_n, rel=1e-5)


def test_dkd_decomposition_identity_per_sample():
    """KL(p_t||p_s) = KL(b_t||b_s) + (1 - p_gt,t) KL(p_hat_t||p_hat_s), sample by sample."""
    torch.manual_seed(1)
    T = 4.0
    zs, zt = torch.randn(8, 20) * 4, torch.randn(8, 20) * 4
    y = torch.randint(0, 20, (8,))
    for n in range(8):
        s, t, g = zs[n : n + 1], zt[n : n + 1], y[n : n + 1]
        kl = losses.kd_loss(s, t, T) / (T * T)
        tckd, nckd = losses.dkd_parts(s, t, g, T)
        pgt_t = _softmax(t, T)[0, g].item()
        rhs = tckd / (T * T) + (1.0 - pgt_t) * nckd / (T * T)
        assert kl.item() == pytest.approx(rhs.item(), rel=1e-4, abs=1e-6)


def _pool(x, k):
    """Average pool a square map to k x k by reshaping (k divides the size)."""
    n, c, h, w = x.shape
    return x.reshape(n, c, k, h // k, k, w // k).mean(dim=(3, 5))


def _mse(a, b):
    return ((a.double() - b.double()) ** 2).mean().item()


def test_hcl_loss_matches_hand_computation():
    torch.manual_seed(2)
    fs = [torch.randn(2, 3, 8, 8), torch.randn(2, 4, 4, 4), torch.randn(2, 5, 1, 1)]
    ft = [torch.randn(2, 3, 8, 8), torch.randn(2, 4, 4, 4), torch.randn(2, 5, 1, 1)]
    # 8x8: pools 4, 2, 1 with weights 1/2, 1/4, 1/8; 4x4: pools 2, 1; 1x1: plain MSE
    l8 = (
        _mse(fs[0], ft[0]) + 0.5 * _mse(_pool(fs[0], 4), _pool(ft[0], 4))
        + 0.25 * _mse(_pool(fs[0], 2), _pool(ft[0], 2)) + 0.125 * _mse(_pool(fs[0], 1), _pool(ft[0], 1))
    ) / 1.875
    l4 = (_mse(fs[1], ft[1]) + 0.5 * _mse(_pool(fs[1], 2), _pool(ft[1], 2)) + 0.25 * _mse(_pool(fs[1], 1), _pool(ft[1], 1))) / 1.75
    l1 = _mse(fs[2], ft[2])
    got = losses.hcl_loss(fs, ft)
    assert got.item() == pytest.approx(l8 + l4 + l1, rel=1e-5)
    assert losses.hcl_loss(ft, ft).item() == pytest.approx(0.0, abs=1e-7)


def test_warmup_factor():
    assert losses.warmup_factor(5, 20) == pytest.approx(0.25)
    assert losses.warmup_factor(20, 20) == 1.0
    assert losses.warmup_factor(300, 20) == 1.0
    assert losses.warmup_factor(1, 0) == 1.0


def test_extreme_logits_stay_finite():
    """+-1e4 logits (near one-hot in float32) give finite losses and gradients."""
    y = torch.tensor([0, 1, 2, 3])
    zs = torch.full((4, 10), -1e4)
    zs[torch.arange(4), (y + 1) % 10] = 1e4  # confidently wrong
    zt = torch.full((4, 10), -1e4)
    zt[torch.arange(4), y] = 1e4  # confidently right
    for T in (1.0, 4.0):
        s = zs.clone().requires_grad_(True)
        vals = [
            losses.kd_loss(s, zt, T),
            *losses.dkd_parts(s, zt, y, T),
            losses.dkd_loss(s, zt, y, 1.0, 8.0, T),
            losses.lskd_loss(s, zt, T),
            losses.kd_loss(zt, zt, T),
        ]
        for v in vals:
            assert torch.isfinite(v), vals
        sum(vals).backward()
        assert torch.isfinite(s.grad).all()
        # mirrored inputs (teacher confidently wrong too)
        s2 = zt.clone().requires_grad_(True)
        v = losses.dkd_loss(s2, zs, y, 1.0, 8.0, T) + losses.kd_loss(s2, zs, T)
        v.backward()
        assert torch.isfinite(v) and torch.isfinite(s2.grad).all()
    feats = [torch.full((2, 3, 8, 8), 1e4), torch.full((2, 3, 1, 1), -1e4)]
    assert torch.isfinite(losses.hcl_loss(feats, [torch.zeros_like(f) for f in feats]))


def test_low_precision_logits_are_computed_in_float32():
    torch.manual_seed(3)
    zs, zt = torch.randn(4, 10), torch.randn(4, 10)
    y = torch.randint(0, 10, (4,))
    ref = losses.kd_loss(zs, zt, 4.0)
    got = losses.kd_loss(zs.bfloat16(), zt.bfloat16(), 4.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=5e-2)
    assert losses.dkd_loss(zs.bfloat16(), zt.bfloat16(), y, 1.0, 8.0, 4.0).dtype == torch.float32
