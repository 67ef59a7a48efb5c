"""Many batches through both sides of a `compare`, folded as they come: memory stays bounded.

    inputs ─► iter_batches ─► one batch ─► worker A step ─┐
                                      └─► worker B step ─┴─► Stream.add ─► running aggregates
                                                              (the batch and its outputs dropped)

`Stream` keeps, per output name, the worst status and largest difference seen, the running sums
behind the mean absolute difference and, for classifier-shaped outputs (N×C floats), top-1
agreement and KL divergence; per layer (forward hooks, `layers=True`), the same over aligned
pairs; per side, a bounded sample of forward latencies. Nothing it holds grows with the number
of batches.

Example:
    >>> import torch
    >>> for xs in iter_batches([torch.ones(2, 4), (torch.zeros(2, 4),)]):
    ...     print(len(xs))
    1
    1
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import random
import statistics
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .._errors import SpecError
from .._process.messages import CompareStep
from .report import LayerDiff, OutputMetrics, TensorDiff

__all__ = ["Latency", "Stream", "align_layers", "describe_batch", "difference", "iter_batches"]

_CHUNK = 1 << 22  # elements per step in float64, so a huge tensor is never doubled at once
_LATENCY_SAMPLES = 4096  # per side: past this many batches, a uniform sample (reservoir)
_RANK = (
    "same", "close", "renamed", "unchecked", "changed", "retyped", "removed", "added", "reshaped"
)  # fmt: skip


# ----------------------------------------------------------------------------- inputs


def iter_batches(inputs: Any) -> Iterator[tuple[Any, ...]]:
    """Each batch of `inputs` as a tuple of forward arguments, lazily.

    A tensor is one batch; a tuple is one batch of forward arguments; a path (`str` or
    `os.PathLike`) is a file saved with `torch.save` holding any of these or a list of them,
    loaded with `weights_only=True` (and memory-mapped); any other iterable (a list, a
    generator, a DataLoader) yields batches, each a tensor or a tuple/list of arguments.

    Raises:
        SpecError: `inputs` (or a batch) is none of these, or the file cannot be read.
    """
    import torch

    if isinstance(inputs, (str, os.PathLike)):
        inputs = _load_file(os.fspath(inputs))
    if isinstance(inputs, torch.Tensor):
        return iter([(inputs,)])
    if isinstance(inputs, tuple):
        return iter([inputs])
    if isinstance(inputs, (dict, bytes)) or not isinstance(inputs, Iterable):
        raise SpecError(
            "inputs must be a tensor, a tuple of forward arguments, an iterable of batches or a "
            f"saved tensor file, not {type(inputs).__name__}"
        )
    return _each_batch(inputs)


def _each_batch(items: Iterable[Any]) -> Iterator[tuple[Any, ...]]:
    import torch

    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            yield (item,)
        elif isinstance(item, (tuple, list)):
            yield tuple(item)
        else:
            raise SpecError(
                f"batch {i} of inputs is a {type(item).__name__}: each batch must be a tensor or "
                "a tuple of forward arguments"
            )


def _load_file(path: str) -> Any:
    import pickle

    import torch

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise SpecError(
            f"cannot read the inputs file {path}: {e} (save a tensor, a tuple of tensors or a "
            "list of batches with torch.save)"
        ) from e


def describe_batch(batch: tuple[Any, ...]) -> tuple[str, ...]:
    """`("2x4 float32",)`: what one batch holds, for the report."""
    out = []
    for x in batch:
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            shape = "x".join(str(d) for d in x.shape) if len(x.shape) else "scalar"
            out.append(f"{shape} {str(x.dtype).removeprefix('torch.')}")
        else:
            text = repr(x)
            out.append(text if len(text) <= 80 else text[:79] + "…")
    return tuple(out)


# ----------------------------------------------------------------------------- arithmetic


def difference(a: Any, b: Any, atol: float, rtol: float) -> tuple[float, float, bool, float]:
    """`(max |a-b|, rel, allclose, sum |a-b|)` of two same-shape tensors, in float64 chunks.

    `rel` is max |a-b| / max(|a|,|b|). NaNs in the same place count as equal, as do equal
    infinities; a NaN on one side only is an infinite difference.
    """
    import torch

    wide = torch.complex128 if a.is_complex() or b.is_complex() else torch.float64
    xa, xb = a.detach().reshape(-1), b.detach().reshape(-1)
    max_abs = scale = total = 0.0
    close = True
    for i in range(0, xa.numel(), _CHUNK):
        x, y = xa[i : i + _CHUNK].to(wide), xb[i : i + _CHUNK].to(wide)
        equal = (x == y) | (x.isnan() & y.isnan())
        d = torch.where(equal, 0.0, (x - y).abs().to(torch.float64)).nan_to_num(nan=math.inf)
        max_abs = max(max_abs, float(d.max()))
        total += float(d.sum())
        mag = torch.maximum(x.abs(), y.abs()).to(torch.float64)
        scale = max(scale, float(mag.nan_to_num(nan=0.0, posinf=0.0).max()))
        close = close and bool(torch.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True))
    rel = 0.0 if max_abs == 0 else (max_abs / scale if scale > 0 else math.inf)
    return max_abs, rel, close, total


def _classifier(a: Any, b: Any) -> tuple[int, float] | None:
    """`(rows whose top-1 class agrees, sum over rows of KL(softmax a ‖ softmax b))`, or None
    where the outputs are not N×C logits (C ≥ 2, floating)."""
    import torch

    if a.dim() != 2 or a.shape[1] < 2 or not (a.is_floating_point() and b.is_floating_point()):
        return None
    x, y = a.detach().to(torch.float64), b.detach().to(torch.float64)
    agree = int((x.argmax(dim=1) == y.argmax(dim=1)).sum())
    la, lb = torch.log_softmax(x, dim=1), torch.log_softmax(y, dim=1)
    kl = float((la.exp() * (la - lb)).sum())
    return agree, kl if math.isfinite(kl) else math.inf


# ----------------------------------------------------------------------------- latency


@dataclass
class Latency:
    """Forward latencies of one side: exact min, max and count; median and quartiles from a
    uniform sample of at most 4096 batches (reservoir sampling, seeded: reproducible)."""

    n: int = 0
    low: float = math.inf
    high: float = 0.0
    samples: list[float] = field(default_factory=list)
    _rng: random.Random = field(default_factory=lambda: random.Random(0))

    def add(self, seconds: float) -> None:
        self.n += 1
        self.low, self.high = min(self.low, seconds), max(self.high, seconds)
        if len(self.samples) < _LATENCY_SAMPLES:
            self.samples.append(seconds)
        else:
            j = self._rng.randrange(self.n)
            if j < _LATENCY_SAMPLES:
                self.samples[j] = seconds

    def summary(self) -> dict[str, Any]:
        """`forward_s` (median), `forward_iqr_s`, `forward_min_s`, `forward_max_s`, `forwards`."""
        if not self.n:
            return {}
        if len(self.samples) > 1:
            q1, _, q3 = statistics.quantiles(self.samples, n=4, method="inclusive")
        else:
            q1 = q3 = self.samples[0]
        return {
            "forward_s": statistics.median(self.samples),
            "forward_iqr_s": q3 - q1,
            "forward_min_s": self.low,
            "forward_max_s": self.high,
            "forwards": self.n,
        }


# ----------------------------------------------------------------------------- outputs


@dataclass
class _OutputAcc:
    row: TensorDiff
    batches: int = 0
    elements: int = 0
    max_abs: float = 0.0
    abs_sum: float = 0.0
    rows: int = 0
    agree: int = 0
    kl_sum: float = 0.0
    classifier: bool = True


class Stream:
    """Running aggregates over the batches of one compare; see the module docstring.

    `diff_rows(a, b)` diffs one batch's output dicts into `TensorDiff` rows (compare's rules).
    """

    def __init__(
        self, atol: float, rtol: float, diff_rows: Callable[[dict, dict], tuple[TensorDiff, ...]]
    ) -> None:
        self.atol, self.rtol, self.diff_rows = atol, rtol, diff_rows
        self.batches = 0
        self.outputs: dict[str, _OutputAcc] = {}
        self.layers = _Layers(atol, rtol)

    def add(self, a: CompareStep, b: CompareStep) -> None:
        """Fold one batch's step replies of both sides (each already checked)."""
        self.batches += 1
        oa, ob = a.outputs, b.outputs
        for row in self.diff_rows(oa, ob):
            acc = self.outputs.get(row.name)
            if acc is None:
                acc = self.outputs[row.name] = _OutputAcc(row)
            else:
                acc.row = _worse(acc.row, row)
            ta, tb = oa.get(row.name), ob.get(row.name)
            if ta is None or tb is None or ta.shape != tb.shape:
                acc.classifier = False
                continue
            max_abs, _, _, total = difference(ta, tb, self.atol, self.rtol)
            acc.batches += 1
            acc.elements += ta.numel()
            acc.max_abs = max(acc.max_abs, max_abs)
            acc.abs_sum += total
            top = _classifier(ta, tb) if acc.classifier else None
            if top is None:
                acc.classifier = False
            else:
                acc.rows += ta.shape[0]
                acc.agree += top[0]
                acc.kl_sum += top[1]
        self.layers.add(a.layers, b.layers, a.activations, b.activations)

    def output_rows(self) -> tuple[TensorDiff, ...]:
        return tuple(acc.row for acc in self.outputs.values())

    def metrics(self) -> tuple[OutputMetrics, ...]:
        out = []
        for name, acc in self.outputs.items():
            if not acc.batches:
                continue
            cls = acc.classifier and acc.rows > 0
            out.append(
                OutputMetrics(
                    name=name,
                    batches=acc.batches,
                    elements=acc.elements,
                    max_abs=acc.max_abs,
                    mean_abs=acc.abs_sum / acc.elements if acc.elements else 0.0,
                    rows=acc.rows if cls else None,
                    top1_agreement=acc.agree / acc.rows if cls else None,
                    kl_div=acc.kl_sum / acc.rows if cls else None,
                )
            )
        return tuple(out)


def _worse(old: TensorDiff, new: TensorDiff) -> TensorDiff:
    """One row for a name over two batches: the worse status, the larger differences."""
    rank = _RANK.index(new.status) > _RANK.index(old.status)
    base = new if rank else old
    fields: dict[str, Any] = {}
    for name in ("max_abs", "rel"):
        values = [v for v in (getattr(old, name), getattr(new, name)) if v is not None]
        fields[name] = max(values) if values else None
    if old.allclose is not None or new.allclose is not None:
        fields["allclose"] = old.allclose is not False and new.allclose is not False
    return dataclasses.replace(base, **fields)


# ----------------------------------------------------------------------------- layers


@dataclass
class _LayerAcc:
    a: dict[str, Any] | None  # the first batch's record of each side (name, type, shape, dtype)
    b: dict[str, Any] | None
    batches: int = 0
    max_abs: float = 0.0
    rel: float = 0.0
    close: bool = True
    exact: bool = True
    reshaped: bool = False
    sums: dict[str, float] = field(default_factory=dict)


class _Layers:
    """Per-layer aggregates over aligned pairs (A's call order, B's extra layers after)."""

    def __init__(self, atol: float, rtol: float) -> None:
        self.atol, self.rtol = atol, rtol
        self.rows: list[_LayerAcc] | None = None

    def add(self, la: list, lb: list, acts_a: dict, acts_b: dict) -> None:
        if self.rows is None:
            if not la and not lb:
                return
            self.rows = [_LayerAcc(ra, rb) for ra, rb in align_layers(la, lb)]
        by_a = {r["name"]: r for r in la}
        by_b = {r["name"]: r for r in lb}
        for acc in self.rows:
            if acc.a is None or acc.b is None:
                continue
            ra, rb = by_a.get(acc.a["name"]), by_b.get(acc.b["name"])
            if ra is None or rb is None:
                continue  # not run on this batch (control flow): nothing to compare
            acc.batches += 1
            for side, r in (("a", ra), ("b", rb)):
                for stat in ("mean", "std"):
                    if isinstance(r.get(stat), float):
                        key = f"{stat}_{side}"
                        acc.sums[key] = acc.sums.get(key, 0.0) + r[stat]
            if ra["shape"] != rb["shape"]:
                acc.reshaped = True
                continue
            ta, tb = acts_a.get(ra["name"]), acts_b.get(rb["name"])
            if ta is not None and tb is not None and ta.shape == tb.shape:
                max_abs, rel, close, _ = difference(ta, tb, self.atol, self.rtol)
            else:
                acc.exact = False
                max_abs, rel, close = self._bound(ra, rb)
            acc.max_abs, acc.rel = max(acc.max_abs, max_abs), max(acc.rel, rel)
            acc.close = acc.close and close

    def _bound(self, ra: dict, rb: dict) -> tuple[float, float, bool]:
        """A lower bound of max |a-b| from summary statistics: |Δmean|, |Δmin| and |Δmax| each
        are at most max |a-b|. Beyond tolerance means changed; within it proves nothing."""
        gaps, scale = [], 0.0
        for stat in ("mean", "min", "max"):
            x, y = ra.get(stat), rb.get(stat)
            if isinstance(x, float) and isinstance(y, float):
                gaps.append(0.0 if x == y else abs(x - y))
                if stat != "mean":
                    scale = max(scale, abs(x), abs(y))
        bound = max(gaps, default=0.0)
        if math.isnan(bound):
            bound = math.inf
        rel = 0.0 if bound == 0 else bound / scale if scale > 0 else math.inf
        return bound, rel, bound <= self.atol + self.rtol * scale

    def rows_out(self) -> tuple[LayerDiff, ...]:
        out = []
        for acc in self.rows or ():
            ra, rb = acc.a, acc.b
            n = acc.batches
            means = {k: v / n for k, v in acc.sums.items()} if n else {}
            if ra is None or rb is None:
                status = "added" if ra is None else "removed"
            elif acc.reshaped:
                status = "reshaped"
            elif not n:
                status = "unchecked"
            elif not acc.close:
                status = "changed"
            elif ra["dtype"] != rb["dtype"]:
                status = "retyped"
            elif not acc.exact:
                status = "unchecked"
            else:
                status = "same" if acc.max_abs == 0 else "close"
            paired = ra is not None and rb is not None and not acc.reshaped and n
            out.append(
                LayerDiff(
                    name=(ra or rb or {}).get("name", ""),
                    status=status,
                    name_b=rb["name"] if ra is not None and rb is not None else None,
                    type_a=ra["type"] if ra else None,
                    type_b=rb["type"] if rb else None,
                    shape_a=tuple(ra["shape"]) if ra else None,
                    shape_b=tuple(rb["shape"]) if rb else None,
                    dtype_a=ra["dtype"] if ra else None,
                    dtype_b=rb["dtype"] if rb else None,
                    max_abs=acc.max_abs if paired else None,
                    rel=acc.rel if paired else None,
                    allclose=acc.close if paired else None,
                    exact=bool(paired and acc.exact),
                    batches=n,
                    mean_a=means.get("mean_a"),
                    mean_b=means.get("mean_b"),
                    std_a=means.get("std_a"),
                    std_b=means.get("std_b"),
                )
            )
        return tuple(out)


def align_layers(la: list[dict], lb: list[dict]) -> list[tuple[dict | None, dict | None]]:
    """Pair two call-ordered layer lists: by qualified name, then the rest by order and shape.

    A same-name pair needs the same type or the same output shape (ReLU → GELU under one name
    pairs; a name that moved to an unrelated layer does not).
    Layers left over after the names are matched in order where their (type, shape, dtype)
    agree (a longest-common-subsequence match), so a renamed layer still pairs with its old
    self. Returns A's layers in call order, each with its B partner or None, and B's unpaired
    layers as `(None, b)`, placed after the pair that precedes them in B's order.
    """
    names_b = {r["name"]: j for j, r in enumerate(lb)}
    partner: dict[int, int] = {}
    for i, r in enumerate(la):
        j = names_b.get(r["name"])
        # A name now used by another kind of layer with another shape (`head.2` was the
        # Linear, is now a Dropout before it) is not that layer: left to the order pass.
        if j is not None and (r["type"] == lb[j]["type"] or r["shape"] == lb[j]["shape"]):
            partner[i] = j
    taken = set(partner.values())
    free_a = [i for i in range(len(la)) if i not in partner]
    free_b = [j for j in range(len(lb)) if j not in taken]

    def key(r: dict) -> tuple:
        return (r["type"], tuple(r["shape"]), r["dtype"])

    matcher = difflib.SequenceMatcher(
        None, [key(la[i]) for i in free_a], [key(lb[j]) for j in free_b], autojunk=False
    )
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            partner[free_a[block.a + k]] = free_b[block.b + k]
    taken = set(partner.values())
    rows: list[tuple[dict | None, dict | None]] = []
    b_only = [j for j in range(len(lb)) if j not in taken]
    for i, r in enumerate(la):
        j = partner.get(i)
        if j is not None:
            while b_only and b_only[0] < j:
                rows.append((None, lb[b_only.pop(0)]))
        rows.append((r, lb[j] if j is not None else None))
    rows.extend((None, lb[j]) for j in b_only)
    return rows
