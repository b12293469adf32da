"""KD loss against a hand computation on tiny tensors."""

import math

import pytest
import torch

from compress.losses import KDLoss


def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_kd_matches_hand_computation():
    s = [1.0, 2.0, 0.5]
    t = [3.0, 1.0, 0.0]
    label, T, alpha = 1, 2.0, 0.7
    ps = softmax([x / T for x in s])
    pt = softmax([x / T for x in t])
    kl = sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt))
    ce = -math.log(softmax(s)[label])
    expected = alpha * kl * T * T + (1 - alpha) * ce
    loss = KDLoss(temperature=T, alpha=alpha)(torch.tensor([s]), torch.tensor([t]), torch.tensor([label]))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_kd_is_zero_kl_when_student_equals_teacher_and_alpha_one():
    x = torch.randn(4, 5)
    loss = KDLoss(temperature=3.0, alpha=1.0)(x, x.clone(), torch.zeros(4, dtype=torch.long))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_ensemble_averages_probabilities_not_logits():
    a, b = torch.tensor([[4.0, 0.0]]), torch.tensor([[0.0, 4.0]])
    loss = KDLoss(temperature=1.0)
    target = loss.soft_targets([a, b])
    assert torch.allclose(target, torch.tensor([[0.5, 0.5]]), atol=1e-6)


def test_kd_gradient_pulls_student_toward_teacher():
    student = torch.zeros(1, 3, requires_grad=True)
    teacher = torch.tensor([[0.0, 5.0, 0.0]])
    KDLoss(temperature=2.0, alpha=1.0)(student, teacher, torch.tensor([0])).backward()
    assert student.grad[0, 1] < 0 < student.grad[0, 0]
