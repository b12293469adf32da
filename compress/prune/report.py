"""The per-layer table of a pruned model: layers.json and layers.md."""

from __future__ import annotations

from pathlib import Path


def write_layer_report(layers: list[dict], directory: Path, title: str = "Pruned layers") -> tuple[Path, Path]:
    """``layers.json`` (the rows of ``prune_model(...)["layers"]``) and ``layers.md`` (a table of them)."""
    from compress.io import atomic_write_json, atomic_write_text

    def pct(after: int, before: int) -> str:
        return f"{100 * after / before:.0f}%" if before else "-"

    lines = [f"# {title}", "",
             "| layer | type | out channels | in channels | MACs before | MACs after | MACs kept |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in layers:
        lines.append(f"| `{r['name']}` | {r['type']} | {r['out_before']} -> {r['out_after']} | "
                     f"{r['in_before']} -> {r['in_after']} | {r['macs_before']:,} | {r['macs_after']:,} | "
                     f"{pct(r['macs_after'], r['macs_before'])} |")
    macs_before = sum(r["macs_before"] for r in layers)
    macs_after = sum(r["macs_after"] for r in layers)
    lines += [f"| **all conv/linear** | | | | {macs_before:,} | {macs_after:,} | {pct(macs_after, macs_before)} |",
              "", "MACs of one image through each layer (BatchNorm, activations and pooling not included).", ""]
    directory = Path(directory)
    return (atomic_write_json(directory / "layers.json", {"layers": layers}),
            atomic_write_text(directory / "layers.md", "\n".join(lines)))
