"""Custom sequence operators (selective scan for Mamba-style blocks)."""

from __future__ import annotations

from occscene_pl.ops.selective_scan import (
    HAS_MAMBA_SSM,
    HAS_NUMBA,
    selective_scan,
    selective_scan_backend,
    selective_scan_chunked,
    selective_scan_reference,
)

__all__ = [
    "HAS_MAMBA_SSM",
    "HAS_NUMBA",
    "selective_scan",
    "selective_scan_backend",
    "selective_scan_chunked",
    "selective_scan_reference",
]
