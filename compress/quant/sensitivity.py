"""Accuracy-aware INT8: find the layers quantization hurts and keep just those in float.

The idea is partial quantization by per-layer sensitivity (Wu et al. 2020, "Integer Quantization
for Deep Learning Inference"): score each quantized layer one at a time, then leave the most
sensitive ones in float until the accuracy is back within a budget. Our sweep scores a layer by
the validation accuracy of the INT8 model with *that layer alone* in float (everything else
INT8), so the score is the accuracy the layer gives back; then layers are floated greedily in
that order, each step scored on the whole validation split, until the drop against the FP32
model is at most `max_accuracy_drop` (or a cap on float layers is hit: when the loss is spread
thinly over the network, or sits in Q/DQ pairs outside the weighted layers such as residual
adds, floating layer after layer buys noise and ends in an FP32 model with Q/DQ overhead).

The sweep is scored on the validation images where INT8 departs most from FP32 (changed top-1
first, then logit error), the ranking-subset idea of NNCF's accuracy control: on images INT8
already gets right, floating a layer changes nothing, and a random subset of 1000 images
resolves gains of 0.1 points, which is the size of the noise.

Everything happens on the QDQ ONNX graph, for both backends, before the weight
QuantizeLinear nodes are folded into int8 initializers (so each weight is still there in float
behind its Q/DQ pair). Keeping a layer float is two edge rewires: its weight input reads the
float initializer instead of the weight's DequantizeLinear, and its activation input reads the
tensor before the Quantize/Dequantize pair (through Flatten/Reshape-like ops that feed only
this layer). Other consumers of a shared Q/DQ pair keep reading it; the orphaned Q/DQ nodes are
dropped. Why not re-quantize with NNCF's `ignored_scope` or ONNX Runtime's `nodes_to_exclude`:
that is one calibration per candidate; NNCF's own `quantize_with_accuracy_control` is
OpenVINO/ONNX-backend only in NNCF 3.4 (`nncf/quantization/quantize_model.py`), not torch; and
here the graph that is scored is byte for byte the graph that ships.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from compress.onnx_export import constant_values

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Ops that only move or reshape values: an activation's Q/DQ pair may sit before one of these.
PASS_THROUGH = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# A backend that corrects biases for its quantization error (NNCF's fast bias correction) stores the
# uncorrected bias as `<bias initializer><suffix>`: a layer put back in float gets it back.
FLOAT_BIAS_SUFFIX = "__before_bias_correction"


# ----------------------------------------------------------------------------- the graph


@dataclass
class Edge:
    """Input `index` of node number `node` reads a Q/DQ output; `float_tensor` is what was quantized."""

    node: int
    index: int
    float_tensor: str
    scale: np.ndarray | None


@dataclass
class QuantizedLayer:
    """A Conv/Gemm/MatMul whose weight or input activation goes through a Q/DQ pair."""

    name: str                       # the ONNX node name, e.g. /features/features.3/conv/conv.0/Conv
    op: str
    weight: Edge | None
    activation: Edge | None
    weight_shape: tuple[int, ...] | None
    bias: Edge | None = None        # the uncorrected bias to use when this layer is float


def _trace(graph, node_idx: int, index: int, producers: dict, consumers: dict, consts: dict) -> Edge | None:
    """Follow input `index` of a node back to a DequantizeLinear fed by a QuantizeLinear."""
    while True:
        tensor = graph.node[node_idx].input[index]
        if tensor not in producers:
            return None
        p_idx = producers[tensor]
        p = graph.node[p_idx]
        if p.op_type == "DequantizeLinear":
            q = graph.node[producers[p.input[0]]] if p.input[0] in producers else None
            if q is None or q.op_type != "QuantizeLinear":
                return None  # already-folded int8 weight: no float copy left to fall back to
            scale = consts.get(p.input[1])
            return Edge(node_idx, index, q.input[0], None if scale is None else np.asarray(scale, np.float32))
        if p.op_type in PASS_THROUGH and consumers.get(tensor, 0) == 1:
            node_idx, index = p_idx, 0
            continue
        return None


def find_layers(proto) -> list[QuantizedLayer]:
    """Every weighted node with a quantized weight or input, in graph order (weights still unfolded)."""
    graph = proto.graph
    producers = {out: i for i, n in enumerate(graph.node) for out in n.output}
    consumers: dict[str, int] = {}
    for n in graph.node:
        for inp in n.input:
            consumers[inp] = consumers.get(inp, 0) + 1
    for out in graph.output:
        consumers[out.name] = consumers.get(out.name, 0) + 1
    consts = constant_values(graph)
    initializers = {init.name for init in graph.initializer}
    layers = []
    for i, node in enumerate(graph.node):
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2:
            continue
        act = _trace(graph, i, 0, producers, consumers, consts)
        weight = _trace(graph, i, 1, producers, consumers, consts)
        if act is not None and act.float_tensor in initializers:
            act = None
        if weight is not None and weight.float_tensor not in initializers:
            weight = None  # MatMul of two activations: its "weight" is an activation, traced as such below
        if act is None and weight is None:
            continue
        shape = tuple(int(d) for d in consts[weight.float_tensor].shape) if weight else None
        bias = None
        if len(node.input) > 2 and node.input[2] + FLOAT_BIAS_SUFFIX in initializers:
            bias = Edge(i, 2, node.input[2] + FLOAT_BIAS_SUFFIX, None)
        layers.append(QuantizedLayer(node.name or f"{node.op_type}_{i}", node.op_type, weight, act, shape, bias))
    return layers


def keep_float(proto, layers: Iterable[QuantizedLayer]):
    """A copy of `proto` where the given layers read float weights and float inputs (see module doc)."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    for layer in layers:
        for edge in (layer.weight, layer.activation, layer.bias):
            if edge is not None:
                graph.node[edge.node].input[edge.index] = edge.float_tensor
    _drop_dead(graph)
    return out


def _drop_dead(graph) -> None:
    """Remove Q/DQ and Constant nodes whose outputs nothing reads, then unread initializers."""
    while True:
        used = {inp for n in graph.node for inp in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in (*QDQ_OPS, "Constant") and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


# ----------------------------------------------------------------------------- scoring


class Scorer:
    """Scores QDQ graphs with ONNX Runtime on fixed (images, labels), against the FP32 model's logits.

    The images are read from `batches()` on every call rather than held (a val split of large
    images does not fit in host memory twice); the FP32 logits (N x classes) are held.
    """

    def __init__(self, batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
                 fp32_logits: np.ndarray, labels: np.ndarray, threads: int | None = None):
        self.batches = batches
        self.fp32_logits, self.labels = fp32_logits, labels
        self.threads = threads or torch.get_num_threads()
        self.n = len(labels)
        self.fp32_accuracy = self.accuracy(fp32_logits)

    @classmethod
    def of_model(cls, batches, model: Callable[[torch.Tensor], torch.Tensor], threads: int | None = None) -> "Scorer":
        logits, labels = [], []
        with torch.no_grad():
            for x, y in batches():
                logits.append(model(x.cpu()).float().numpy())
                labels.append(y.cpu().numpy())
        return cls(batches, np.concatenate(logits), np.concatenate(labels), threads)

    def subset(self, indices: np.ndarray) -> "Scorer":
        """The same scorer on some of its images (gathered once, in ascending index order)."""
        indices = np.unique(np.asarray(indices, np.int64))
        picked, offset = [], 0
        for x, _ in self.batches():
            local = indices[(indices >= offset) & (indices < offset + len(x))] - offset
            picked.append(x.cpu()[torch.from_numpy(local)])
            offset += len(x)
        images, labels = torch.cat(picked), torch.from_numpy(self.labels[indices])
        step = 256
        batches = lambda: ((images[i:i + step], labels[i:i + step]) for i in range(0, len(labels), step))  # noqa: E731
        return Scorer(batches, self.fp32_logits[indices], self.labels[indices], self.threads)

    def accuracy(self, logits: np.ndarray) -> float:
        return 100.0 * float((logits.argmax(1) == self.labels).mean()) if self.n else float("nan")

    def logits(self, proto) -> np.ndarray:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        session = ort.InferenceSession(proto.SerializeToString(), sess_options=opts,
                                       providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return np.concatenate([session.run(None, {name: x.cpu().numpy()})[0] for x, _ in self.batches()])

    def score(self, logits: np.ndarray) -> dict:
        """accuracy (%), top-1 agreement with FP32 (fraction) and mean squared logit error against FP32."""
        return {"accuracy": self.accuracy(logits),
                "agreement": float((logits.argmax(1) == self.fp32_logits.argmax(1)).mean()),
                "logit_mse": float(((logits - self.fp32_logits) ** 2).mean())}

    def __call__(self, proto) -> dict:
        return self.score(self.logits(proto))


def hardest(scorer: Scorer, int8_logits: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n images where INT8 departs most from FP32: changed top-1 first, then by logit error.

    The idea of NNCF's accuracy control (its ranking subset): on images INT8 already gets like FP32,
    floating a layer changes nothing, so a random subset spends most of its evaluations on noise.
    """
    changed = int8_logits.argmax(1) != scorer.fp32_logits.argmax(1)
    error = ((int8_logits - scorer.fp32_logits) ** 2).mean(1)
    order = np.lexsort((-error, ~changed))  # last key first: changed, then larger error
    return np.sort(order[:n])


# ----------------------------------------------------------------------------- sweep and greedy choice


def sweep(proto, layers: list[QuantizedLayer], scorer: Scorer) -> dict[str, dict]:
    """For each layer: the score of the INT8 graph with that layer alone in float, and its gain."""
    base = scorer(proto)
    out = {}
    for layer in layers:
        s = scorer(keep_float(proto, [layer]))
        out[layer.name] = {"accuracy": s["accuracy"], "gain": s["accuracy"] - base["accuracy"],
                           "logit_mse": s["logit_mse"], "logit_mse_int8": base["logit_mse"]}
    return out


def rank(sensitivity: dict[str, dict]) -> list[str]:
    """Most sensitive first: the most accuracy given back, ties broken by the lowest remaining logit
    error (the layer whose quantization noise the output felt most)."""
    return sorted(sensitivity, key=lambda name: (-sensitivity[name]["gain"], sensitivity[name]["logit_mse"]))


def choose_float(order: list[str], fp32_accuracy: float, max_drop: float,
                 accuracy_of: Callable[[list[str]], float], max_layers: int | None = None) -> dict:
    """Float layers in `order`, one more at a time, until fp32_accuracy - accuracy <= max_drop.

    `accuracy_of(names)` scores the graph with `names` in float; at most `max_layers` go float.
    When no prefix meets the limit, the prefix with the best accuracy is kept (the fewest layers
    among equals) and `met` is False.
    """
    limit = len(order) if max_layers is None else min(max_layers, len(order))
    steps = [{"float": [], "accuracy": accuracy_of([])}]
    met = fp32_accuracy - steps[0]["accuracy"] <= max_drop + 1e-9
    while not met and len(steps) <= limit:
        names = order[:len(steps)]
        steps.append({"float": names, "accuracy": accuracy_of(names)})
        met = fp32_accuracy - steps[-1]["accuracy"] <= max_drop + 1e-9
    best = steps[-1] if met else max(steps, key=lambda s: (s["accuracy"], -len(s["float"])))
    return {"kept_float": list(best["float"]), "accuracy": best["accuracy"], "met": met,
            "steps": [{"layers_float": len(s["float"]), "added": s["float"][-1] if s["float"] else None,
                       "accuracy": s["accuracy"]} for s in steps]}


@dataclass
class Decision:
    """What `accuracy_aware` decided, and the scores it decided on."""

    fp32_accuracy: float
    int8_accuracy: float                 # every layer INT8
    max_accuracy_drop: float | None
    max_float_layers: int                # the cap on float layers (max_float_fraction of them)
    images: int                          # val images scored
    final: dict                          # score of the graph that ships: accuracy, agreement, logit_mse
    kept_float: list[str] = field(default_factory=list)   # layers that ship in float, in the order floated
    sensitivity: dict[str, dict] | None = None   # the sweep per layer (None: no sweep ran)
    greedy: list[dict] | None = None     # the greedy steps (None: none ran)
    target_met: bool | None = None       # None: no max_accuracy_drop
    sweep_reason: str | None = None      # why the sweep ran, or did not
    sweep_images: int | None = None      # the hardest images the sweep scored on


def accuracy_aware(proto, layers: list[QuantizedLayer], scorer: Scorer, *, max_drop: float | None,
                   sweep_images: int | None = None, max_float_fraction: float = 1.0, always_sweep: bool = False,
                   log: Callable[[str], None] = print) -> Decision:
    """Decide which layers stay float (see the module doc). `scorer` holds the whole val split; the sweep
    runs on its `sweep_images` hardest images."""
    start = time.perf_counter()
    int8_logits = scorer.logits(proto)
    first = scorer.score(int8_logits)
    result = Decision(fp32_accuracy=scorer.fp32_accuracy, int8_accuracy=first["accuracy"], max_accuracy_drop=max_drop,
                      max_float_layers=max(1, int(max_float_fraction * len(layers))), images=scorer.n, final=first)
    drop = scorer.fp32_accuracy - first["accuracy"]
    needed = max_drop is not None and drop > max_drop + 1e-9
    if max_drop is not None:
        result.target_met = not needed
    if not (needed or always_sweep) or not layers:
        result.sweep_reason = ("no quantized layers" if not layers else "max_accuracy_drop not set"
                               if max_drop is None else f"the drop ({drop:.2f} points) is within max_accuracy_drop")
        return result
    n = scorer.n if sweep_images is None else min(sweep_images, scorer.n)
    sweep_scorer = scorer if n == scorer.n else scorer.subset(hardest(scorer, int8_logits, n))
    result.sweep_images = n
    result.sensitivity = sweep(proto, layers, sweep_scorer)
    order = rank(result.sensitivity)
    log(f"sensitivity sweep: {len(layers)} layers on the {n} val images where INT8 departs most from FP32, in "
        f"{time.perf_counter() - start:.1f} s; most sensitive: "
        + ", ".join(f"{name} (+{result.sensitivity[name]['gain']:.2f})" for name in order[:3]))
    if not needed:
        result.sweep_reason = "asked for (sensitivity_sweep)"
        return result
    by_name = {layer.name: layer for layer in layers}
    scores = {(): first}

    def accuracy_of(names: list[str]) -> float:
        if tuple(names) not in scores:
            scores[tuple(names)] = scorer(keep_float(proto, [by_name[n] for n in names]))
        return scores[tuple(names)]["accuracy"]

    greedy = choose_float(order, scorer.fp32_accuracy, max_drop, accuracy_of, result.max_float_layers)
    result.kept_float, result.final = greedy["kept_float"], scores[tuple(greedy["kept_float"])]
    result.greedy, result.target_met = greedy["steps"], greedy["met"]
    result.sweep_reason = f"the drop ({drop:.2f} points) exceeded max_accuracy_drop"
    return result


# ----------------------------------------------------------------------------- the per-layer report


def _scale_summary(scale: np.ndarray | None) -> dict | None:
    if scale is None:
        return None
    s = np.asarray(scale, np.float64).ravel()
    return {"n": int(s.size), "min": float(s.min()), "median": float(np.median(s)), "max": float(s.max())}


def layer_rows(layers: list[QuantizedLayer], decision: Decision) -> list[dict]:
    sens = decision.sensitivity or {}
    kept = set(decision.kept_float)
    return [{"name": layer.name, "op": layer.op, "weight_shape": list(layer.weight_shape or []) or None,
             "weight_scale": _scale_summary(layer.weight.scale if layer.weight else None),
             "activation_scale": _scale_summary(layer.activation.scale if layer.activation else None),
             "sensitivity": sens.get(layer.name), "kept_float": layer.name in kept}
            for layer in layers]


def _fmt_scale(s: dict | None) -> str:
    if s is None:
        return "-"
    if s["n"] == 1:
        return f"{s['min']:.3g}"
    return f"{s['min']:.3g} / {s['median']:.3g} / {s['max']:.3g} ({s['n']} ch)"


def render_markdown(summary: dict, rows: list[dict]) -> str:
    d = summary
    acc = lambda v: "-" if v is None else f"{v:.2f}%"  # noqa: E731
    lines = [f"# INT8 layers: {d['stage']}", "",
             f"Backend **{d['backend']}** ({d['method']}), calibrated on {d['calibration_images']} "
             f"{d['calibration_split']} images (seed {d['calibration_seed']}). Accuracies are top-1 on "
             f"{d['images']} {d['eval_split']} images.", "",
             "| | |", "|---|---|",
             f"| FP32 parent | {acc(d['fp32_accuracy'])} |",
             f"| INT8, every layer quantized | {acc(d['int8_accuracy'])} |",
             f"| shipped ({len(d['kept_float'])} layer(s) kept float) | {acc(d['final_accuracy'])} |",
             f"| max_accuracy_drop | {'-' if d['max_accuracy_drop'] is None else d['max_accuracy_drop']} |",
             f"| target met | {'-' if d['target_met'] is None else ('yes' if d['target_met'] else 'NO')} |", ""]
    if d["sweep_ran"]:
        lines += [f"Sensitivity sweep ({d['sweep_reason']}): each layer alone kept float, every other layer INT8, "
                  f"scored on the {d['sweep_images']} val images where INT8 departs most from FP32 (changed top-1 "
                  f"first, then logit error), so accuracies in the table are on those hard images; *gain* is the "
                  f"accuracy that layer gives back there. Layers were floated in the order of the gain (ties: "
                  f"lower logit MSE first), at most {d.get('max_float_layers')} of them, each step scored on the "
                  f"whole val split.", ""]
    else:
        lines += [f"No sensitivity sweep ran ({d['sweep_reason']}).", ""]
    lines += ["| # | layer | op | weight scale min / median / max | input scale | acc. with it float | gain (points) "
              "| logit MSE with it float | kept float |", "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        s = r["sensitivity"]
        cells = [str(i), f"`{r['name']}`", r["op"], _fmt_scale(r["weight_scale"]), _fmt_scale(r["activation_scale"]),
                 acc(s["accuracy"]) if s else "-", f"{s['gain']:+.2f}" if s else "-",
                 f"{s['logit_mse']:.3g}" if s else "-", "**yes**" if r["kept_float"] else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    if d.get("greedy"):
        lines += ["", "Greedy steps: " + "; ".join(
            f"{s['layers_float']} float -> {s['accuracy']:.2f}%" for s in d["greedy"])]
    return "\n".join(lines) + "\n"


def write_layer_report(stage_dir: Path, summary: dict, rows: list[dict]) -> tuple[Path, Path]:
    from compress.io import atomic_write_json, atomic_write_text

    json_path = atomic_write_json(Path(stage_dir) / "layers.json", {**summary, "layers": rows})
    md_path = atomic_write_text(Path(stage_dir) / "layers.md", render_markdown(summary, rows))
    return json_path, md_path
