"""Batched augmentation and mixing: whole batches on the device, no per-image Python.

Every function here takes a batch and per-image parameters drawn elsewhere from seeded
generators (DataModule: once per epoch from (seed, epoch); Mixer: per step from (seed, epoch,
step)), so a resumed epoch sees the same pixels bit for bit.

* crop and flip: one gather (`random_crop_flip`).
* rotation: one `affine_grid` + `grid_sample`, bilinear, zero (black) fill (`rotate`).
* Gaussian blur, Gaussian noise and brightness/contrast jitter, the usual photometric steps for
  thin-stroke and sketch-like images: a per-image separable depthwise convolution
  (`gaussian_blur`), an add (`add_noise`) and a blend (`brightness_contrast`).
* random erasing, Zhong et al. (AAAI 2020), "Random Erasing Data Augmentation": one box per
  image, as a broadcast row-and-column mask (`erasing_boxes`, `erase`).
* mixup, Zhang et al. (ICLR 2018), "mixup: Beyond Empirical Risk Minimization", and CutMix,
  Yun et al. (ICCV 2019), "CutMix: Regularization Strategy to Train Strong Classifiers with
  Localizable Features": one lam per batch, each image paired with its mirror in the
  (already shuffled) batch, labels mixed by the same lam (`Mixer`), as timm's batch mode does.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

ERASE_RATIO = (0.3, 1 / 0.3)    # aspect ratio (h / w) of an erased box: log-uniform in this range (the paper's)
MIX_SALT = 0x6D6978             # keeps the mixer's per-step generator apart from the data's per-epoch one


def random_crop_flip(x: Tensor, padding: int, dy: Tensor, dx: Tensor, flip: Tensor | None) -> Tensor:
    """Crop each image at offset (dy, dx) of its zero-padded self, mirrored where `flip`; one gather.

    x: (B, C, H, W); dy, dx: (B,) ints in [0, 2 * padding]; flip: (B,) bool or None.
    Mirroring the crop is reading its columns right to left, so flip costs no extra pass.
    """
    b, c, h, w = x.shape
    if not padding:  # flip only: selecting from the batch and its mirror beats the gather 5x (CPU, 128x1x28x28)
        return x if flip is None else torch.where(flip[:, None, None, None], x.flip(-1), x)
    x = F.pad(x, (padding, padding, padding, padding))
    rows = dy[:, None] + torch.arange(h, device=x.device)                  # (B, H)
    cols = torch.arange(w, device=x.device).expand(b, w)
    if flip is not None:
        cols = torch.where(flip[:, None], w - 1 - cols, cols)
    cols = cols + dx[:, None]                                              # (B, W)
    return x[torch.arange(b, device=x.device)[:, None, None, None],
             torch.arange(c, device=x.device)[None, :, None, None],
             rows[:, None, :, None], cols[:, None, None, :]]


def rotate(x: Tensor, degrees: Tensor) -> Tensor:
    """Rotate each image about its centre by `degrees` (B,), counter-clockwise as seen; float out.

    The grid is built in normalized [-1, 1] coordinates, so on a non-square image the rotation
    is corrected by the aspect ratio to stay a rotation in pixels. Corners that come from
    outside the image are 0 (black, as crop padding is).
    """
    b, c, h, w = x.shape
    rad = degrees.to(device=x.device, dtype=torch.float32) * (math.pi / 180)
    cos, sin, zero = rad.cos(), rad.sin(), torch.zeros_like(rad)
    # output pixel (u, v) reads input pixel R(rad) (u, v): the content turns by -rad in y-down
    # image coordinates, i.e. counter-clockwise on screen
    theta = torch.stack([torch.stack([cos, -sin * (h / w), zero], 1),
                         torch.stack([sin * (w / h), cos, zero], 1)], 1)   # (B, 2, 3)
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def erasing_boxes(area: Tensor, log_ratio: Tensor, position: Tensor, h: int, w: int) -> Tensor:
    """(4, B) long: top, left, height, width of one box per image, from uniform draws.

    area: (B,) fraction of the image; log_ratio: (B,) log of the aspect ratio h / w;
    position: (2, B) in [0, 1), placing the box uniformly where it fits. A box taller or wider
    than the image is cut to it (the paper redraws instead; this keeps it one batched pass).
    """
    pixels = area * (h * w)
    ratio = log_ratio.exp()
    bh = (pixels * ratio).sqrt().round().clamp(1, h)
    bw = (pixels / ratio).sqrt().round().clamp(1, w)
    top = (position[0] * (h - bh + 1)).floor().clamp(max=h - bh)
    left = (position[1] * (w - bw + 1)).floor().clamp(max=w - bw)
    return torch.stack([top, left, bh, bw]).long()


def erase(x: Tensor, boxes: Tensor, apply: Tensor, value: Tensor | float = 0.0) -> Tensor:
    """Replace each image's box (from `erasing_boxes`) by `value` where `apply` (B,) is true.

    value: a scalar (0 after normalization is the dataset mean) or a tensor shaped like x
    (e.g. noise). The mask is built by broadcasting rows (B, H) against columns (B, W).
    """
    b, c, h, w = x.shape
    top, left, bh, bw = boxes
    rows = torch.arange(h, device=x.device)[None]
    cols = torch.arange(w, device=x.device)[None]
    in_rows = (rows >= top[:, None]) & (rows < (top + bh)[:, None])                 # (B, H)
    in_cols = (cols >= left[:, None]) & (cols < (left + bw)[:, None])               # (B, W)
    mask = (in_rows[:, :, None] & in_cols[:, None, :] & apply[:, None, None])[:, None]   # (B, 1, H, W)
    return torch.where(mask, torch.as_tensor(value, dtype=x.dtype, device=x.device), x)


def gaussian_blur(x: Tensor, sigma: Tensor, max_sigma: float | None = None) -> Tensor:
    """Blur each image with its own Gaussian of std `sigma` (B,) pixels; sigma 0 leaves it as it was.

    Separable: one horizontal and one vertical depthwise convolution over all images at once
    (each image-channel is its own group, so every image gets its own kernel), reflect-padded
    so the borders do not darken. The kernel spans 3 sigma of `max_sigma` (the config's largest: a
    fixed size, and no read of `sigma` from the device on the training step), else of the batch's widest.
    """
    b, c, h, w = x.shape
    x = x.float()
    smax = max_sigma if max_sigma is not None else (float(sigma.max()) if sigma.numel() else 0.0)
    if smax <= 0:
        return x
    radius = max(1, min(math.ceil(3 * smax), (min(h, w) - 1)))
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    s = sigma.to(device=x.device, dtype=torch.float32).clamp(min=1e-6)[:, None]
    k = torch.exp(-0.5 * (taps[None] / s) ** 2)
    k = torch.where(sigma.to(x.device)[:, None] > 0, k, (taps[None] == 0).float())   # sigma 0: the identity
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)                          # (B*C, 2r+1)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def add_noise(x: Tensor, std: Tensor, noise: Tensor) -> Tensor:
    """x + std (B,) * noise (N(0, 1), shaped like x), clamped to the pixel range [0, 255]; std 0: unchanged."""
    return (x.float() + std.to(x.device, torch.float32)[:, None, None, None] * noise).clamp(0, 255)


def brightness_contrast(x: Tensor, brightness: Tensor, contrast: Tensor) -> Tensor:
    """Per image: scale contrast about the image's mean grey, then brightness; factors (B,), 1 is the identity.

    As torchvision's ColorJitter does (contrast blends with the mean of the grey image, brightness
    blends with black), on pixel values in [0, 255], clamped to it.
    """
    x = x.float()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    c = contrast.to(x.device, torch.float32)[:, None, None, None]
    bri = brightness.to(x.device, torch.float32)[:, None, None, None]
    return ((x - mean) * c + mean).mul(bri).clamp(0, 255)


def cutmix_box(lam: float, h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a box of about (1 - lam) of the image, centred anywhere; cut at the borders."""
    cut = math.sqrt(1.0 - lam)
    bh, bw = round(h * cut), round(w * cut)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    top, left = cy - bh // 2, cx - bw // 2
    return max(top, 0), min(top + bh, h), max(left, 0), min(left + bw, w)


class Mixer:
    """Mixup and CutMix of a batch with its own mirror image x.flip(0), and of the labels with them.

    Each step draws from a generator seeded by (seed, epoch, step): whether the batch is mixed
    (`prob`), then, with both methods on, CutMix with `switch_prob` else mixup, and lam ~
    Beta(alpha, alpha). CutMix pastes the partner's box and sets lam to the exact share of
    pixels kept. The batch order is already random, so pairing image i with image B-1-i is a
    random pairing that costs no permutation.

    Targets come back as (B, K) probabilities, lam·onehot(y) + (1-lam)·onehot(y.flip(0));
    cross-entropy with `label_smoothing` on them equals lam·CE(y) + (1-lam)·CE(y.flip(0)), each
    smoothed (CE is linear in its target). An unmixed batch returns its integer labels.
    """

    def __init__(self, num_classes: int, *, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 prob: float = 1.0, switch_prob: float = 0.5, seed: int = 0):
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob, self.seed = prob, switch_prob, seed

    @classmethod
    def from_config(cls, opts, num_classes: int, seed: int) -> "Mixer | None":
        """The mixer a compress.config.OptimConfig asks for, or None when mixing is off."""
        if not (opts.mixup_alpha or opts.cutmix_alpha) or not opts.mix_prob:
            return None
        return cls(num_classes, mixup_alpha=opts.mixup_alpha, cutmix_alpha=opts.cutmix_alpha,
                   prob=opts.mix_prob, switch_prob=opts.mix_switch_prob, seed=seed)

    def params(self, epoch: int, step: int, h: int, w: int) -> tuple[float, tuple[int, int, int, int] | None]:
        """(lam, CutMix box or None) for one step; lam 1.0: leave the batch alone."""
        rng = np.random.default_rng([k % 2**64 for k in (self.seed, epoch, step, MIX_SALT)])
        if rng.random() >= self.prob:
            return 1.0, None
        cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or rng.random() < self.switch_prob)
        alpha = self.cutmix_alpha if cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        if not cutmix:
            return lam, None
        top, bottom, left, right = box = cutmix_box(lam, h, w, rng)
        return 1.0 - (bottom - top) * (right - left) / (h * w), box

    def __call__(self, x: Tensor, y: Tensor, epoch: int, step: int) -> tuple[Tensor, Tensor]:
        """(mixed images, (B, K) mixed targets), or (x, y) unchanged when this step does not mix."""
        lam, box = self.params(epoch, step, x.shape[-2], x.shape[-1])
        if lam >= 1.0:
            return x, y
        partner = x.flip(0)
        if box is None:
            x = x * lam + partner * (1.0 - lam)
        else:
            top, bottom, left, right = box
            x = x.clone()
            x[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
        one_hot = F.one_hot(y, self.num_classes).float()
        return x, one_hot * lam + one_hot.flip(0) * (1.0 - lam)


def resized_crop_boxes(n: int, h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float],
                       g: torch.Generator) -> Tensor:
    """(4, n) float64: top, left, height, width of one random-resized-crop box per image (torchvision's rule).

    As torchvision's RandomResizedCrop.get_params, batched: up to 10 tries of an area share in `scale` and a
    log-uniform aspect ratio (width / height) in `ratio`; the first box that fits is placed uniformly; an image
    with none falls back to its centre, as large as `ratio` allows.
    """
    tries = 10
    area = torch.empty(n, tries, dtype=torch.float64).uniform_(*scale, generator=g) * (h * w)
    aspect = torch.empty(n, tries, dtype=torch.float64).uniform_(*map(math.log, ratio), generator=g).exp()
    bw, bh = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    fits = (bw > 0) & (bw <= w) & (bh > 0) & (bh <= h)
    first = fits.to(torch.int64).argmax(1, keepdim=True)
    bw, bh = bw.gather(1, first)[:, 0], bh.gather(1, first)[:, 0]
    position = torch.rand(2, n, generator=g, dtype=torch.float64)
    top, left = (position[0] * (h - bh + 1)).floor(), (position[1] * (w - bw + 1)).floor()
    # Fallback: the whole image, cut to the nearest allowed aspect ratio, centred.
    fw, fh = float(w), float(h)
    if w / h < min(ratio):
        fh = float(round(w / min(ratio)))
    elif w / h > max(ratio):
        fw = float(round(h * max(ratio)))
    none = ~fits.any(1)
    bw, bh = bw.where(~none, torch.full_like(bw, fw)), bh.where(~none, torch.full_like(bh, fh))
    top = top.where(~none, torch.full_like(top, (h - fh) // 2))
    left = left.where(~none, torch.full_like(left, (w - fw) // 2))
    return torch.stack([top, left, bh, bw])


def resized_crop(x: Tensor, boxes: Tensor, out_h: int, out_w: int) -> Tensor:
    """Crop each image to its box (4, B: top, left, height, width in pixels) and resize it to (out_h, out_w).

    One `affine_grid` + `grid_sample` (bilinear, edges clamped) for the batch; float out. A box that
    covers the whole image at the same size returns the image unchanged (pixel centres are sampled).
    """
    b, c, h, w = x.shape
    top, left, bh, bw = boxes.to(device=x.device, dtype=torch.float32)
    zero = torch.zeros_like(top)
    theta = torch.stack([torch.stack([bw / w, zero, (2 * left + bw) / w - 1], 1),
                         torch.stack([zero, bh / h, (2 * top + bh) / h - 1], 1)], 1)   # (B, 2, 3)
    grid = F.affine_grid(theta, [b, c, out_h, out_w], align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
