"""Several processes, one pipeline: PyTorch DDP under `torchrun` (or `compress run --nproc N`), on one node or several.

Every process runs the pipeline runner. Stages that train (train, distill, the fine-tune after
prune) run in all of them: `training.fit` wraps the model in DistributedDataParallel and each
process takes its share of every batch, so the global batch and the learning rate mean what
they mean in one process. Everything else (quantize, export, engines, benchmark, report) runs
in rank 0 while the others wait; only rank 0 writes files and logs. Backends: NCCL on CUDA
(one GPU per process, `cuda:LOCAL_RANK`), gloo on CPU.

A process started without torchrun's environment (WORLD_SIZE unset or 1) is a world of one,
and every function here is then a no-op, so single-process code paths never change.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

_training = False   # True inside `training_stage()`: fit() may wrap the model in DDP


def launch(nproc: int, args: list[str], *, nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None,
           rdzv_backend: str = "static", rdzv_id: str = "none") -> int:
    """Run `compress ARGS` in `nproc` processes the way torchrun does; 0, or the first failed worker's exit code.

    The workers inherit this terminal (progress bars and the one-line errors are theirs); a
    failed worker makes the launcher stop the others.

    Several nodes (`nnodes` > 1): every node runs this with the same `rdzv_endpoint` (HOST:PORT on
    node 0) and its own `node_rank`, as `torchrun --nnodes N --node-rank R --rdzv-endpoint HOST:PORT`
    does. The default backend is torchrun's, "static": node R's processes get global ranks
    R * nproc ..., so rank 0 (the one that writes the run directory and report) is on node 0.
    "c10d" lets nodes join in any order and assigns node ranks itself.
    """
    import logging
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    if nnodes == 1 and rdzv_endpoint is None:  # one node: a private rendezvous on a free local port
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                              rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                              monitor_interval=0.5)
    else:
        config = LaunchConfig(min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=nproc, run_id=rdzv_id,
                              rdzv_backend=rdzv_backend, rdzv_endpoint=rdzv_endpoint or "localhost:29400",
                              rdzv_configs={"rank": node_rank} if rdzv_backend == "static" else {},
                              max_restarts=0, monitor_interval=0.5)
    os.environ["OMP_NUM_THREADS"] = threads  # torchrun's default is 1; share the cores out instead
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "compress", *args)
    except ChildFailedError as exc:
        first = exc.get_first_failure()[1]
        return first.exitcode if first.exitcode and first.exitcode > 0 else 1
    return 0


def launched() -> bool:
    """Was this process started by torchrun with more than one process?"""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Rank 0 (or no torchrun at all), known before the process group is joined."""
    return int(os.environ.get("RANK", "0")) == 0


def init(device: torch.device) -> torch.device:
    """Join the process group torchrun set up; return this process's device (cuda:LOCAL_RANK on GPU)."""
    if not launched() or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
    return device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def broadcast(value):
    """Rank 0's value of a picklable object, in every process."""
    if world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def training_stage():
    """Mark a stage that trains in every process (fit() uses DDP inside it)."""
    global _training
    previous, _training = _training, world() > 1
    try:
        yield
    finally:
        _training = previous


def data_parallel() -> bool:
    """Should fit() train with DDP here? (more than one process, inside a training stage)"""
    return _training and world() > 1


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place sum (or max) over the processes of a data-parallel fit; a no-op otherwise."""
    if data_parallel():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor
