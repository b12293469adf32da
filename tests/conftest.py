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
