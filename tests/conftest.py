"""Suite-wide settings.

Tests train tiny models; with several OpenMP threads on a small shared machine the threads
spin against each other (seen here: 100x slower steps when two processes shared 2 cores).
One thread per test process, inherited by the `compress` subprocesses the tests start.
"""

import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# The CPU fast-path probe cache (compress.fastpath): one per test session, never the user's ~/.cache.
os.environ.setdefault("COMPRESS_FAST_PATH_CACHE", os.path.join(tempfile.mkdtemp(prefix="compress-tests-"),
                                                               "fastpath.json"))

import torch  # noqa: E402  (after the environment is set)

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- shared by test files
# tests/ is a package: test files import these as `from tests.conftest import TinyNet, TINY_DATA`.

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

# The smallest synthetic data a pipeline runs on: a `data:` line to put in a test's YAML.
TINY_DATA = ("data: {dataset: synthetic, synthetic: {num_train: 64, num_test: 16, image_size: 8}, "
             "val_size: 16, batch_size: 16}\n")


class TinyNet(nn.Module):
    """conv-BN-ReLU stem, a depthwise-separable residual block, an optional 1x1 expansion, global pool,
    linear head: every op export, BN folding and quantization meet in real models, in a few thousand weights."""

    def __init__(self, num_classes: int = 4, expand: int | None = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16),
        )
        if expand:
            self.expand = nn.Sequential(nn.Conv2d(16, expand, 1, bias=False), nn.BatchNorm2d(expand), nn.ReLU())
        self.head = nn.Linear(expand or 16, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.block(x))
        if hasattr(self, "expand"):
            x = self.expand(x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))
