"""pytest plugin for `make gpu-check`: run only the tests that skip without a GPU.

A test belongs to the GPU set when one of its skip conditions names CUDA, a GPU or TensorRT
("needs a CUDA GPU", "needs tensorrt and a CUDA GPU"); tests that skip *because* a GPU is present
("tensorrt and a GPU are present") are CPU tests. Selected from the markers, so a new GPU test
is in the check the day it is written. `pytest -p gpu_tests` with scripts/ on PYTHONPATH.
"""

from __future__ import annotations

import re

GPU_REASON = re.compile(r"cuda|gpu|tensorrt|nccl", re.I)
CPU_ONLY = re.compile(r"\bpresent\b|without a gpu|no gpu", re.I)


def is_gpu_test(item) -> bool:
    for mark in item.iter_markers("skipif"):
        reason = str(mark.kwargs.get("reason", ""))
        if GPU_REASON.search(reason) and not CPU_ONLY.search(reason):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    keep = [i for i in items if is_gpu_test(i)]
    drop = [i for i in items if not is_gpu_test(i)]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
