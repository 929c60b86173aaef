"""JSON values checked against a typed signature before they reach a constructor.

JSON carries no types of its own: ``"300"`` or ``true`` for an int would reach the
constructor and fail there with a bare TypeError (or, for a bool, silently mean 1).
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Callable, Literal, Sequence, get_args, get_origin, get_type_hints

from unisrec_x.errors import DataError


def exact_keys(given: dict, expected: Sequence[str], what: str, path: Path, optional: Sequence[str] = ()) -> None:
    """``given`` has every key of ``expected`` (those in ``optional`` may be absent) and no other."""
    missing = [k for k in expected if k not in given and k not in optional]
    unknown = sorted(set(given) - set(expected))
    if missing or unknown:
        found = "; ".join(f"{kind} keys {', '.join(keys)}" for kind, keys in (("missing", missing), ("unknown", unknown)) if keys)
        raise DataError(f"{what} has {found} (expected {', '.join(expected)})", path)


def checked_args(given: object, target: Callable, what: str, path: Path) -> dict:
    """``given`` as keyword arguments of ``target``: only its parameters, each of its hinted type.

    A parameter with a default may be absent (files written before it existed keep loading);
    one without a default must be there.
    """
    if not isinstance(given, dict):
        raise DataError(f"{what} is {type(given).__name__} (expected an object of arguments)", path)
    hints = get_type_hints(target)
    parameters = {n: p for n, p in inspect.signature(target).parameters.items() if n != "self"}
    optional = [n for n, p in parameters.items() if p.default is not inspect.Parameter.empty]
    exact_keys(given, list(parameters), what, path, optional)
    wrong = [f"{n}={v!r} (expected {type_name(hints[n])})" for n, v in given.items() if not type_ok(v, hints[n])]
    if wrong:
        raise DataError(f"{what} has arguments of the wrong type: {'; '.join(wrong)}", path)
    return given


def type_ok(value: object, hint: object) -> bool:
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if get_origin(hint) is Literal:
        return isinstance(value, str) and value in get_args(hint)
    return True  # other hints: the constructor checks such values itself


def type_name(hint: object) -> str:
    return " or ".join(map(repr, get_args(hint))) if get_origin(hint) is Literal else getattr(hint, "__name__", str(hint))
