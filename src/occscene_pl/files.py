"""Crash-safe file writing shared by the dataset writers, the prediction writer and the native exporters."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["atomic_write"]


def atomic_write(path: str | Path, content: bytes | Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` through a hidden temporary file in the same folder and ``os.replace`` it into place.

    Readers never see a partially written file under the final name, and an existing file keeps its old content
    until the new one is complete; on any error the temporary file is removed and the error propagates. The
    temporary name (``.<name>.<random>.tmp``) does not end in the target's suffix, so a concurrent glob for, e.g.,
    ``*.bin`` cannot pick it up. It is created with ``open(..., "xb")``, so it gets the usual umask permissions.

    Args:
        path: destination; its folder must exist.
        content: the bytes, or a function that writes them to the open binary file it is given.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            if isinstance(content, bytes):
                f.write(content)
            else:
                content(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
