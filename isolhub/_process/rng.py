"""The caller's random state, handed to a worker and back, as plain values.

torch.hub runs hubconf and the entrypoint in the caller, so they draw from the caller's torch CPU
generator, `random` and numpy's global state. A worker forks from the zygote with the zygote's
state, the same for every worker; so the parent sends its current state with a request
(`capture`) and applies the worker's end state when the reply comes (`restore`): the draws, and
where the caller's generators end up, are then those of torch.hub.

The state travels as plain values (bytes, ints, floats), so the worker's answer goes through the
restricted codec; `restore` checks it on scratch generators before touching the real ones, so a
forged state is refused whole and changes nothing.

    {"torch": bytes, "random": [version, [625 ints], gauss | None],
     "numpy": ["MT19937", key bytes, pos, has_gauss, cached_gaussian]}   # numpy: if imported

Example:
    >>> import torch
    >>> state = capture()
    >>> a = torch.rand(1)
    >>> restore(state)
    >>> torch.equal(a, torch.rand(1))     # the same draw again
    True
"""

from __future__ import annotations

import random
import sys
from typing import Any

from .._errors import ProtocolError

__all__ = ["capture", "fresh_numpy", "restore", "seed_all"]

_MT_WORDS = 624


def capture() -> dict[str, Any]:
    """This process's torch CPU, `random` and (if imported) numpy global states, as plain values."""
    import torch

    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": bytes(torch.get_rng_state().tolist()),  # no numpy: torch may run without it
        "random": [version, list(internal), gauss],
    }
    np = sys.modules.get("numpy")
    if np is not None:
        key, words, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [key, words.astype("<u4").tobytes(), int(pos), int(has_gauss), cached]
    return state


def restore(state: Any) -> None:
    """Set this process's generators to `state` (from `capture`), all or none.

    A generator the state does not name keeps its state, except numpy's in a worker whose parent
    had no numpy: it is reseeded from the OS (`fresh_numpy`), as a fresh import would be.

    Raises:
        ProtocolError: the state is malformed (checked before anything is set).
    """
    import torch

    if not isinstance(state, dict) or not set(state) <= {"torch", "random", "numpy"}:
        raise ProtocolError("malformed random state from a worker")
    torch_state = _checked_torch(state["torch"], torch) if "torch" in state else None
    random_state = _checked_random(state["random"]) if "random" in state else None
    numpy_state = _checked_numpy(state["numpy"]) if "numpy" in state else None
    if torch_state is not None:
        torch.set_rng_state(torch_state)
    if random_state is not None:
        random.setstate(random_state)
    if numpy_state is not None:
        sys.modules["numpy"].random.set_state(numpy_state)


def seed_all(seed: int) -> None:
    """Seed torch (`torch.manual_seed`), `random` and, if imported, numpy's global state: what
    a `seed=` asks of a worker, whichever call (load, pool, compare) it came with.

    Example:
        >>> import torch
        >>> seed_all(0); a = torch.rand(1); seed_all(0); torch.equal(a, torch.rand(1))
        True
    """
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed(seed % (1 << 32))


def fresh_numpy() -> None:
    """Reseed numpy's global state from the OS (a worker must not share the zygote's)."""
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed()


def _checked_torch(data: Any, torch: Any) -> Any:
    if type(data) is not bytes or len(data) != torch.get_rng_state().numel():
        raise ProtocolError("malformed torch random state from a worker")
    tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        torch.Generator().set_state(tensor)  # a scratch generator checks it
    except RuntimeError as e:
        raise ProtocolError(f"invalid torch random state from a worker: {e}") from None
    return tensor


def _checked_random(value: Any) -> tuple[Any, ...]:
    ok = isinstance(value, (list, tuple)) and len(value) == 3
    if ok:
        version, internal, gauss = value
        ok = (
            type(version) is int
            and isinstance(internal, (list, tuple))
            and len(internal) == _MT_WORDS + 1
            and all(type(w) is int and 0 <= w < 1 << 32 for w in internal)
            and (gauss is None or type(gauss) is float)
        )
    if not ok:
        raise ProtocolError("malformed random-module state from a worker")
    state = (version, tuple(internal), gauss)
    try:
        random.Random().setstate(state)
    except (ValueError, TypeError) as e:
        raise ProtocolError(f"invalid random-module state from a worker: {e}") from None
    return state


def _checked_numpy(value: Any) -> tuple[Any, ...]:
    np: Any = sys.modules.get("numpy")
    ok = np is not None and isinstance(value, (list, tuple)) and len(value) == 5
    if ok:
        key, words, pos, has_gauss, cached = value
        ok = (
            key == "MT19937"
            and type(words) is bytes
            and len(words) == 4 * _MT_WORDS
            and type(pos) is int
            and type(has_gauss) is int
            and type(cached) is float
        )
    if not ok:
        raise ProtocolError("malformed numpy random state from a worker")
    state = (key, np.frombuffer(words, dtype="<u4").astype(np.uint32), pos, has_gauss, cached)
    try:
        np.random.RandomState().set_state(state)
    except (ValueError, TypeError) as e:
        raise ProtocolError(f"invalid numpy random state from a worker: {e}") from None
    return state
