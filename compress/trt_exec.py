"""Run a serialized TensorRT engine on torch CUDA tensors: compress's one engine runner.

compress.trt.TrtRunner checks an engine against its sidecar manifest, then runs it through
`EngineExec`; `compress deploy` ships this file beside infer.py, whose TensorRT branch uses it
too. So it imports nothing from compress: only torch, and tensorrt when an engine is loaded.
"""

from __future__ import annotations

import torch


def torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT8: torch.int8,
             trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool, trt.DataType.UINT8: torch.uint8}
    for name, td in (("BF16", torch.bfloat16), ("INT64", torch.int64)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = td
    if dtype not in table:
        raise TypeError(f"engine I/O type {dtype} has no torch equivalent")
    return table[dtype]


class EngineExec:
    """A deserialized engine with one input and its outputs bound to fresh torch tensors per call.

    data    -- the engine's bytes
    device  -- the CUDA device it runs on
    logger  -- a tensorrt ILogger (its `errors` list, if it has one, goes into the messages)
    name    -- how messages name the engine
    error   -- the exception type raised (compress.trt passes its EngineError)
    """

    def __init__(self, data: bytes, device: torch.device, *, trt=None, logger=None, name: str = "engine",
                 error: type[Exception] = RuntimeError):
        if trt is None:
            import tensorrt as trt
        self.name, self.error, self.device = name, error, torch.device(device)
        self.logger = logger if logger is not None else trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self.runtime = trt.Runtime(self.logger)   # must outlive the engine
            self.engine = self.runtime.deserialize_cuda_engine(data)
            if self.engine is None:
                raise error(f"TensorRT could not deserialize {name}: " + (self._errors() or "no reason given"))
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise error(f"could not create an execution context for {name} (out of GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not self.outputs:
            raise error(f"{name}: expected one input and at least one output, got {names}")
        self.input = inputs[0]
        try:
            self.in_dtype = torch_dtype(trt, self.engine.get_tensor_dtype(self.input))
            self.out_dtypes = {n: torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in self.outputs}
        except TypeError as exc:
            raise error(f"{name}: {exc}") from None
        try:
            lo, _, hi = self.engine.get_tensor_profile_shape(self.input, 0)
            self.batch_range: tuple[int, int] | None = (int(lo[0]), int(hi[0]))
        except AttributeError:  # an older binding: the caller may know the range from elsewhere
            self.batch_range = None

    def _errors(self, last: int | None = None) -> str:
        errors = list(getattr(self.logger, "errors", []))
        return "; ".join(errors[-last:] if last else errors)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the first output, on the GPU, queued on torch's current stream."""
        x = x.to(device=self.device, dtype=self.in_dtype, non_blocking=True).contiguous()
        with torch.cuda.device(self.device):
            ctx = self.context
            if not ctx.set_input_shape(self.input, tuple(x.shape)):
                lo, hi = self.batch_range or ("?", "?")
                raise self.error(f"{self.name}: input shape {tuple(x.shape)} rejected "
                                 f"(expected batch {lo}..{hi} with the exported image size)")
            ctx.set_tensor_address(self.input, x.data_ptr())
            outs = {}
            for name in self.outputs:
                outs[name] = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=self.out_dtypes[name],
                                         device=self.device)
                ctx.set_tensor_address(name, outs[name].data_ptr())
            stream = torch.cuda.current_stream(self.device)
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise self.error(f"{self.name}: execute_async_v3 failed: " + (self._errors(3) or "no reason given"))
            return outs[self.outputs[0]]
