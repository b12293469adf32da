"""Export stage: every PyTorch artifact also becomes `model.onnx`, checked against PyTorch on test
images (the exporter and the parity check are in compress.onnx_export).
"""

from __future__ import annotations

from compress.config import ExportConfig
from compress.context import Artifact, Context
from compress.onnx_export import check_parity, export_onnx


def run(cfg: ExportConfig, ctx: Context) -> Artifact:
    """Export the stage's PyTorch model (`ctx.artifact`) to `model.onnx` and record its parity on test images."""
    artifact = ctx.artifact
    if artifact.path("model") is None:
        return artifact  # already ONNX (quantize writes its own QDQ model)
    model = ctx.load_model(artifact).eval()
    path = export_onnx(model, ctx.stage_dir / "model.onnx", ctx.input_shape(), opset=cfg.opset)
    images, _ = ctx.data.images("test", cfg.parity_images)
    parity = check_parity(model, path, images.cpu())
    artifact.files["onnx"] = str(path)
    artifact.metrics["onnx_parity"] = parity
    ctx.log(f"[{ctx.stage_name}] ONNX {path.name}: max |diff| {parity['max_abs_diff']:.2e}, "
            f"top-1 agreement {parity['top1_agreement'] * 100:.1f}% on {parity['n']} test images")
    return artifact
