"""A `CompareReport` for people: terminal tables, and one self-contained HTML page.

The page has no scripts and loads nothing (styles inline, the plot inline SVG), so it can be
mailed, attached to a CI run or opened offline. Its plot has one bar per layer, the layer with
the largest difference first: structural changes (added, removed, reshaped) as full bars, value
changes on a log scale of the relative difference max|a-b| / max(|a|,|b|).

Example (`git_repo`: a hub repository whose `net` is a linear layer, wider at v2 than v1):
    >>> import torch
    >>> from isolhub import compare
    >>> report = compare(f"git+file://{git_repo}@v1", f"git+file://{git_repo}@v2", "net",
    ...                  inputs=torch.ones(1, 4), seed=0)
    >>> print(render_text(report))
    isolhub diff  net()  mode=module  seed=0  atol=1e-06  rtol=1e-05
    ...
    >>> page = render_html(report)
    >>> page.startswith("<!DOCTYPE html>"), "<script" in page
    (True, False)
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .table import table

if TYPE_CHECKING:
    from .report import CompareReport, TensorDiff

__all__ = [
    "STRUCTURAL",
    "fmt_float",
    "layer_differences",
    "render_fragment",
    "render_html",
    "render_svg",
    "render_text",
]

STRUCTURAL = ("added", "removed", "reshaped")
_RANK = ("same", "close", "renamed", "changed", "retyped", "removed", "added", "reshaped")
_MAX_BARS = 40


def layer_differences(parameters: Sequence[TensorDiff]) -> list[dict[str, Any]]:
    """Per layer, the largest difference first; see `CompareReport.layer_differences`."""
    layers: dict[str, dict[str, Any]] = {}
    for p in parameters:
        layer = p.name.rpartition(".")[0] or p.name
        if p.status == "renamed" and p.name_b:
            layer = f"{layer} → {p.name_b.rpartition('.')[0] or p.name_b}"
        score = math.inf if p.status in STRUCTURAL else (p.rel or 0.0)
        if math.isnan(score):
            score = math.inf
        entry = layers.setdefault(layer, {"layer": layer, "score": 0.0, "status": "same", "n": 0})
        entry["n"] += 1
        entry["score"] = max(entry["score"], score)
        if _RANK.index(p.status) > _RANK.index(entry["status"]):
            entry["status"] = p.status
    return sorted(
        layers.values(), key=lambda e: (-e["score"], -_RANK.index(e["status"]), e["layer"])
    )


def fmt_float(x: float | None) -> str:
    """Short text for a difference: `0`, `3.2e-07`, `0.0153`, `inf`; `-` for None."""
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return str(x) if not math.isfinite(x) else f"{x:.3g}"


def _shape(shape: Sequence[int] | None) -> str:
    if shape is None:
        return "-"
    return "x".join(str(d) for d in shape) if len(shape) else "scalar"


def _seconds(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def _count(x: int | None) -> str:
    return "-" if x is None else f"{x:,}"


def _verdict(rep: CompareReport) -> str:
    if rep.failed:
        which = " and ".join(s for s, e in (("A", rep.error_a), ("B", rep.error_b)) if e)
        return f"FAILED: {which} could not be loaded and described"
    if rep.equivalent:
        text = f"EQUIVALENT within atol={rep.atol:g}, rtol={rep.rtol:g}"
        if rep.renamed:
            n = len(rep.renamed)
            text += (
                f" ({n} parameter{'s' if n != 1 else ''} renamed: a state dict saved at one ref "
                "needs its keys mapped to load at the other)"
            )
        return text
    n = len(rep.differences)
    return f"DIFFERENT: {n} difference{'s' if n != 1 else ''}"


def _call_text(rep: CompareReport, side: str = "") -> str:
    """`net(pretrained=True)`; with `side` ("a"/"b"), that side's own call."""
    args = rep.args
    kwargs = dict(rep.kwargs)
    if side:
        own = getattr(rep, f"args_{side}")
        args = args if own is None else own
        kwargs.update(getattr(rep, f"kwargs_{side}"))
    return f"{rep.entrypoint}({', '.join([*args, *(f'{k}={v}' for k, v in kwargs.items())])})"


def _per_side(rep: CompareReport) -> bool:
    return bool(rep.args_a is not None or rep.args_b is not None or rep.kwargs_a or rep.kwargs_b)


def _outputs_where(rep: CompareReport) -> str:
    return f"worst over {rep.batches} batches" if rep.batches > 1 else "on the inputs"


def _spread(side: Any) -> str:
    if not side.forwards:
        return "-"
    return (
        f"{_seconds(side.forward_iqr_s)}; {_seconds(side.forward_min_s)}–"
        f"{_seconds(side.forward_max_s)} ({side.forwards} batches)"
    )


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):,.1f} MiB"


def _side_rows(rep: CompareReport) -> list[tuple[str, str, str]]:
    a, b = rep.a, rep.b
    many = max(a.forwards, b.forwards) > 1
    rows = [("spec", a.spec, b.spec)]
    if _per_side(rep):
        rows.append(("call", _call_text(rep, "a"), _call_text(rep, "b")))
    rows += [
        ("commit", (a.sha or "-")[:12], (b.sha or "-")[:12]),
        ("result", a.result_type or "-", b.result_type or "-"),
        ("start (fetch + worker)", _seconds(a.start_s), _seconds(b.start_s)),
        ("load time", _seconds(a.load_s), _seconds(b.load_s)),
        ("forward time" + (" (median)" if many else ""), _seconds(a.forward_s),
         _seconds(b.forward_s)),
    ]  # fmt: skip
    if many:
        rows.append(("forward spread (IQR; min–max)", _spread(a), _spread(b)))
    if a.peak_memory is not None or b.peak_memory is not None:
        rows.append(("peak memory (worker)", _mib(a.peak_memory), _mib(b.peak_memory)))
    rows += [
        ("parameters", _count(a.parameters), _count(b.parameters)),
        ("tensors", _count(a.tensors), _count(b.tensors)),
        ("bytes", _count(a.bytes), _count(b.bytes)),
    ]
    if a.forward_error or b.forward_error:
        rows.append(("forward raised", a.forward_error or "-", b.forward_error or "-"))
    if a.error or b.error:
        rows.append(("error", a.error or "-", b.error or "-"))
    return rows


def _entry_rows(rep: CompareReport) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for e in rep.entrypoints:
        if e.status == "same":
            continue
        what = ", ".join(e.changes) if e.changes else e.status
        rows.append((e.status, e.name, what, e.signature_a or "?", e.signature_b or "?"))
    return rows


def _tensor_row(r: TensorDiff, outputs: bool) -> tuple[str, ...]:
    name = f"{r.name} → {r.name_b}" if r.name_b else r.name
    status = {"added": "only in B", "removed": "only in A"}.get(r.status, r.status)
    a = _shape(r.shape_a) + (f" {r.dtype_a}" if r.dtype_a else "")
    b = _shape(r.shape_b) + (f" {r.dtype_b}" if r.dtype_b else "")
    close = "-" if r.allclose is None else "yes" if r.allclose else "no"
    return (
        status if outputs else r.status,
        name,
        a,
        b,
        fmt_float(r.max_abs),
        fmt_float(r.rel),
        close,
    )


def _counts(rows: Sequence[Any]) -> str:
    seen: dict[str, int] = {}
    for r in rows:
        seen[r.status] = seen.get(r.status, 0) + 1
    order = sorted(seen, key=lambda s: -_RANK.index(s) if s in _RANK else 0)
    return ", ".join(f"{seen[s]} {s}" for s in order) or "none"


# ----------------------------------------------------------------------------- text


def render_text(rep: CompareReport, max_rows: int = 40) -> str:
    """The report as terminal tables; tables list what differs, unchanged rows are counted."""
    out = [
        f"isolhub diff  {_call_text(rep)}  mode={rep.mode}  seed={rep.seed}  "
        f"atol={rep.atol:g}  rtol={rep.rtol:g}",
        f"inputs: {', '.join(rep.inputs) or 'none'}",
        "",
        *table(("", "A", "B"), _side_rows(rep), indent=""),
    ]
    entries = _entry_rows(rep)
    if rep.entrypoints:
        out += ["", f"Entrypoints: {_counts(rep.entrypoints)}"]
        if entries:
            out += table(("status", "name", "what", "signature A", "signature B"), entries)
    if rep.code:
        from .code import stat_text

        out += ["", "Code changed between the snapshots:", *stat_text(rep.code)]
        if rep.changed_entrypoints:
            out.append(f"  entrypoints whose source changed: {', '.join(rep.changed_entrypoints)}")
    outs = f"Outputs {_outputs_where(rep)}"
    sections = (("Parameters", rep.parameters, False), (outs, rep.outputs, True))
    for title, items, outputs in sections:
        if not items:
            continue
        out += ["", f"{title}: {_counts(items)}"]
        changed = [r for r in items if r.status not in ("same", "close")]
        shown = changed if len(items) > max_rows else list(items)
        rows = [_tensor_row(r, outputs) for r in shown[:max_rows]]
        if rows:
            out += table(("status", "name", "A", "B", "max|a-b|", "rel", "allclose"), rows)
        hidden = len(items) - len(rows)
        if hidden:
            out.append(f"  … {hidden} more rows (same or close, or past {max_rows}): see --json")
    from .layers import layer_text, metrics_text

    out += metrics_text(rep)
    if rep.layers:
        out += layer_text(rep, max_rows)
    values = [v for v in rep.values if v.status not in ("same", "close")]
    if values:
        out += ["", f"Values: {_counts(rep.values)}"]
        out += table(
            ("status", "name", "A", "B"),
            [(v.status, v.name, v.a or "-", v.b or "-") for v in values],
        )
    if rep.uncompared:
        out += ["", "Not compared:", *(f"  {u}" for u in rep.uncompared)]
    if rep.notes:
        out += ["", *(f"note: {n}" for n in rep.notes)]
    out += ["", _verdict(rep)]
    return "\n".join(out)


# ----------------------------------------------------------------------------- HTML

_CSS = """
.isolhub-report{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;
max-width:1150px;padding:0 16px;color:#1d2330;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde;
padding-bottom:4px}code,td.mono{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12.5px}
table{border-collapse:collapse;width:100%;margin:6px 0}th,td{text-align:left;padding:4px 8px;
border-bottom:1px solid #eef;vertical-align:top;overflow-wrap:break-word}th{background:#f4f6fb;
font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
.verdict{display:inline-block;padding:6px 12px;border-radius:6px;font-weight:700;margin:10px 0}
.ok{background:#e3f6e8;color:#14632b}.bad{background:#fdecea;color:#9b1c1c}
.fail{background:#fff4d6;color:#7a4b00}.meta{color:#556}
td[class^="s-"]{white-space:nowrap}svg{max-width:100%;height:auto}
.s-same,.s-close{color:#14632b}.s-changed,.s-retyped{color:#9b1c1c;font-weight:600}
.s-reshaped,.s-added,.s-removed{color:#a34b00;font-weight:600}.s-modified{color:#3b4fb8}
.plus,.minus{display:inline-block;height:10px}.plus{background:#2da44e}.minus{background:#cf222e}.s-renamed{color:#3b4fb8;font-weight:600}
ul{margin:4px 0 0 18px;padding:0}pre{white-space:pre-wrap;background:#f7f7fa;padding:8px;font-size:12px}
p.first{font-weight:600;color:#9b1c1c}
"""


def _scoped(css: str, scope: str = ".isolhub-report") -> str:
    """Every rule of `css` limited to the report's own element, so a notebook keeps its styles."""

    def prefix(m: re.Match[str]) -> str:
        sels = [x.strip() for x in m.group(1).split(",")]
        return ",".join(x if x.startswith(scope) else f"{scope} {x}" for x in sels) + "{"

    return re.sub(r"([^{}]+)\{", prefix, css.strip())


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _htmltable(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], cls: Sequence[str] = (), css_id: str = ""
) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, x in enumerate(row):
            c = cls[i] if i < len(cls) else ""
            if c == "status":
                c = f"s-{str(x).split()[0]}" if str(x) else ""
            cells.append(f'<td class="{c}">{_e(x)}</td>' if c else f"<td>{_e(x)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    ident = f' id="{_e(css_id)}"' if css_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(rep: CompareReport) -> str:
    """The report as one self-contained HTML page (no scripts, nothing fetched)."""
    return (
        "\n".join(
            [
                "<!DOCTYPE html>",
                '<html lang="en"><head><meta charset="utf-8">',
                '<meta name="viewport" content="width=device-width,initial-scale=1">',
                f"<title>isolhub diff: {_e(rep.entrypoint)}</title>",
                f"<style>body{{margin:0}}{_scoped(_CSS)}</style></head><body>",
                '<div class="isolhub-report">',
                *_body(rep),
                "</div></body></html>",
            ]
        )
        + "\n"
    )


def render_fragment(rep: CompareReport) -> str:
    """The report as one `<div>` with its own scoped styles (for a notebook's `_repr_html_`)."""
    return "\n".join(
        [f'<div class="isolhub-report"><style>{_scoped(_CSS)}</style>', *_body(rep), "</div>"]
    )


def _body(rep: CompareReport) -> list[str]:
    verdict_cls = "fail" if rep.failed else "ok" if rep.equivalent else "bad"
    parts = [
        f"<h1>isolhub diff: <code>{_e(_call_text(rep))}</code></h1>",
        f'<div class="meta">mode {_e(rep.mode)} · seed {_e(rep.seed)} · atol {rep.atol:g} · '
        f"rtol {rep.rtol:g} · inputs {_e(', '.join(rep.inputs) or 'none')}</div>",
        f'<div id="verdict" class="verdict {verdict_cls}">{_e(_verdict(rep))}</div>',
        "<h2>Refs</h2>",
        _htmltable(("", "A", "B"), _side_rows(rep), ("", "mono", "mono"), "sides"),
    ]
    for label, side in (("A", rep.a), ("B", rep.b)):
        if side.error_detail:
            parts.append(f"<h2>Error on {label}</h2><pre>{_e(side.error_detail)}</pre>")
    if rep.differences:
        items = "".join(f"<li>{_e(d)}</li>" for d in rep.differences)
        parts.append(f'<h2>Differences</h2><ul id="differences">{items}</ul>')
    if rep.entrypoints:
        rows = [
            (
                e.status,
                e.name,
                ", ".join(e.changes) or "-",
                e.signature_a or "?",
                e.signature_b or "?",
            )
            for e in rep.entrypoints
        ]
        parts += [
            f"<h2>Entrypoints: {_e(_counts(rep.entrypoints))}</h2>",
            _htmltable(
                ("status", "name", "changed", "signature A", "signature B"),
                rows,
                ("status", "mono", "", "mono", "mono"),
                "entrypoints",
            ),
        ]
    if rep.code:
        parts.append(_code_html(rep))
    parts += _deep_html(rep)
    if rep.parameters:
        layers = layer_differences(rep.parameters)
        parts += [
            f"<h2>Weights by layer ({len(layers)} layers, largest difference first)</h2>",
            render_svg(layers),
            f"<h2>Parameters: {_e(_counts(rep.parameters))}</h2>",
            _tensortable(rep.parameters, False, "parameters"),
        ]
    if rep.outputs:
        parts += [
            f"<h2>Outputs {_e(_outputs_where(rep))}: {_e(_counts(rep.outputs))}</h2>",
            _tensortable(rep.outputs, True, "outputs"),
        ]
    if rep.values:
        value_rows = [(v.status, v.name, v.a or "-", v.b or "-") for v in rep.values]
        parts += [
            f"<h2>Values: {_e(_counts(rep.values))}</h2>",
            _htmltable(
                ("status", "name", "A", "B"), value_rows, ("status", "mono", "mono", "mono")
            ),
        ]
    if rep.uncompared:
        items = "".join(f"<li>{_e(u)}</li>" for u in rep.uncompared)
        parts.append(f'<h2>Not compared</h2><ul id="uncompared">{items}</ul>')
    if rep.notes:
        parts.append(
            "<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in rep.notes) + "</ul>"
        )
    parts.append('<p class="meta">Generated by isolhub.</p>')
    return parts


def _deep_html(rep: CompareReport) -> list[str]:
    """Metrics over the batches, and the layers with their depth plot."""
    from .layers import (
        LAYER_HEADERS,
        METRIC_HEADERS,
        depth_svg,
        divergence_text,
        layer_counts,
        layer_rows,
        metric_rows,
    )

    parts = []
    if rep.metrics:
        n = rep.batches
        parts += [
            f"<h2>Outputs over {n} batch{'es' if n != 1 else ''}</h2>",
            _htmltable(
                METRIC_HEADERS, metric_rows(rep.metrics),
                ("mono", "num", "num", "num", "num", "num"), "metrics",
            ),
        ]  # fmt: skip
    if rep.layers:
        first = rep.first_divergence
        parts += [
            f"<h2>Layers: {len(rep.layers)} ({_e(layer_counts(rep.layers))})</h2>",
            f'<p id="divergence" class="{"first" if first else "meta"}">'
            f"{_e(divergence_text(rep))}</p>",
            depth_svg(rep.layers, first),
            _htmltable(
                LAYER_HEADERS, layer_rows(rep.layers),
                ("num", "status", "mono", "mono", "mono", "mono", "num", "num", ""), "layers",
            ),
        ]  # fmt: skip
    return parts


def _code_html(rep: CompareReport) -> str:
    from .code import totals_text

    most = max((c.added + c.removed for c in rep.code), default=0) or 1
    rows = []
    for c in rep.code:
        if c.binary:
            bar = "binary"
        else:
            plus = max(1, round(60 * c.added / most)) if c.added else 0
            minus = max(1, round(60 * c.removed / most)) if c.removed else 0
            bar = (
                f'<span class="plus" style="width:{plus}px"></span>'
                f'<span class="minus" style="width:{minus}px"></span>'
            )
        rows.append(
            f'<tr><td class="s-{_e(c.status)}">{_e(c.status)}</td><td class="mono">{_e(c.path)}'
            f'</td><td class="num">+{c.added}</td><td class="num">-{c.removed}</td>'
            f"<td>{bar}</td></tr>"
        )
    changed = ""
    if rep.changed_entrypoints:
        names = ", ".join(f"<code>{_e(n)}</code>" for n in rep.changed_entrypoints)
        changed = f'<p id="changed-entrypoints">Entrypoints whose source changed: {names}</p>'
    return (
        f"<h2>Code: {_e(totals_text(rep.code))}</h2>"
        '<table id="code"><thead><tr><th>status</th><th>file</th><th>added</th><th>removed</th>'
        f"<th></th></tr></thead><tbody>{''.join(rows)}</tbody></table>{changed}"
    )


def _tensortable(rows: Sequence[TensorDiff], outputs: bool, css_id: str) -> str:
    order = sorted(
        rows,
        key=lambda r: (-_RANK.index(r.status), -(r.rel if r.rel is not None else math.inf)),
    )
    return _htmltable(
        ("status", "name", "A", "B", "max|a-b|", "rel", "allclose"),
        [_tensor_row(r, outputs) for r in order],
        ("status", "mono", "mono", "mono", "num", "num", ""),
        css_id,
    )


def render_svg(layers: Sequence[dict[str, Any]]) -> str:
    """A horizontal bar chart, one bar per layer in the given order (largest first).

    Bars for value changes are on a log scale of the relative difference; structural changes are
    full-width bars labelled with their status. Each bar is a `<g class="bar" data-layer=...>`.
    """
    shown = list(layers[:_MAX_BARS])
    label_w, bar_w, value_w, row_h, top = 300, 520, 150, 22, 34
    width = label_w + bar_w + value_w
    more = len(layers) - len(shown)
    height = top + row_h * max(len(shown), 1) + 26 + (18 if more else 0)
    axis_y = top + row_h * max(len(shown), 1) + 18
    finite = [e["score"] for e in shown if 0 < e["score"] < math.inf]
    hi = math.ceil(math.log10(max(finite))) if finite else 0
    lo = math.floor(math.log10(min(finite))) if finite else -1
    lo = min(max(lo, hi - 14), hi - 1)

    def length(score: float) -> float:
        if score == math.inf:
            return bar_w
        if score <= 0:
            return 0.0
        return max(2.0, bar_w * (math.log10(score) - lo) / (hi - lo))

    out = [
        f'<svg id="layer-plot" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        'aria-label="per-layer difference, largest first" font-family="system-ui,sans-serif" '
        'font-size="12">',
        f'<text x="{label_w}" y="13" fill="#556">max relative difference max|a-b| / '
        "max(|a|,|b|), log scale; orange: structural change</text>",
    ]
    step = max(1, math.ceil((hi - lo) / 7))
    for decade in range(lo, hi + 1, step) if finite else ():
        x = label_w + bar_w * (decade - lo) / (hi - lo)
        out.append(
            f'<line x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" y2="{axis_y - 12}" stroke="#e3e6ee"/>'
            f'<text x="{x:.1f}" y="{axis_y}" text-anchor="middle" fill="#778">1e{decade}</text>'
        )
    for i, e in enumerate(shown):
        y = top + i * row_h
        score, status = e["score"], e["status"]
        structural = score == math.inf
        color = "#e8892b" if structural else "#3b6fd8" if score > 0 else "#9aa3b5"
        value = status if structural else "identical" if score == 0 else fmt_float(score)
        if status == "renamed" and score == 0:
            value = "renamed, same values"
        name = e["layer"] if len(e["layer"]) <= 42 else "…" + e["layer"][-41:]
        out.append(
            f'<g class="bar" data-layer="{_e(e["layer"])}" data-score="{_e(score)}" '
            f'data-status="{_e(status)}"><title>{_e(e["layer"])}: {_e(value)} '
            f"({e['n']} tensor{'s' if e['n'] != 1 else ''})</title>"
            f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end" '
            f'font-family="ui-monospace,monospace">{_e(name)}</text>'
            f'<rect x="{label_w}" y="{y + 4}" width="{length(score):.1f}" height="{row_h - 8}" '
            f'rx="2" fill="{color}"/>'
            f'<text x="{label_w + length(score) + 6:.1f}" y="{y + 15}" fill="#334">{_e(value)}</text>'
            "</g>"
        )
    if more:
        out.append(
            f'<text x="{label_w}" y="{axis_y + 18}" fill="#778">… {more} more layers, all with '
            "smaller differences (see the parameters table)</text>"
        )
    out.append("</svg>")
    return "".join(out)
