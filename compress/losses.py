"""Distillation losses as small modules.

`KDLoss` is Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network":
the KL divergence between temperature-softened teacher and student distributions, scaled
by T² so that its gradients keep their magnitude as T changes, mixed with cross-entropy
on the labels. Several teachers are combined by averaging their softened probabilities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KDLoss(nn.Module):
    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, label_smoothing: float = 0.0):
        super().__init__()
        self.temperature = temperature
        self.alpha = alpha
        self.label_smoothing = label_smoothing

    def soft_targets(self, teacher_logits: list[torch.Tensor], weights: list[float] | None = None) -> torch.Tensor:
        weights = weights or [1.0 / len(teacher_logits)] * len(teacher_logits)
        probs = [w * F.softmax(t.float() / self.temperature, dim=1) for w, t in zip(weights, teacher_logits)]
        return torch.stack(probs).sum(0)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | list[torch.Tensor],
                labels: torch.Tensor) -> torch.Tensor:
        if isinstance(teacher_logits, torch.Tensor):
            teacher_logits = [teacher_logits]
        t = self.temperature
        target = self.soft_targets(teacher_logits)
        log_student = F.log_softmax(student_logits.float() / t, dim=1)
        kd = F.kl_div(log_student, target, reduction="batchmean") * (t * t)
        ce = F.cross_entropy(student_logits.float(), labels, label_smoothing=self.label_smoothing)
        return self.alpha * kd + (1.0 - self.alpha) * ce
