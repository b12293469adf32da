"""Distillation losses as small modules.

A distill stage trains its student with one `DistillLoss`:

    ce_weight * CE(student, labels) + alpha * <logit term> + features.weight * <feature term>

Logit terms, each `term(student_logits, [teacher_logits, ...], labels) -> scalar`:

* `KD`: Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network". KL
  divergence between temperature-softened teacher and student distributions, scaled by T² so
  its gradients keep their size as T changes.
* `DKD`: Zhao et al. (CVPR 2022), "Decoupled Knowledge Distillation". KD split into TCKD (the
  binary target-vs-rest distribution) and NCKD (the distribution among the non-target
  classes), weighted separately; NCKD is the part KD suppresses when the teacher is confident.
  Its weight rises linearly over the first `warmup_steps` (the loss counts its own steps).
* `DIST`: Huang et al. (NeurIPS 2022), "Knowledge Distillation from A Stronger Teacher". 1 -
  Pearson correlation between student and teacher probabilities, across classes for each
  image (inter-class) and across the batch for each class (intra-class): the student matches
  relations, not exact values.
* `LogitStd`: Sun et al. (CVPR 2024), "Logit Standardization in Knowledge Distillation". KD on
  z-scored logits, (z - mean) / std per image, at a base temperature: the effective
  temperature becomes T·std of each model's own logits, so the student matches the teacher's
  logit *shape* without having to match its range.

Feature terms compare feature maps that forward hooks (registered by the loss, removed by
`remove()` or on leaving `with`) capture while `fit` runs the student and the teachers:

* `FitNet`: Romero et al. (ICLR 2015), "FitNets: Hints for Thin Deep Nets". MSE between the
  teacher's map and the student's, seen through a learned 1x1 conv + BN adapter when the
  channel counts differ (the adapter trains with the student: `fit` optimizes a loss's
  parameters). Trained jointly with the rest, not in the paper's separate hint stage.
* `AT`: Zagoruyko & Komodakis (ICLR 2017), "Paying More Attention to Attention". Each map
  becomes a spatial attention map (the channel mean of squared activations, flattened and
  L2-normalized); the loss is the mean squared difference between them.

When the two maps differ in size, the larger is average-pooled to the smaller. By default each
side uses its last feature map before global pooling.

Several teachers: every logit term compares the student with the teachers' *averaged softened
probabilities* (weighted by `teacher_weights`), never averaged logits; LogitStd standardizes
each teacher's logits before its softmax, and DKD decomposes the averaged distribution. Feature
terms use the first teacher only: maps of different architectures do not average.
"""

from __future__ import annotations

import difflib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POOLING = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)


def soft_targets(teacher_logits: Sequence[Tensor], temperature: float,
                 weights: Sequence[float] | None = None) -> Tensor:
    """The weighted average of the teachers' softmax(logits / T) (weights are normalized to sum to 1)."""
    weights = list(weights) if weights is not None else [1.0] * len(teacher_logits)
    total = sum(weights)
    probs = [w / total * F.softmax(t.float() / temperature, dim=1) for w, t in zip(weights, teacher_logits)]
    return torch.stack(probs).sum(0)


def standardize(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Z-score each row: (z - mean) / std, the std with Bessel's correction as in the paper's code."""
    return (logits - logits.mean(1, keepdim=True)) / (logits.std(1, keepdim=True) + eps)


def _as_list(teacher_logits: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [teacher_logits] if isinstance(teacher_logits, Tensor) else list(teacher_logits)


# ----------------------------------------------------------------------------- logit terms

class KD(nn.Module):
    """T² · KL(teachers' softened average ‖ student softened)."""

    def __init__(self, temperature: float = 4.0, teacher_weights: Sequence[float] | None = None):
        super().__init__()
        self.temperature = temperature
        self.teacher_weights = teacher_weights

    def prepare(self, logits: Tensor) -> Tensor:
        return logits.float()

    def forward(self, student_logits: Tensor, teacher_logits: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        t = self.temperature
        target = soft_targets([self.prepare(z) for z in teacher_logits], t, self.teacher_weights)
        log_student = F.log_softmax(self.prepare(student_logits) / t, dim=1)
        return F.kl_div(log_student, target, reduction="batchmean") * (t * t)


class LogitStd(KD):
    """KD on z-scored logits; `temperature` is the paper's base temperature (2 in its recipes)."""

    def prepare(self, logits: Tensor) -> Tensor:
        return standardize(logits.float())


class DKD(nn.Module):
    """T² · (tckd · KL(b_t ‖ b_s) + nckd · KL(p̂_t ‖ p̂_s)), times a linear warm-up factor.

    b = (p_target, 1 - p_target); p̂ = the distribution among the non-target classes.
    """

    def __init__(self, temperature: float = 4.0, tckd: float = 1.0, nckd: float = 8.0, warmup_steps: int = 0,
                 teacher_weights: Sequence[float] | None = None):
        super().__init__()
        self.temperature, self.tckd, self.nckd = temperature, tckd, nckd
        self.warmup_steps = warmup_steps
        self.teacher_weights = teacher_weights
        self.steps = 0  # training forward calls so far: fit does not tell a loss the epoch

    def warmup(self) -> float:
        return 1.0 if self.warmup_steps <= 0 else min(1.0, self.steps / self.warmup_steps)

    def forward(self, student_logits: Tensor, teacher_logits: Sequence[Tensor], labels: Tensor) -> Tensor:
        if self.training:
            self.steps += 1
        t = self.temperature
        p_t = soft_targets(teacher_logits, t, self.teacher_weights)            # (B, K)
        log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
        b, k = p_t.shape
        if labels.is_floating_point():  # mixed (mixup/cutmix) targets: decouple at the larger share's class
            labels = labels.argmax(1)
        target = F.one_hot(labels, k).bool()
        # TCKD: binary KL; the student's log(1 - p_target) as a logsumexp of its non-target log-probs.
        pt_gt = p_t[target]
        log_ps_gt = log_p_s[target]
        log_ps_rest = log_p_s[~target].view(b, k - 1).logsumexp(1)
        bt = torch.stack([pt_gt, (1 - pt_gt).clamp_min(0)], 1)
        tckd = (torch.xlogy(bt, bt) - bt * torch.stack([log_ps_gt, log_ps_rest], 1)).sum() / b
        # NCKD: KL between the non-target distributions, each renormalized over K - 1 classes.
        rest_t = p_t[~target].view(b, k - 1)
        q_t = rest_t / rest_t.sum(1, keepdim=True).clamp_min(1e-12)
        log_q_s = F.log_softmax(student_logits.float()[~target].view(b, k - 1) / t, dim=1)
        nckd = (torch.xlogy(q_t, q_t) - q_t * log_q_s).sum() / b
        return self.warmup() * (self.tckd * tckd + self.nckd * nckd) * (t * t)


def pearson(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of a with the same row of b."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


class DIST(nn.Module):
    """T² · (inter · (1 - mean row correlation) + intra · (1 - mean column correlation)) of probabilities."""

    def __init__(self, temperature: float = 4.0, inter: float = 1.0, intra: float = 1.0,
                 teacher_weights: Sequence[float] | None = None):
        super().__init__()
        self.temperature, self.inter, self.intra = temperature, inter, intra
        self.teacher_weights = teacher_weights

    def forward(self, student_logits: Tensor, teacher_logits: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        t = self.temperature
        y_s = F.softmax(student_logits.float() / t, dim=1)
        y_t = soft_targets(teacher_logits, t, self.teacher_weights)
        inter = 1 - pearson(y_s, y_t).mean()
        intra = 1 - pearson(y_s.t(), y_t.t()).mean()
        return (self.inter * inter + self.intra * intra) * (t * t)


# ----------------------------------------------------------------------------- feature terms

def feature_maps(model: nn.Module, example: Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """(name, (C, H, W)) of every module that outputs a 4-D feature map, in the order modules *finish*.

    A container is seen after its children, so of the modules sharing one output the outermost
    comes last (`stages` after `stages.2.2.relu`). Pooling outputs, and containers that merely
    pass one on, are left out.
    """
    seen: list[tuple[str, Tensor]] = []
    pooled: set[int] = set()

    def hook(name):
        def record(module, inputs, output):
            if isinstance(module, POOLING) and isinstance(output, Tensor):
                pooled.add(id(output))
            seen.append((name, output))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        _run(model, example)
    finally:
        for h in handles:
            h.remove()
    return [(name, tuple(out.shape[1:])) for name, out in seen
            if isinstance(out, Tensor) and out.dim() == 4 and id(out) not in pooled]


def last_feature_map(model: nn.Module, example: Tensor) -> str:
    """The module whose output is the model's last feature map before global pooling."""
    maps = feature_maps(model, example)
    if not maps:
        raise ValueError(f"{type(model).__name__} has no module that outputs a 4-D feature map; "
                         f"name the layers in features.pairs")
    return maps[-1][0]


def feature_map_near(model: nn.Module, example: Tensor, size: tuple[int, int]) -> str:
    """The deepest block whose feature map is as close to `size` as the model has, at least as large.

    Of the maps with the fewest pixels >= size, the shallowest modules in the tree are the
    blocks (`blocks.5`, not the first conv inside the next, downsampling block `blocks.6.conv.0`);
    the last of those to run wins. Falls back to the last map when every map is smaller.
    """
    maps = feature_maps(model, example)
    area = size[0] * size[1]
    big = [(n, s) for n, s in maps if s[1] * s[2] >= area]
    if not big:
        return last_feature_map(model, example)
    least = min(s[1] * s[2] for _, s in big)
    names = [n for n, s in big if s[1] * s[2] == least]
    depth = min(n.count(".") for n in names)
    return [n for n in names if n.count(".") == depth][-1]


@torch.no_grad()
def _run(model: nn.Module, example: Tensor) -> None:
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        model(example.to(param.device) if param is not None else example)
    finally:
        model.train(was_training)


def _module(model: nn.Module, name: str, side: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules or not name:
        close = difflib.get_close_matches(name, [n for n in modules if n], n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"features.pairs: the {side} ({type(model).__name__}) has no layer {name!r}{hint}")
    return modules[name]


def _match_size(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger of two maps to the other's spatial size."""
    if a.shape[-2:] == b.shape[-2:]:
        return a, b
    if a.shape[-2] * a.shape[-1] > b.shape[-2] * b.shape[-1]:
        return F.adaptive_avg_pool2d(a, b.shape[-2:]), b
    return a, F.adaptive_avg_pool2d(b, a.shape[-2:])


def _normal(t: Tensor) -> Tensor:
    return t.clone() if t.is_inference() else t


class FeatureLoss(nn.Module):
    """Captures (teacher layer, student layer) feature maps with forward hooks; subclasses compare them.

    The models are not submodules of the loss (their parameters must not be optimized twice, or
    the teacher's at all): the loss holds only hook handles and the captured maps.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, pairs: Sequence[Sequence[str]] | None,
                 example: Tensor):
        super().__init__()
        if pairs is None:
            pairs = [self.default_pair(teacher, student, example)]
        self.pairs = [(str(t), str(s)) for t, s in pairs]
        self._maps: dict[tuple[str, int], Tensor] = {}
        self._handles = []
        for i, (t_name, s_name) in enumerate(self.pairs):
            for side, model, name in (("teacher", teacher, t_name), ("student", student, s_name)):
                self._handles.append(_module(model, name, side).register_forward_hook(self._hook((side, i))))
        try:
            _run(teacher, example)
            _run(student, example)
            shapes = []
            for i, pair in enumerate(self.pairs):
                t, s = self._maps[("teacher", i)], self._maps[("student", i)]
                for side, out, name in (("teacher", t, pair[0]), ("student", s, pair[1])):
                    if not isinstance(out, Tensor) or out.dim() != 4:
                        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                        raise ValueError(f"features.pairs: the {side}'s layer {name!r} outputs {got}, "
                                         f"expected a 4-D (N, C, H, W) feature map")
                shapes.append((tuple(t.shape[1:]), tuple(s.shape[1:])))
        except BaseException:
            self.remove()
            raise
        self._maps.clear()
        self.shapes = shapes  # [(teacher (C, H, W), student (C, H, W)), ...]
        self.build(shapes)

    @staticmethod
    def default_pair(teacher: nn.Module, student: nn.Module, example: Tensor) -> tuple[str, str]:
        """The last feature map of each (FitNet: the representations just before the classifiers)."""
        return last_feature_map(teacher, example), last_feature_map(student, example)

    def _hook(self, key):
        def capture(module, inputs, output):
            # A copy: a later in-place op (ReLU(inplace=True)) must not change what we compare.
            self._maps[key] = output.clone() if isinstance(output, Tensor) else output
        return capture

    def build(self, shapes: list[tuple[tuple, tuple]]) -> None:
        """Create any learned parts, knowing each pair's (teacher, student) shapes."""

    def compare(self, i: int, teacher_map: Tensor, student_map: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self) -> Tensor:
        try:
            # Teacher maps captured under torch.inference_mode are cloned into normal tensors: an
            # inference tensor cannot be saved for the backward pass (MSE saves its target).
            return sum(self.compare(i, _normal(self._maps[("teacher", i)]), self._maps[("student", i)])
                       for i in range(len(self.pairs)))
        except KeyError:
            raise RuntimeError("feature loss called before the teacher and the student ran on this batch") from None
        finally:
            self._maps.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._maps.clear()


class FitNet(FeatureLoss):
    """Sum over pairs of MSE(adapter(student map), teacher map); adapter = 1x1 conv + BN when channels differ."""

    def build(self, shapes):
        self.adapters = nn.ModuleList(
            nn.Sequential(nn.Conv2d(s[0], t[0], 1, bias=False), nn.BatchNorm2d(t[0])) if s[0] != t[0] else nn.Identity()
            for t, s in shapes)

    def compare(self, i, teacher_map, student_map):
        teacher_map, student_map = _match_size(teacher_map.float(), student_map.float())
        return F.mse_loss(self.adapters[i](student_map), teacher_map)


def attention_map(feature: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """(N, C, H, W) -> (N, H·W): the channel mean of squared activations, optionally pooled, L2-normalized."""
    a = feature.float().pow(2).mean(1, keepdim=True)
    if size is not None and tuple(a.shape[-2:]) != tuple(size):
        a = F.adaptive_avg_pool2d(a, size)
    return F.normalize(a.flatten(1), dim=1)


class AT(FeatureLoss):
    """Sum over pairs of mean((attention(student) - attention(teacher))²), at the smaller map's size."""

    @staticmethod
    def default_pair(teacher, student, example):
        """The teacher's last map and the student's deepest block at (or just above) its resolution.

        An attention map needs room: our students divide their input by 16 and the CIFAR ResNets
        by 4, so their last maps (2x2 and 7x7 on 28 px) would share almost no spatial detail.
        """
        name, (_, h, w) = feature_maps(teacher, example)[-1]
        return name, feature_map_near(student, example, (h, w))

    def compare(self, i, teacher_map, student_map):
        size = min(teacher_map.shape[-2:], student_map.shape[-2:], key=lambda hw: hw[0] * hw[1])
        return (attention_map(student_map, size) - attention_map(teacher_map, size)).pow(2).mean()


# ----------------------------------------------------------------------------- the whole loss

class DistillLoss(nn.Module):
    """ce_weight · CE + alpha · logit term + feature_weight · feature term; `with` removes the feature hooks."""

    def __init__(self, logit: nn.Module | None = None, *, alpha: float = 0.0, ce_weight: float = 1.0,
                 label_smoothing: float = 0.0, features: FeatureLoss | None = None, feature_weight: float = 1.0):
        super().__init__()
        self.logit, self.features = logit, features
        self.alpha, self.ce_weight, self.feature_weight = alpha, ce_weight, feature_weight
        self.label_smoothing = label_smoothing

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | Sequence[Tensor], labels: Tensor) -> Tensor:
        loss = student_logits.new_zeros((), dtype=torch.float32)
        if self.ce_weight:
            loss = loss + self.ce_weight * F.cross_entropy(student_logits.float(), labels,
                                                           label_smoothing=self.label_smoothing)
        if self.logit is not None and self.alpha:
            loss = loss + self.alpha * self.logit(student_logits, _as_list(teacher_logits), labels)
        if self.features is not None:
            loss = loss + self.feature_weight * self.features()
        return loss

    def remove(self) -> None:
        if self.features is not None:
            self.features.remove()

    def __enter__(self) -> "DistillLoss":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class KDLoss(DistillLoss):
    """Hinton's recipe in one call: alpha · KD + (1 - alpha) · CE."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, label_smoothing: float = 0.0):
        super().__init__(KD(temperature), alpha=alpha, ce_weight=1.0 - alpha, label_smoothing=label_smoothing)
        self.temperature = temperature

    def soft_targets(self, teacher_logits: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
        return soft_targets(teacher_logits, self.temperature, weights)


FEATURE_TERMS = {"fitnet": FitNet, "at": AT}


def build_loss(cfg, teachers: Sequence[nn.Module], student: nn.Module, data, opts=None) -> DistillLoss:
    """The loss a distill, prune or QAT stage asks for; `cfg` is a compress.config.KDConfig, and `opts`
    (default: `cfg` itself, as every stage that distills is also an OptimConfig) gives `label_smoothing`
    and `batch_size`.

    `data` (a compress.data.DataModule) gives the steps per epoch (DKD's warm-up) and two real
    images to find the feature maps' shapes. Use it as `with build_loss(...) as loss: fit(...)`.
    """
    opts = cfg if opts is None else opts
    weights = cfg.teacher_weights
    if weights is not None and len(weights) != len(teachers):
        raise ValueError(f"teacher_weights has {len(weights)} entries for {len(teachers)} teacher(s)")
    t = cfg.temperature
    if cfg.method == "kd":
        logit = KD(t, weights)
    elif cfg.method == "logit_std":
        logit = LogitStd(t, weights)
    elif cfg.method == "dkd":
        steps = round(cfg.dkd.warmup_epochs * data.steps_per_epoch(opts.batch_size or data.batch_size))
        logit = DKD(t, cfg.dkd.tckd, cfg.dkd.nckd, steps, weights)
    elif cfg.method == "dist":
        logit = DIST(t, cfg.dist.inter, cfg.dist.intra, weights)
    else:
        logit = None
    features = None
    if cfg.features is not None:
        example, _ = data.images("train", 2)
        features = FEATURE_TERMS[cfg.features.method](teachers[0], student, cfg.features.pairs, example)
    return DistillLoss(logit, alpha=cfg.alpha, ce_weight=cfg.ce_weight, label_smoothing=opts.label_smoothing,
                       features=features, feature_weight=cfg.features.weight if cfg.features else 0.0)
