"""The restricted unpickler of the nuScenes info pickles: plain data only, never code (``docs/design.md`` §9.2)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

__all__ = ["load_info_pickle"]


class _InfoUnpickler(pickle.Unpickler):
    """Unpickles plain containers and NumPy arrays only: never code (the info pickles are data)."""

    _ALLOWED = frozenset(
        {("numpy", "ndarray"), ("numpy", "dtype")}
        | {(f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")}
        | {(f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")}
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} (only containers and NumPy arrays)")
        return super().find_class(module, name)


def load_info_pickle(path: str | Path) -> Any:
    """Read an info pickle with a restricted unpickler (containers, strings, numbers and NumPy arrays only).

    Raises:
        ValueError: the file is unreadable, not a pickle, or holds anything else (naming the file).
    """
    try:
        with Path(path).open("rb") as handle:
            return _InfoUnpickler(handle).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise ValueError(f"info pickle {path} is not readable as plain data ({err})") from err
