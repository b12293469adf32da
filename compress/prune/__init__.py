"""Structured pruning: Torch-Pruning's dependency graph driven to a measured budget (MACs, params, latency).

A small surface, after Torch-Pruning's own: `prune_model(model, example_inputs, target=..., ratio=...)`
prunes in place and returns what changed; `latency_probe` gives a latency budget its clock;
`write_layer_report` writes the per-layer table. See `depgraph` for the papers and the pitfalls.
"""

from compress.prune.depgraph import (IMPORTANCES, TARGETS, bn_l1, bn_scales, check_batchnorm, layer_table,
                                     prune_model)
from compress.prune.latency import LATENCY_ITERS, latency_probe
from compress.prune.report import write_layer_report

__all__ = ["IMPORTANCES", "LATENCY_ITERS", "TARGETS", "bn_l1", "bn_scales", "check_batchnorm", "latency_probe",
           "layer_table", "prune_model", "write_layer_report"]
