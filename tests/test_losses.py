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


# ----------------------------------------------------------------------------- the other methods

from torch import nn  # noqa: E402

from compress.losses import AT, DIST, DKD, KD, DistillLoss, FitNet, LogitStd, soft_targets  # noqa: E402

S, T_LOGITS, LABEL = [1.0, 2.0, 0.5, -1.0], [3.0, 1.0, 0.0, 0.5], 1


def kl(p, q):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


def test_dkd_matches_hand_computation():
    temp, a, b = 2.0, 0.5, 3.0
    ps, pt = softmax([x / temp for x in S]), softmax([x / temp for x in T_LOGITS])
    tckd = kl([pt[LABEL], 1 - pt[LABEL]], [ps[LABEL], 1 - ps[LABEL]])
    rest = [i for i in range(4) if i != LABEL]
    qs = [ps[i] / (1 - ps[LABEL]) for i in rest]
    qt = [pt[i] / (1 - pt[LABEL]) for i in rest]
    expected = (a * tckd + b * kl(qt, qs)) * temp**2
    loss = DKD(temperature=temp, tckd=a, nckd=b)(torch.tensor([S]), [torch.tensor([T_LOGITS])], torch.tensor([LABEL]))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_dkd_decomposes_kd():
    # The paper's identity: KD = TCKD + (1 - p_t[target]) * NCKD.
    temp = 3.0
    pt = softmax([x / temp for x in T_LOGITS])
    s, t, y = torch.tensor([S]), [torch.tensor([T_LOGITS])], torch.tensor([LABEL])
    dkd = DKD(temperature=temp, tckd=1.0, nckd=1 - pt[LABEL])(s, t, y)
    assert dkd.item() == pytest.approx(KD(temperature=temp)(s, t, y).item(), rel=1e-5)


def test_dkd_warms_up_linearly_in_training_steps_only():
    s, t, y = torch.tensor([S]), [torch.tensor([T_LOGITS])], torch.tensor([LABEL])
    full = DKD(warmup_steps=0)(s, t, y).item()
    loss = DKD(warmup_steps=4)
    assert [loss(s, t, y).item() / full for _ in range(2)] == pytest.approx([0.25, 0.5])
    loss.eval()
    loss(s, t, y)
    loss.train()
    assert [loss(s, t, y).item() / full for _ in range(3)] == pytest.approx([0.75, 1.0, 1.0])


def pearson_py(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return num / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def test_dist_matches_hand_computation():
    temp, beta, gamma = 2.0, 1.5, 0.5
    s = [[1.0, 2.0, 0.5], [0.0, -1.0, 2.0]]
    t = [[3.0, 1.0, 0.0], [0.5, 0.0, 1.0]]
    ys = [softmax([x / temp for x in row]) for row in s]
    yt = [softmax([x / temp for x in row]) for row in t]
    inter = 1 - sum(pearson_py(a, b) for a, b in zip(ys, yt)) / 2
    cols = lambda m: [[row[j] for row in m] for j in range(3)]  # noqa: E731
    intra = 1 - sum(pearson_py(a, b) for a, b in zip(cols(ys), cols(yt))) / 3
    expected = (beta * inter + gamma * intra) * temp**2
    loss = DIST(temperature=temp, inter=beta, intra=gamma)(torch.tensor(s), [torch.tensor(t)], torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_logit_std_matches_hand_computation():
    temp = 2.0

    def z(xs):
        m = sum(xs) / len(xs)
        sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))  # Bessel's correction, as the paper's code
        return [(x - m) / sd for x in xs]

    expected = kl(softmax([x / temp for x in z(T_LOGITS)]), softmax([x / temp for x in z(S)])) * temp**2
    loss = LogitStd(temperature=temp)(torch.tensor([S]), [torch.tensor([T_LOGITS])], torch.tensor([LABEL]))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # ... and so it ignores the scale and shift of either model's logits (plain KD does not).
    s, t = torch.tensor([S]) * 3 + 5, torch.tensor([T_LOGITS]) / 2
    shifted = LogitStd(temperature=temp)(s, [t], torch.tensor([LABEL]))
    assert shifted.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("term", [KD(2.0), DKD(2.0), DIST(2.0)])
def test_ensembles_compare_with_weighted_average_probabilities(term):
    temp, w = 2.0, [3.0, 1.0]
    a, b = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), torch.tensor([[0.0, 3.0, 0.0], [1.0, 0.0, 2.0]])
    s, y = torch.tensor([[0.5, 0.2, -0.3], [0.1, 0.0, 0.4]]), torch.tensor([0, 2])
    avg = 0.75 * torch.softmax(a / temp, 1) + 0.25 * torch.softmax(b / temp, 1)
    assert torch.allclose(soft_targets([a, b], temp, w), avg, atol=1e-6)
    as_one_teacher = term(s, [temp * avg.log()], y)  # logits whose softened distribution is the average
    term.teacher_weights = w
    assert term(s, [a, b], y).item() == pytest.approx(as_one_teacher.item(), rel=1e-5)


def test_logit_std_standardizes_each_teacher_before_averaging():
    a, b = torch.tensor([[2.0, 0.0, 1.0]]), torch.tensor([[0.0, 30.0, 0.0]])
    s, y = torch.tensor([[0.5, 0.2, -0.3]]), torch.tensor([0])
    avg = 0.5 * torch.softmax(LogitStd.prepare(None, a) / 2, 1) + 0.5 * torch.softmax(LogitStd.prepare(None, b) / 2, 1)
    expected = torch.nn.functional.kl_div(torch.log_softmax(LogitStd.prepare(None, s) / 2, 1), avg,
                                          reduction="batchmean") * 4
    assert LogitStd(2.0)(s, [a, b], y).item() == pytest.approx(expected.item(), rel=1e-5)


class Tap(nn.Module):
    """A one-layer "model" whose layer `0` outputs a map we choose."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = nn.Sequential(layer)

    def forward(self, x):
        return self.layer(x).mean((1, 2, 3))


def test_fitnet_matches_hand_computation_with_adapter_and_pooling():
    teacher = Tap(nn.Identity())                                       # map: the image itself, 1x2x2
    conv = nn.Conv2d(1, 2, 1, stride=2, bias=False)                    # map: 2x1x1 (the top-left pixel, x2 weights)
    conv.weight.data = torch.tensor([[[[1.0]]], [[[2.0]]]])
    student = Tap(conv)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]]])
    loss = FitNet(teacher, student, [("layer.0", "layer.0")], x)
    assert loss.shapes == [((1, 2, 2), (2, 1, 1))]
    adapter_conv, bn = loss.adapters[0]
    adapter_conv.weight.data = torch.tensor([[[[0.5]], [[0.25]]]])
    loss.eval()                                                        # BN: running stats (0, 1)
    student(x), teacher(x)
    adapted = (0.5 * 1.0 + 0.25 * 2.0) * 1.0 / math.sqrt(1 + bn.eps)   # adapter on the student's pixel
    expected = (adapted - (1 + 2 + 3 + 6) / 4) ** 2                    # teacher pooled to 1x1
    assert loss().item() == pytest.approx(expected, rel=1e-5)
    loss.remove()
    assert not student.layer[0]._forward_hooks and not teacher.layer[0]._forward_hooks


def test_at_matches_hand_computation():
    teacher = Tap(nn.Identity())                                       # 2 channels, 4x4
    conv = nn.Conv2d(2, 1, 2, stride=2, bias=False)                    # 1 channel, 2x2
    conv.weight.data.fill_(0.25)
    student = Tap(conv)
    x = torch.arange(32, dtype=torch.float32).view(1, 2, 4, 4) / 10
    loss = AT(teacher, student, [("layer.0", "layer.0")], x)
    student(x), teacher(x)

    def att(rows):  # channel mean of squares, L2-normalized over positions
        v = [sum(c ** 2 for c in cs) / len(cs) for cs in rows]
        n = math.sqrt(sum(a * a for a in v))
        return [a / n for a in v]

    xs = x[0].tolist()
    t_sq = [[sum(xs[c][i][j] ** 2 for c in range(2)) / 2 for j in range(4)] for i in range(4)]
    t_pooled = [sum(t_sq[2 * i + di][2 * j + dj] for di in (0, 1) for dj in (0, 1)) / 4 for i in (0, 1) for j in (0, 1)]
    n = math.sqrt(sum(a * a for a in t_pooled))
    at_t = [a / n for a in t_pooled]
    s_out = [0.25 * sum(xs[c][2 * i + di][2 * j + dj] for c in range(2) for di in (0, 1) for dj in (0, 1))
             for i in (0, 1) for j in (0, 1)]
    at_s = att([[v] for v in s_out])
    expected = sum((a - b) ** 2 for a, b in zip(at_s, at_t)) / 4
    assert loss().item() == pytest.approx(expected, rel=1e-5)
    loss.remove()


def test_distill_loss_adds_weighted_terms():
    s, t, y = torch.tensor([S]), [torch.tensor([T_LOGITS])], torch.tensor([LABEL])
    teacher, student = Tap(nn.Identity()), Tap(nn.Conv2d(1, 1, 1))
    x = torch.randn(1, 1, 2, 2)
    features = AT(teacher, student, [("layer.0", "layer.0")], x)
    with DistillLoss(KD(2.0), alpha=0.3, ce_weight=0.6, features=features, feature_weight=5.0) as loss:
        student(x), teacher(x)
        feat = features().item()
        student(x), teacher(x)
        total = loss(s, t, y).item()
    ce = -math.log(softmax(S)[LABEL])
    assert total == pytest.approx(0.6 * ce + 0.3 * KD(2.0)(s, t, y).item() + 5.0 * feat, rel=1e-5)
    assert not student.layer[0]._forward_hooks  # `with` removed them


def test_unknown_layer_suggests_the_closest():
    with pytest.raises(ValueError, match="has no layer 'layer.1'; did you mean 'layer.0'"):
        AT(Tap(nn.Identity()), Tap(nn.Identity()), [("layer.0", "layer.1")], torch.randn(1, 1, 2, 2))
