"""The deeper parts of a compare report for people: output metrics, layers, the depth plot.

`_compare.html` assembles the page and the terminal text; this module renders the sections that
come from many batches (`OutputMetrics`) and from forward hooks (`LayerDiff`), including the
per-layer plot: relative difference by depth (A's call order), both refs aligned, as inline SVG.

Example (a local repo whose `mlp(scale)` scales the last layer's weights):
    >>> import torch
    >>> from pathlib import Path
    >>> from isolhub import compare
    >>> Path("mlp").mkdir()
    >>> _ = Path("mlp/hubconf.py").write_text(
    ...     "import torch\\n"
    ...     "def mlp(scale=1.0):\\n"
    ...     "    torch.manual_seed(0)\\n"
    ...     "    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))\\n"
    ...     "    m[2].weight.data *= scale\\n"
    ...     "    return m\\n")
    >>> report = compare("mlp", "mlp", "mlp", source="local", kwargs_b={"scale": 2.0},
    ...                  inputs=torch.ones(1, 4), seed=0, layers=True)
    >>> print("\\n".join(layer_text(report, 40)))
    <BLANKLINE>
    Layers: 3 (2 same, 1 changed)
      first divergence: 2 (Linear 1x2): max|a-b| 0.205, rel 0.596
      #  status   layer A  layer B  A           B           max|a-b|  rel    exact
      0  same     0        0        Linear 1x8  Linear 1x8  0         0      yes
      1  same     1        1        ReLU 1x8    ReLU 1x8    0         0      yes
      2  changed  2        2        Linear 1x2  Linear 1x2  0.205     0.596  yes
    >>> svg = depth_svg(report.layers)
    >>> svg.startswith("<svg")
    True
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .table import table

if TYPE_CHECKING:
    from .report import CompareReport, LayerDiff, OutputMetrics

__all__ = [
    "LAYER_HEADERS",
    "METRIC_HEADERS",
    "depth_svg",
    "divergence_text",
    "layer_counts",
    "layer_rows",
    "layer_text",
    "metric_rows",
    "metrics_text",
]

_STRUCTURAL = ("reshaped", "added", "removed")
_FLOOR = 18  # pixels under the lowest decade where identical outputs (0) sit


def _f(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return str(x) if not math.isfinite(x) else f"{x:.3g}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _shape(shape: Sequence[int] | None) -> str:
    if shape is None:
        return "-"
    return "x".join(str(d) for d in shape) if len(shape) else "scalar"


def metric_rows(metrics: Sequence[OutputMetrics]) -> list[tuple[str, ...]]:
    return [
        (
            m.name,
            str(m.batches),
            _f(m.max_abs),
            _f(m.mean_abs),
            _pct(m.top1_agreement),
            _f(m.kl_div),
        )
        for m in metrics
    ]


METRIC_HEADERS = ("output", "batches", "max|a-b|", "mean|a-b|", "top-1 agreement", "KL(A‖B)")
LAYER_HEADERS = ("#", "status", "layer A", "layer B", "A", "B", "max|a-b|", "rel", "exact")


def layer_rows(layers: Sequence[LayerDiff]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for i, x in enumerate(layers):
        name_b = x.name_b if x.name_b is not None else ("-" if x.status == "removed" else x.name)
        name_a = "-" if x.status == "added" else x.name
        a = "-" if x.type_a is None else f"{x.type_a} {_shape(x.shape_a)}"
        b = "-" if x.type_b is None else f"{x.type_b} {_shape(x.shape_b)}"
        exact = "-" if x.max_abs is None else "yes" if x.exact else "stats"
        rows.append((str(i), x.status, name_a, name_b, a, b, _f(x.max_abs), _f(x.rel), exact))
    return rows


def divergence_text(rep: CompareReport) -> str:
    """`first divergence: mid (Linear 3x8): max|a-b| 0.31, rel 0.12; then act#2, head`."""
    first = rep.first_divergence
    if first is None:
        return "no layer departs beyond atol/rtol"
    where = f"{first.name}" + (f" → {first.name_b}" if first.name_b != first.name else "")
    what = f"{first.type_a} {_shape(first.shape_a)}"
    if first.status == "reshaped":
        detail = f"reshaped {_shape(first.shape_a)} → {_shape(first.shape_b)}"
    else:
        bound = "" if first.exact else " (at least; statistics)"
        detail = f"max|a-b| {_f(first.max_abs)}{bound}, rel {_f(first.rel)}"
    after = [x.name for x in rep.divergence_path[1:]]
    tail = f"; then {', '.join(after[:8])}{', …' if len(after) > 8 else ''}" if after else ""
    return f"first divergence: {where} ({what}): {detail}{tail}"


def layer_counts(layers: Sequence[LayerDiff]) -> str:
    seen: dict[str, int] = {}
    for x in layers:
        seen[x.status] = seen.get(x.status, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(seen.items(), key=lambda kv: -kv[1]))


def layer_text(rep: CompareReport, max_rows: int) -> list[str]:
    """The terminal's layer section (without the table helper, which the caller passes)."""

    out = [
        "",
        f"Layers: {len(rep.layers)} ({layer_counts(rep.layers)})",
        f"  {divergence_text(rep)}",
    ]
    rows = layer_rows(rep.layers)
    if len(rows) > max_rows:
        keep = [r for r, x in zip(rows, rep.layers, strict=True) if x.status not in ("same",)]
        rows = keep[:max_rows]
    out += table(LAYER_HEADERS, rows)
    hidden = len(rep.layers) - len(rows)
    if hidden:
        out.append(f"  … {hidden} more layers (same, or past {max_rows}): see --json")
    return out


def metrics_text(rep: CompareReport) -> list[str]:

    if not rep.metrics:
        return []
    n = rep.batches
    return [
        "",
        f"Outputs over {n} batch{'es' if n != 1 else ''}:",
        *table(METRIC_HEADERS, metric_rows(rep.metrics)),
    ]


# ----------------------------------------------------------------------------- the depth plot


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def depth_svg(layers: Sequence[LayerDiff], first: LayerDiff | None = None) -> str:
    """Relative difference by depth: one column per aligned layer in call order, log scale.

    Each layer is a `<g class="layer" data-layer=... data-status=... data-rel=...>`: a blue dot
    and stem for a value difference, a grey dot on the floor for an identical output, an orange
    full-height bar for a structural change (added, removed, reshaped); the first divergence is
    marked with a red line and its name. A line joins the dots, so the path of divergence shows.
    """
    n = len(layers)
    left, right, top, bottom = 64, 20, 30, 96
    step = max(6, min(110, 900 // max(n, 1)))
    plot_w = max(step * max(n, 1), 660)
    width, height = left + plot_w + right, top + 200 + bottom
    plot_h = 200
    finite = [x.rel for x in layers if x.rel is not None and 0 < x.rel < math.inf]
    hi = math.ceil(math.log10(max(finite))) if finite else 0
    lo = math.floor(math.log10(min(finite))) if finite else -1
    lo = min(max(lo, hi - 12), hi - 1)

    def y_of(rel: float | None) -> float:
        if rel is None or rel <= 0:
            return top + plot_h
        if rel == math.inf:
            return top
        frac = (math.log10(rel) - lo) / (hi - lo)
        return top + (plot_h - _FLOOR) * (1 - min(1.0, max(0.0, frac)))

    out = [
        f'<svg id="depth-plot" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        'aria-label="relative difference by layer depth" font-family="system-ui,sans-serif" '
        'font-size="11">',
        f'<text x="{left}" y="14" fill="#556">relative difference max|a-b| / max(|a|,|b|) of '
        "each layer's output, by depth (call order), log scale; orange: structural</text>",
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafbfe" '
        'stroke="#e3e6ee"/>',
    ]
    for decade in range(lo, hi + 1, max(1, math.ceil((hi - lo) / 6))):
        y = y_of(10.0**decade)
        out.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#e3e6ee"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#778">1e{decade}</text>'
        )
    out.append(
        f'<text x="{left - 6}" y="{top + plot_h + 3}" text-anchor="end" fill="#778">0</text>'
    )
    points = []
    for i, x in enumerate(layers):
        cx = left + step * i + step / 2
        structural = x.status in _STRUCTURAL
        rel = x.rel if x.rel is not None and not math.isnan(x.rel) else None
        label = x.name if x.status != "added" else f"+ {x.name}"
        label = label if len(label) <= 22 else "…" + label[-21:]
        title = f"{x.name}: {x.status}" + (f", rel {_f(rel)}" if rel is not None else "")
        if x.name_b and x.name_b != x.name:
            title += f" (B: {x.name_b})"
        parts = [
            f'<g class="layer" data-layer="{_e(x.name)}" data-status="{_e(x.status)}" '
            f'data-rel="{_e(rel)}"><title>{_e(title)}</title>'
        ]
        if structural:
            parts.append(
                f'<rect x="{cx - step * 0.3:.1f}" y="{top}" width="{step * 0.6:.1f}" '
                f'height="{plot_h}" fill="#e8892b" opacity="0.55"/>'
            )
        else:
            cy = y_of(rel)
            points.append(f"{cx:.1f},{cy:.1f}")
            color = "#3b6fd8" if rel else "#9aa3b5"
            if x.status in ("changed", "retyped"):
                color = "#c0392b"
            parts.append(
                f'<line x1="{cx:.1f}" y1="{top + plot_h}" x2="{cx:.1f}" y2="{cy:.1f}" '
                f'stroke="{color}" stroke-width="1.5" opacity="0.5"/>'
                f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3.5" fill="{color}"/>'
            )
        ty = top + plot_h + 8
        parts.append(
            f'<text transform="translate({cx + 3:.1f},{ty}) rotate(60)" fill="#334" '
            f'font-family="ui-monospace,monospace">{_e(label)}</text></g>'
        )
        out.append("".join(parts))
    if len(points) > 1:
        out.insert(
            3,
            f'<polyline points="{" ".join(points)}" fill="none" stroke="#3b6fd8" '
            'stroke-width="1" opacity="0.35"/>',
        )
    if first is not None and first in layers:
        cx = left + step * list(layers).index(first) + step / 2
        out.append(
            f'<g id="first-divergence" data-layer="{_e(first.name)}"><line x1="{cx:.1f}" '
            f'y1="{top - 4}" x2="{cx:.1f}" y2="{top + plot_h}" stroke="#c0392b" '
            f'stroke-dasharray="4 3"/><text x="{cx + 4:.1f}" y="{top + 10}" fill="#c0392b" '
            f'font-weight="600">first divergence: {_e(first.name)}</text></g>'
        )
    out.append("</svg>")
    return "".join(out)
