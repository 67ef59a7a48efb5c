"""What `compare` returns: a frozen `CompareReport` and its rows, round-tripped through JSON.

    CompareReport ── a, b: SideInfo           what each ref turned out to be, or why it failed
                  ├─ entrypoints: EntrypointDiff  names, signatures, docstrings
                  ├─ parameters, outputs: TensorDiff  weights and forward outputs
                  ├─ values: ValueDiff        plain values in the result or the outputs
                  ├─ metrics: OutputMetrics   aggregates of each output over all the batches
                  ├─ layers: LayerDiff        each submodule's output, aligned (layers=True)
                  └─ code: FileChange         files changed between the two snapshots

Pure data: diffing two sides into a report is `_compare.compare`'s, rendering one (terminal tables,
HTML) is `_compare.html`'s, imported only when asked for.

Example (`git_repo`: a hub repository whose `net` is a linear layer, wider at v2 than v1):
    >>> import torch
    >>> from isolhub import compare
    >>> v1, v2 = f"git+file://{git_repo}@v1", f"git+file://{git_repo}@v2"
    >>> from pathlib import Path
    >>> _ = Path("report.json").write_text(compare(v1, v2, "net", inputs=torch.ones(1, 4)).to_json())
    >>> rep = CompareReport.from_json(Path("report.json").read_text())
    >>> rep.equivalent, rep.differences[:1]
    (False, ('entrypoint net: signature changed',))
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, final

from .._errors import SpecError
from .code import FileChange


@final
@dataclass(frozen=True)
class SideInfo:
    """What one ref turned out to be. `error` is set when the side could not be described.

    `forward_s` is the median forward time of one batch (every part of the result), over
    `forwards` batches, `forward_iqr_s` its interquartile range, `forward_min_s`/`forward_max_s`
    the extremes; `peak_memory` the worker's peak resident set in bytes (VmHWM, read by the
    parent from /proc once the batches are done, not taken on the worker's word).
    """

    spec: str
    sha: str | None = None
    error: str | None = None
    error_detail: str | None = None
    result_type: str | None = None
    parameters: int | None = None
    tensors: int | None = None
    bytes: int | None = None
    start_s: float | None = None
    load_s: float | None = None
    forward_s: float | None = None
    forward_error: str | None = None
    forward_iqr_s: float | None = None
    forward_min_s: float | None = None
    forward_max_s: float | None = None
    forwards: int = 0
    peak_memory: int | None = None


@final
@dataclass(frozen=True)
class EntrypointDiff:
    """One hubconf entrypoint: `status` is added, removed, changed or same.

    `changes` names what changed: "signature", "docstring" and/or "source" (the text of the
    function or class itself, as `inspect.getsource` reads it; not what it calls). A signature
    of None is unknown (that side's entrypoint raised, so only names and docstrings could be
    read).
    """

    name: str
    status: str
    changes: tuple[str, ...] = ()
    signature_a: str | None = None
    signature_b: str | None = None
    doc_a: str | None = None
    doc_b: str | None = None


@final
@dataclass(frozen=True)
class TensorDiff:
    """One weight or output: same, close, changed, retyped, reshaped, renamed, added, removed.

    `max_abs` is max |a-b|; `rel` is max |a-b| / max(|a|, |b|); both None where the two cannot
    be subtracted (shapes differ, or one side has no such tensor). `name_b` is set on renames.
    """

    name: str
    status: str
    name_b: str | None = None
    shape_a: tuple[int, ...] | None = None
    shape_b: tuple[int, ...] | None = None
    dtype_a: str | None = None
    dtype_b: str | None = None
    max_abs: float | None = None
    rel: float | None = None
    allclose: bool | None = None


@final
@dataclass(frozen=True)
class ValueDiff:
    """A plain (non-tensor) value in a result or output: same, close, changed, added, removed."""

    name: str
    status: str
    a: str | None = None
    b: str | None = None


@final
@dataclass(frozen=True)
class OutputMetrics:
    """One output over all the batches both sides ran (same-shape pairs only).

    `max_abs`/`mean_abs` are over every element of every batch. For classifier-shaped outputs
    (N×C floats, C ≥ 2) `top1_agreement` is the share of rows whose argmax agrees and `kl_div`
    the mean over rows of KL(softmax A ‖ softmax B), in nats; None otherwise.
    """

    name: str
    batches: int
    elements: int
    max_abs: float
    mean_abs: float
    rows: int | None = None
    top1_agreement: float | None = None
    kl_div: float | None = None


@final
@dataclass(frozen=True)
class LayerDiff:
    """One submodule's output at both refs (`compare(..., layers=True)`), over all batches.

    `name` is A's qualified module name (B's for a layer only in B), `name_b` B's where they are
    paired (a different name: aligned by order and shape after a rename). `status`: same, close,
    changed, reshaped, retyped, added (only in B), removed (only in A), or unchecked (its tensors
    were past the byte budget and its summary statistics agree, which proves nothing; `exact` is
    False whenever a batch was compared on statistics only: then `max_abs` is a lower bound).
    `mean_*`/`std_*` are the output's statistics at each ref, averaged over the batches.
    """

    name: str
    status: str
    name_b: str | None = None
    type_a: str | None = None
    type_b: str | None = None
    shape_a: tuple[int, ...] | None = None
    shape_b: tuple[int, ...] | None = None
    dtype_a: str | None = None
    dtype_b: str | None = None
    max_abs: float | None = None
    rel: float | None = None
    allclose: bool | None = None
    exact: bool = False
    batches: int = 0
    mean_a: float | None = None
    mean_b: float | None = None
    std_a: float | None = None
    std_b: float | None = None


DEPARTED = ("changed", "reshaped", "retyped")  # a layer whose output departs from its partner's


@final
@dataclass(frozen=True)
class CompareReport:
    """The comparison of one entrypoint at two refs; see `compare`.

    `differences` lists, one line each, why the two are not equivalent; `uncompared` what could
    not be compared (a returned object that is no module, tensor or plain value, say).
    `args`/`kwargs` went to both sides; `args_a`/`args_b` (None: `args`) and
    `kwargs_a`/`kwargs_b` (merged over `kwargs`) to one side only. `code` lists the files that
    differ between the two snapshots (empty when either side could not be fetched, or none do).

    Example (`git_repo`: a hub repository tagged v1, whose `net` is a linear layer):
        >>> from isolhub import compare
        >>> rep = compare(f"git+file://{git_repo}@v1", f"git+file://{git_repo}@v9", "net")
        >>> rep.equivalent, rep.error_a
        (False, None)
        >>> print(rep.error_b)
        RefNotFoundError: file://.../tinynet.git has no branch, tag or commit 'v9'
        >>> CompareReport.from_json(rep.to_json()) == rep
        True
    """

    spec_a: str
    spec_b: str
    entrypoint: str
    mode: str
    atol: float
    rtol: float
    seed: int | None
    args: tuple[str, ...]
    kwargs: tuple[tuple[str, str], ...]
    inputs: tuple[str, ...]
    a: SideInfo
    b: SideInfo
    entrypoints: tuple[EntrypointDiff, ...] = ()
    parameters: tuple[TensorDiff, ...] = ()
    outputs: tuple[TensorDiff, ...] = ()
    values: tuple[ValueDiff, ...] = ()
    uncompared: tuple[str, ...] = ()
    differences: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    args_a: tuple[str, ...] | None = None
    args_b: tuple[str, ...] | None = None
    kwargs_a: tuple[tuple[str, str], ...] = ()
    kwargs_b: tuple[tuple[str, str], ...] = ()
    code: tuple[FileChange, ...] = ()
    batches: int = 0
    metrics: tuple[OutputMetrics, ...] = ()
    layers: tuple[LayerDiff, ...] = ()

    @property
    def error_a(self) -> str | None:
        """Why ref A could not be described (type: message), or None."""
        return self.a.error

    @property
    def error_b(self) -> str | None:
        """Why ref B could not be described (type: message), or None."""
        return self.b.error

    @property
    def failed(self) -> bool:
        """Whether either side could not be loaded and described."""
        return self.a.error is not None or self.b.error is not None

    @property
    def equivalent(self) -> bool:
        """Both sides loaded and nothing differs beyond atol/rtol (docstrings may differ)."""
        return not self.failed and not self.differences

    @property
    def first_divergence(self) -> LayerDiff | None:
        """The first layer, in A's call order, whose output departs beyond atol/rtol (or whose
        shape or dtype changed) from its aligned partner; None if none does (or no layers)."""
        path = self.divergence_path
        return path[0] if path else None

    @property
    def divergence_path(self) -> tuple[LayerDiff, ...]:
        """The first divergence and every departing layer after it, in call order."""
        return tuple(x for x in self.layers if x.status in DEPARTED and x.name_b is not None)

    @property
    def renamed(self) -> tuple[TensorDiff, ...]:
        """Parameters renamed with their values kept (equivalent, but a state dict saved at one
        ref needs its keys mapped to load at the other)."""
        return tuple(p for p in self.parameters if p.status == "renamed")

    @property
    def changed_entrypoints(self) -> tuple[str, ...]:
        """Entrypoints present at both refs whose own source text changed."""
        return tuple(e.name for e in self.entrypoints if "source" in e.changes)

    def layer_differences(self) -> list[dict[str, Any]]:
        """Per layer (a state-dict key without its last part), largest difference first.

        Each item: `layer`, `score` (the largest relative difference of its tensors; inf for a
        structural change: added, removed, reshaped), `status` (its worst tensor status) and
        `n` (its tensor count).
        """
        from .html import layer_differences

        return layer_differences(self.parameters)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (non-finite floats become "inf"/"nan" strings)."""
        data = dataclasses.asdict(self)
        for key in ("kwargs", "kwargs_a", "kwargs_b"):
            data[key] = dict(getattr(self, key))
        data["equivalent"] = self.equivalent
        return _json_safe(data)

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON text; `CompareReport.from_json` reads it back."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompareReport:
        """Rebuild a report from `to_dict()` output.

        Raises:
            SpecError: `data` is not a report.
        """
        try:
            return _report_from_dict(data)
        except (KeyError, TypeError, ValueError) as e:
            raise SpecError(f"not an isolhub compare report: {e}") from e

    @classmethod
    def from_json(cls, text: str) -> CompareReport:
        """Rebuild a report from `to_json()` output.

        Raises:
            SpecError: the text is not a report.
        """
        try:
            data = json.loads(text)
        except ValueError as e:
            raise SpecError(f"not an isolhub compare report: {e}") from e
        return cls.from_dict(data)

    def summary(self, max_rows: int = 40) -> str:
        """The report as terminal tables (past `max_rows`, a table's unchanged rows are counted)."""
        from .html import render_text

        return render_text(self, max_rows)

    def _repr_html_(self) -> str:
        """The HTML report as a notebook cell shows it (styles scoped to the report)."""
        from .html import render_fragment

        return render_fragment(self)

    def to_html(self, path: str | os.PathLike[str] | None = None) -> str:
        """A self-contained HTML page (tables and a per-layer plot); written to `path` if given.

        Raises:
            OSError: `path` cannot be written.
        """
        from .html import render_html

        page = render_html(self)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(page)
        return page


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _report_from_dict(data: dict[str, Any]) -> CompareReport:
    def build(cls: type, raw: dict[str, Any]) -> Any:
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in raw:
                continue
            v = raw[f.name]
            if f.name in ("shape_a", "shape_b") and v is not None:
                v = tuple(int(d) for d in v)
            elif f.type in ("float", "float | None") and v is not None:
                v = float(v)
            elif f.name == "changes":
                v = tuple(v)
            kwargs[f.name] = v
        return cls(**kwargs)

    converters: dict[str, Callable[[Any], Any]] = {
        "a": lambda v: build(SideInfo, v),
        "b": lambda v: build(SideInfo, v),
        "entrypoints": lambda v: tuple(build(EntrypointDiff, x) for x in v),
        "parameters": lambda v: tuple(build(TensorDiff, x) for x in v),
        "outputs": lambda v: tuple(build(TensorDiff, x) for x in v),
        "values": lambda v: tuple(build(ValueDiff, x) for x in v),
        "kwargs": _pairs,
        "kwargs_a": _pairs,
        "kwargs_b": _pairs,
        "args_a": lambda v: None if v is None else tuple(v),
        "args_b": lambda v: None if v is None else tuple(v),
        "code": lambda v: tuple(build(FileChange, x) for x in v),
        "metrics": lambda v: tuple(build(OutputMetrics, x) for x in v),
        "layers": lambda v: tuple(build(LayerDiff, x) for x in v),
        "args": tuple,
        "inputs": tuple,
        "uncompared": tuple,
        "differences": tuple,
        "notes": tuple,
        "atol": float,
        "rtol": float,
    }
    kwargs = {}
    for f in dataclasses.fields(CompareReport):
        if f.name not in data and f.default is not dataclasses.MISSING:
            continue  # a report from an older isolhub: the field keeps its default
        raw = data[f.name]
        kwargs[f.name] = converters.get(f.name, lambda v: v)(raw)
    return CompareReport(**kwargs)


def _pairs(v: Any) -> tuple[tuple[str, str], ...]:
    return tuple((str(k), str(x)) for k, x in dict(v).items())


__all__ = [
    "CompareReport",
    "EntrypointDiff",
    "FileChange",
    "LayerDiff",
    "OutputMetrics",
    "SideInfo",
    "TensorDiff",
    "ValueDiff",
]
