"""Rendering an analysis (and any table) as text, markdown, CSV or JSON."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from typing import List, Sequence, Tuple

from cnn_jax.analysis.results import Analysis, LayerInfo

FORMATS = ("table", "markdown", "csv", "json")

# --------------------------------------------------------------------------------------------
# Formatting.

_COLUMNS = ("layer", "kind", "output", "params", "MACs", "RF", "jump", "start")


def _axes_str(values: Tuple[float, ...]) -> str:
    if not values:
        return "-"
    if all(v == values[0] for v in values):
        return f"{values[0]:g}"
    return "x".join(f"{v:g}" for v in values)


def _row_cells(r: LayerInfo, raw: bool = False) -> List[str]:
    shape = "x".join(map(str, r.output_shape[1:])) if r.output_shape else "-"
    number = str if raw else "{:,}".format
    return [r.name, r.kind, shape, number(r.params), number(r.macs), _axes_str(r.rf_size),
            _axes_str(r.rf_jump), _axes_str(r.rf_start)]


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], fmt: str) -> str:
    """Plain aligned text, GitHub markdown or CSV for a list of string rows."""
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        return buf.getvalue()
    numeric = [i > 0 and any(r[i] not in ("", "-") for r in rows)
               and all(re.fullmatch(r"[-\d,.x]+[KMG]?|-|", r[i]) for r in rows)
               for i in range(len(header))]
    if fmt == "markdown":
        right = numeric
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join("---:" if r else "---" for r in right) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines) + "\n"
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells):
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(cells, widths, numeric)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep] + [line(r) for r in rows]) + "\n"


def format_analysis(analysis: Analysis, fmt: str = "table") -> str:
    """The layer table with totals as ``table``, ``markdown``, ``csv`` or ``json``."""
    t = analysis.totals
    if fmt == "json":
        return json.dumps({
            "model": analysis.model, "input_shape": list(analysis.input_shape),
            "layers": [dataclasses.asdict(r) for r in analysis.layers],
            "totals": {**dataclasses.asdict(t), "flops": t.flops},
            "notes": list(analysis.notes)}, indent=1) + "\n"
    if fmt == "csv":
        total = ["total", "", "", str(t.params), str(t.macs), "", "", ""]
        return render_table(_COLUMNS, [_row_cells(r, raw=True) for r in analysis.layers]
                            + [total], fmt)
    body = render_table(_COLUMNS, [_row_cells(r) for r in analysis.layers], fmt)
    total = ["total", "", "", f"{t.params:,}", f"{t.macs:,}", "", "", ""]
    summary = (f"{analysis.model} on {'x'.join(map(str, analysis.input_shape))}: "
               f"{t.params:,} params ({_human(t.params)}), {t.state:,} other variables, "
               f"{t.macs:,} MACs ({_human(t.macs)}; FLOPs = 2 x MACs = {_human(t.flops)}), "
               f"{t.weight_layers} weight layers, depth {t.depth} (longest weight-layer path)")
    notes = "".join(f"note: {n}\n" for n in analysis.notes)
    if fmt == "markdown":
        return body + "| " + " | ".join(f"**{c}**" if c else "" for c in total) + " |\n\n" + \
            summary + "\n" + notes
    return body + "\n" + summary + "\n" + notes
