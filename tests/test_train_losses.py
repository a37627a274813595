"""The training losses against hand-written formulas."""

import math

import pytest
import torch

from fastnoise.train.losses import DEFAULT_ALPHA, consistency_loss, feature_distance, kd_loss, kd_terms


def _softmax(row, t):
    e = [math.exp(v / t) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _kd_by_hand(s, t, y, temperature, alpha):
    """Per sample: CE from log-sum-exp, KL(p_t || p_s) summed over classes; then batch means."""
    ce = kl = 0.0
    for srow, trow, yi in zip(s.tolist(), t.tolist(), y.tolist(), strict=True):
        lse = math.log(sum(math.exp(v) for v in srow))
        ce += lse - srow[yi]
        ps, pt = _softmax(srow, temperature), _softmax(trow, temperature)
        kl += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps, strict=True))
    n = len(y)
    return (1 - alpha) * ce / n + alpha * temperature ** 2 * kl / n


@pytest.mark.parametrize("temperature,alpha", [(6.0, 0.9), (1.0, 0.5), (3.5, 0.0), (6.0, 1.0)],
                         ids=["T6-a0.9", "T1-a0.5", "T3.5-a0", "T6-a1"])
def test_kd_loss_matches_formula(temperature, alpha):
    s = torch.randn(7, 5, dtype=torch.float64) * 3
    t = torch.randn(7, 5, dtype=torch.float64) * 3
    y = torch.randint(0, 5, (7,))
    got = kd_loss(s, t, y, temperature=temperature, alpha=alpha)
    assert got.dtype == torch.float32
    want = _kd_by_hand(s, t, y, temperature, alpha)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_kd_default_alpha_and_temperature():
    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    want = _kd_by_hand(s.double(), t.double(), y, 6.0, DEFAULT_ALPHA)
    assert kd_loss(s, t, y).item() == pytest.approx(want, rel=1e-5)


def test_kd_t_squared_factor():
    """The soft term alone (alpha=1) equals T^2 times the plain KL at temperature T."""
    s, t, y = torch.randn(6, 4), torch.randn(6, 4), torch.randint(0, 4, (6,))
    for temperature in (2.0, 6.0):
        kl = torch.nn.functional.kl_div(torch.log_softmax(s / temperature, -1),
                                        torch.softmax(t / temperature, -1), reduction="batchmean")
        got = kd_loss(s, t, y, temperature=temperature, alpha=1.0)
        assert got.item() == pytest.approx(temperature ** 2 * kl.item(), rel=1e-5)
    ce, kd = kd_terms(s, t, y, 6.0)
    assert ce.item() == pytest.approx(torch.nn.functional.cross_entropy(s, y).item(), rel=1e-6)


def test_kd_teacher_is_detached_and_student_gets_gradient():
    s = torch.randn(5, 4, requires_grad=True)
    t = torch.randn(5, 4, requires_grad=True)
    y = torch.randint(0, 4, (5,))
    kd_loss(s, t, y).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_kd_gradient_matches_formula():
    """d/ds of alpha * T^2 * KL = alpha * T * (softmax(s/T) - softmax(t/T)) / batch."""
    s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    temperature, alpha = 6.0, 1.0
    kd_loss(s, t, y, temperature, alpha).backward()
    p_s, p_t = torch.softmax(s.detach() / temperature, -1), torch.softmax(t / temperature, -1)
    want = alpha * temperature * (p_s - p_t) / 3
    torch.testing.assert_close(s.grad, want, rtol=1e-5, atol=1e-7)


def test_kd_loss_is_zero_soft_term_when_logits_agree():
    s = torch.randn(4, 6)
    y = torch.randint(0, 6, (4,))
    assert kd_loss(s, s.clone(), y, alpha=1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_bf16_logits_computed_in_float32():
    s, t, y = torch.randn(4, 6), torch.randn(4, 6), torch.randint(0, 6, (4,))
    got = kd_loss(s.bfloat16(), t.bfloat16(), y)
    want = kd_loss(s.bfloat16().float(), t.bfloat16().float(), y)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("bad", [{"temperature": 0.0}, {"temperature": -1.0}, {"alpha": 1.5},
                                 {"alpha": -0.1}])
def test_kd_rejects_bad_settings(bad):
    s, t, y = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=next(iter(bad))):
        kd_loss(s, t, y, **bad)


def test_kd_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 4), torch.tensor([0, 1]))


def test_consistency_mse_matches_formula():
    noisy = [torch.randn(3, 4, 5, 5), torch.randn(3, 7)]
    clean = [torch.randn(3, 4, 5, 5), torch.randn(3, 7)]
    per_layer = [((n - c) ** 2).sum().item() / n.numel() for n, c in zip(noisy, clean, strict=True)]
    got = consistency_loss(noisy, clean, "mse")
    assert got.item() == pytest.approx(sum(per_layer) / 2, rel=1e-6)


def test_consistency_cosine_matches_formula():
    noisy = [torch.randn(4, 2, 3, 3)]
    clean = [torch.randn(4, 2, 3, 3)]
    terms = []
    for a, b in zip(noisy[0].flatten(1).tolist(), clean[0].flatten(1).tolist(), strict=True):
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
        terms.append(1 - dot / (na * nb))
    got = consistency_loss(noisy, clean, "cosine")
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert consistency_loss(noisy, [noisy[0] * 3.0], "cosine").item() == pytest.approx(0.0, abs=1e-6)


def test_consistency_clean_features_are_detached():
    noisy = torch.randn(3, 5, requires_grad=True)
    clean = torch.randn(3, 5, requires_grad=True)
    consistency_loss([noisy], [clean], "mse").backward()
    assert clean.grad is None
    torch.testing.assert_close(noisy.grad, 2 * (noisy.detach() - clean.detach()) / noisy.numel())
    noisy.grad = None
    consistency_loss([noisy], [clean]).backward()  # the default distance (cosine)
    assert clean.grad is None and noisy.grad is not None


def test_default_distance_is_cosine():
    from fastnoise.train.losses import DEFAULT_DISTANCE

    a, b = torch.randn(4, 6), torch.randn(4, 6)
    assert DEFAULT_DISTANCE == "cosine"
    assert consistency_loss([a], [b]).item() == pytest.approx(consistency_loss([a], [b], "cosine").item())
    scaled = consistency_loss([a], [b * 5.0]).item()  # scale-free
    assert scaled == pytest.approx(consistency_loss([a], [b]).item(), rel=1e-5)


def test_consistency_errors():
    with pytest.raises(ValueError, match="at least one"):
        consistency_loss([], [])
    with pytest.raises(ValueError, match="2 noisy features but 1"):
        consistency_loss([torch.ones(1)] * 2, [torch.ones(1)])
    with pytest.raises(ValueError, match="distance"):
        feature_distance(torch.ones(2, 2), torch.ones(2, 2), "l1")
    with pytest.raises(ValueError, match="differ in shape"):
        feature_distance(torch.ones(2, 2), torch.ones(2, 3))
