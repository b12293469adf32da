"""Write <arch>.json: torchvision's state-dict keys and shapes, and its logits on seeded weights.

Made from torchvision's own model sources, not from compress's models. torchvision does not
import next to the CPU torch used here (its compiled ops do not match), so its model files
are imported on their own, from the wheel, with the package __init__ files left empty:

    pip download torchvision==0.29.1 --no-deps -d /tmp/tv && cd /tmp/tv && unzip -q torchvision-*.whl
    mkdir -p stub/torchvision/{models,ops,transforms}
    touch stub/torchvision/__init__.py stub/torchvision/{models,ops,transforms}/__init__.py
    cp torchvision/{_utils,utils,_internally_replaced_utils}.py stub/torchvision/
    cp torchvision/ops/misc.py stub/torchvision/ops/
    cp torchvision/models/{resnet,mobilenetv2,mobilenetv3,shufflenetv2,_api,_meta,_utils}.py stub/torchvision/models/
    printf 'class ImageClassification:\n    def __init__(self, *a, **k): pass\n' > stub/torchvision/transforms/_presets.py
    PYTHONPATH=/tmp/tv/stub python tests/data/torchvision_keys/generate.py

(`_presets.ImageClassification` is only named in the weights' metadata; no model code calls it.)
Each file holds `keys` (name -> shape, 1000 classes: what a published checkpoint has) and a
forward check: torchvision's model built for 10 classes, given `synthetic_weights(seed 0)`,
evaluated on a seeded 2x3x64x64 input, its logits in `logits`.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

ARCHS = {"resnet18": "resnet", "resnet34": "resnet", "resnet50": "resnet", "mobilenet_v2": "mobilenetv2",
         "mobilenet_v3_small": "mobilenetv3", "mobilenet_v3_large": "mobilenetv3",
         "shufflenet_v2_x0_5": "shufflenetv2", "shufflenet_v2_x1_0": "shufflenetv2"}
INPUT = (2, 3, 64, 64)
TORCHVISION = "0.29.1"  # the wheel the sources came from


def synthetic_weights(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded weights for the given keys (sorted order), scaled so a deep net's activations stay finite."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        shape = shapes[key]
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(0)
            continue
        n = torch.randn(shape, generator=g)
        if key.endswith("running_var"):
            out[key] = 1 + 0.1 * n.abs()
        elif key.endswith("running_mean") or key.endswith("bias"):
            out[key] = 0.1 * n
        elif len(shape) == 1:  # a norm layer's scale
            out[key] = 1 + 0.1 * n
        else:                  # conv / linear: He init keeps the scale through depth
            fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
            out[key] = n * (2 / fan_in) ** 0.5
    return out


def input_batch(seed: int = 0) -> torch.Tensor:
    return torch.randn(INPUT, generator=torch.Generator().manual_seed(seed))


def main() -> None:
    import torchvision  # noqa: F401  (the stub package above)

    here = Path(__file__).parent
    for arch, module in ARCHS.items():
        build = getattr(importlib.import_module(f"torchvision.models.{module}"), arch)
        keys = {k: list(v.shape) for k, v in build(num_classes=1000).state_dict().items()}
        model = build(num_classes=10).eval()
        model.load_state_dict(synthetic_weights({k: list(v.shape) for k, v in model.state_dict().items()}))
        with torch.no_grad():
            logits = model(input_batch())
        doc = {"source": f"torchvision {TORCHVISION} torchvision/models/{module}.py, {arch}()",
               "made_by": "tests/data/torchvision_keys/generate.py (see its docstring)",
               "keys": keys, "logits_10_classes": logits.tolist()}
        (here / f"{arch}.json").write_text(json.dumps(doc, indent=1) + "\n")
        print(arch, len(keys), "keys")


if __name__ == "__main__":
    main()
