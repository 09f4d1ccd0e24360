"""Selective-scan timings: the fast path of ``occscene_pl.ops.selective_scan`` against the per-step reference and the
pure-PyTorch fallback, forward and forward+backward.

Shape (the speed target): batch 2, dim 256, L 2048, N 16, float32, time-varying B/C of shape (batch, N, L), D, z,
delta_bias and delta_softplus=True.  Every timing is the median of ``repeats`` runs after ``warmup`` untimed runs
(the first of which also JIT-compiles or loads the numba kernels).  ``torch.set_num_threads`` is left at its default.

The reference's backward is pathologically slow at this size (autograd of 2048 ``x[:, :, i]`` selections
materialises a zero-filled ``(batch, dim, L, N)`` gradient per step: minutes per run), so by default its
forward+backward is timed at ``L = 512`` together with the fast path at the same size; ``--full-reference-backward``
times it once at the full size as well.

Usage: ``python benchmarks/bench_selective_scan.py --out bench-results [--full-reference-backward]``
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import pathlib
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from occscene_pl.ops import selective_scan, selective_scan_backend, selective_scan_chunked, selective_scan_reference

SHAPE: dict[str, int] = {"batch": 2, "dim": 256, "L": 2048, "N": 16}
SMALL_L = 512  # sequence length of the reference forward+backward comparison


def make_inputs(batch: int, dim: int, L: int, N: int, seed: int = 0) -> dict[str, Tensor]:
    """Float32 inputs in mamba's benchmark ranges with time-varying B/C of shape ``(batch, N, L)``."""
    g = torch.Generator().manual_seed(seed)
    return {
        "u": torch.randn(batch, dim, L, generator=g),
        "delta": 0.5 * torch.rand(batch, dim, L, generator=g),
        "A": -torch.exp(torch.rand(dim, N, generator=g) * 2.0),
        "B": torch.randn(batch, N, L, generator=g),
        "C": torch.randn(batch, N, L, generator=g),
        "D": torch.randn(dim, generator=g),
        "z": torch.randn(batch, dim, L, generator=g),
        "delta_bias": 0.5 * torch.rand(dim, generator=g),
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _median_ms(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def _forward(fn: Callable[..., Any], inputs: dict[str, Tensor]) -> Callable[[], Any]:
    def call() -> Any:
        with torch.no_grad():
            return fn(**inputs, delta_softplus=True)

    return call


def _forward_backward(fn: Callable[..., Any], inputs: dict[str, Tensor]) -> Callable[[], Any]:
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}

    def call() -> None:
        for leaf in leaves.values():
            leaf.grad = None
        fn(**leaves, delta_softplus=True).sum().backward()

    return call


def run(
    out_dir: pathlib.Path, *, repeats: int = 5, reference_repeats: int = 3, full_reference_backward: bool = False
) -> dict[str, Any]:
    """Times the backends and returns (and writes to ``out_dir / "selective_scan.json"``) the results.

    Args:
        out_dir: Directory for ``selective_scan.json`` (created if needed).
        repeats: Timed runs of the fast path and the fallback (median reported).
        reference_repeats: Timed runs of the slow reference (median reported).
        full_reference_backward: Also time one reference forward+backward at the full shape (takes minutes).

    Returns:
        The JSON-serialisable results: shape, backend name, ``forward_ms`` and ``forward_backward_ms`` per
        backend, and ``speedup`` ratios (reference time / fast time).
    """
    inputs = make_inputs(**SHAPE)
    small = make_inputs(**{**SHAPE, "L": SMALL_L})
    start = time.perf_counter()
    _forward(selective_scan, inputs)()  # JIT compile (or load from numba's cache)
    first_call_s = time.perf_counter() - start

    forward_ms = {
        "fast": _median_ms(_forward(selective_scan, inputs), warmup=2, repeats=repeats),
        "reference": _median_ms(_forward(selective_scan_reference, inputs), warmup=1, repeats=reference_repeats),
        "torch_fallback": _median_ms(_forward(selective_scan_chunked, inputs), warmup=1, repeats=repeats),
    }
    forward_backward_ms: dict[str, Any] = {
        "fast": _median_ms(_forward_backward(selective_scan, inputs), warmup=2, repeats=repeats),
        "torch_fallback": _median_ms(_forward_backward(selective_scan_chunked, inputs), warmup=1, repeats=repeats),
        "reference": None,
        f"fast_L{SMALL_L}": _median_ms(_forward_backward(selective_scan, small), warmup=2, repeats=repeats),
        f"reference_L{SMALL_L}": _median_ms(
            _forward_backward(selective_scan_reference, small), warmup=1, repeats=reference_repeats
        ),
    }
    if full_reference_backward:
        forward_backward_ms["reference"] = _median_ms(
            _forward_backward(selective_scan_reference, inputs), warmup=0, repeats=1
        )

    def ratio(slow: float | None, fast: float) -> float | None:
        return round(slow / fast, 1) if slow is not None else None

    results: dict[str, Any] = {
        "shape": {
            **SHAPE,
            "dtype": "float32",
            "B_C": "time-varying (batch, N, L)",
            "D": True,
            "z": True,
            "delta_bias": True,
            "delta_softplus": True,
        },
        "fast_path": selective_scan_backend(inputs["u"]),
        "torch_threads": torch.get_num_threads(),
        "first_call_s": round(first_call_s, 2),
        "forward_ms": {k: round(v, 2) for k, v in forward_ms.items()},
        "forward_backward_ms": {k: round(v, 2) if v is not None else None for k, v in forward_backward_ms.items()},
        "speedup": {
            "forward_vs_reference": ratio(forward_ms["reference"], forward_ms["fast"]),
            "forward_vs_torch_fallback": ratio(forward_ms["torch_fallback"], forward_ms["fast"]),
            "forward_backward_vs_reference": ratio(forward_backward_ms["reference"], forward_backward_ms["fast"]),
            f"forward_backward_vs_reference_L{SMALL_L}": ratio(
                forward_backward_ms[f"reference_L{SMALL_L}"], forward_backward_ms[f"fast_L{SMALL_L}"]
            ),
            "forward_backward_vs_torch_fallback": ratio(
                forward_backward_ms["torch_fallback"], forward_backward_ms["fast"]
            ),
        },
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "numba": _version("numba"),
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "selective_scan.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench-results"), help="output directory")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of the fast path and the fallback")
    parser.add_argument("--reference-repeats", type=int, default=3, help="timed runs of the reference")
    parser.add_argument(
        "--full-reference-backward", action="store_true", help="also time the reference backward at full size"
    )
    args = parser.parse_args()
    results = run(
        args.out,
        repeats=args.repeats,
        reference_repeats=args.reference_repeats,
        full_reference_backward=args.full_reference_backward,
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
