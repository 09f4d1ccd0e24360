"""Shared pieces of the numba selective-scan kernels: constants, the vectorisable ``exp``, lane loads, task threads.

Imported only through :mod:`occscene_pl.ops._scan_kernels` (which needs ``numba``); the forward kernel is in
:mod:`occscene_pl.ops._scan_kernels_fwd`, the backward kernel in :mod:`occscene_pl.ops._scan_kernels_bwd`, and the
layout and vectorisation strategy of all of them is described in :mod:`occscene_pl.ops._scan_kernels`.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from llvmlite import ir as llvm_ir
from numba import njit, types
from numba.extending import intrinsic, overload

__all__ = ["K_LANES", "T_BLOCK", "plan_blocks"]

#: Channels processed together by one task (SIMD lanes of the inner loops).
K_LANES: int = 32
#: Time steps per block (checkpoint interval of the forward pass, recompute window of the backward pass).
T_BLOCK: int = 128

# Float32 exp constants (Cephes expf): exp(x) = 2**k * exp(r), x = k*ln2 + r, |r| <= ln2/2.
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
# Clamp range: keeps k = round(x * log2(e)) in [-126, 129] so that the biased exponent of 2**(k-1) fits in
# [0, 255]: k = -126 gives 0.0 (results below ~3e-38 flush to zero), k = 129 gives +inf (overflow, as expf).
_EXP_LO = np.float32(-87.5)
_EXP_HI = np.float32(89.5)
_P0 = np.float32(1.9875691500e-4)
_P1 = np.float32(1.3981999507e-3)
_P2 = np.float32(8.3334519073e-3)
_P3 = np.float32(4.1665795894e-2)
_P4 = np.float32(1.6666665459e-1)
_P5 = np.float32(5.0000001201e-1)
_ONE32 = np.float32(1.0)
_TWO32 = np.float32(2.0)
_HALF32 = np.float32(0.5)
_BIAS32 = np.int32(126)
_SHIFT32 = np.int32(23)

# "contract" only lets LLVM fuse a*b+c into FMAs (one rounding instead of two).  Loops that evaluate exp must not
# get "reassoc": it would let LLVM fold the two-constant range reduction below and lose ~10 bits of accuracy.
_FM = {"contract"}
# Channel reductions (dB, dC of time-varying B/C) need reassociation to vectorise.  Still no nnan/ninf.
_FM_REDUCE = {"reassoc", "contract"}


@intrinsic
def _i32_as_f32(typingctx: Any, x: Any) -> Any:
    """Reinterprets the bits of an int32 as float32 (a register bitcast, which LLVM vectorises)."""
    sig = types.float32(types.int32)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], llvm_ir.FloatType())

    return sig, codegen


@njit(inline="always", fastmath=_FM, error_model="numpy")
def _fexp32(x: Any) -> Any:
    """Vectorisable float32 exp: max relative error ~1e-7 for results in [3e-38, 3.4e38] (~1 ulp, as expf).

    Cody-Waite range reduction, the Cephes expf polynomial and ``2**(k-1)`` built from its IEEE-754 bits.  NaN stays
    NaN, -inf gives 0, +inf gives +inf.  ``math.exp`` would compile to a scalar libm call (~4x slower here, and it
    blocks vectorisation of the whole loop).
    """
    v = min(max(x, _EXP_LO), _EXP_HI)
    kf = np.floor(v * _LOG2E + _HALF32)
    r = v - kf * _LN2_HI
    r = r - kf * _LN2_LO
    p = _P0
    p = p * r + _P1
    p = p * r + _P2
    p = p * r + _P3
    p = p * r + _P4
    p = p * r + _P5
    p = p * r * r + r + _ONE32
    # The clamp maps NaN to a bound; this select (no branch, still vectorises) restores it.
    p = _TWO32 * p if x == x else x
    return p * _i32_as_f32((np.int32(kf) + _BIAS32) << _SHIFT32)  # type: ignore[call-arg]


def _exp(x: Any) -> Any:
    """``exp`` for the kernels: fast float32 approximation for float32, ``math.exp`` for float64 (via overload)."""
    return math.exp(x)


@overload(_exp, inline="always")
def _exp_overload(x: Any) -> Any:
    # Resolved at compile time from the argument type, so every loop is specialised without a runtime branch.
    # (numba requires the implementation's parameters, annotations included, to match this function's.)
    if x == types.float32:

        def impl32(x: Any) -> Any:
            return _fexp32(x)

        return impl32

    def impl(x: Any) -> Any:
        return math.exp(x)

    return impl


def _one(like: Any) -> Any:
    """The constant 1 in the float type of ``like`` (resolved at compile time by the overload below).

    Python float literals are float64 in numba and would promote float32 arithmetic to float64, which halves the SIMD
    width and blocks vectorisation.
    """
    return 1.0


@overload(_one, inline="always")
def _one_overload(like: Any) -> Any:
    if like == types.float32:

        def impl32(like: Any) -> Any:
            return np.float32(1.0)

        return impl32

    def impl(like: Any) -> Any:
        return 1.0

    return impl


# --------------------------------------------------------------------------------------------------------------
# Block helpers.  Each is a separate small function on purpose: numba optimises every function in its own LLVM
# module first, and LLVM's loop vectoriser only handles these loops (runtime alias checks between numba arrays)
# when a function contains few arrays and simple loop nests.  Shapes: lanes K = K_LANES, T = T_BLOCK,
# [t, k] block arrays (T, K), [n, k] per-lane arrays (N, K), [t, n, k] block states (T or T + 1, N, K),
# [t, n] B/C rows of the block (tl, N).
# --------------------------------------------------------------------------------------------------------------


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _decays(dA: np.ndarray, dtl: np.ndarray, At: np.ndarray, tl: int) -> None:
    """``dA[t, n, k] = exp(dt[t, k] * A[n, k])`` for the block.

    Two passes (products, then exp over the flat buffer) measured ~20% faster than evaluating exp inside the
    recurrence loop: the long flat loop pipelines better than 32-lane inner loops.
    """
    N = At.shape[0]
    nk = dtl.shape[1]  # runtime trip count: a constant one gets fully unrolled, not vectorised
    for t in range(tl):
        for n in range(N):
            for k in range(nk):
                dA[t, n, k] = dtl[t, k] * At[n, k]
    flat = dA.reshape(dA.size)
    for i in range(tl * N * nk):
        flat[i] = _exp(flat[i])


# --------------------------------------------------------------------------------------------------------------
# Loading a task's lanes and running tasks on threads
# --------------------------------------------------------------------------------------------------------------


@njit(cache=True, error_model="numpy")
def _load_lanes(
    b: int, d0: int, kk: int, A: np.ndarray, B2: np.ndarray, C2: np.ndarray, D: np.ndarray, bvar: bool, cvar: bool,
    has_D: bool, At: np.ndarray, Bl: np.ndarray, Cl: np.ndarray, Dl: np.ndarray,
) -> None:  # fmt: skip
    """Copies the per-channel parameters of the task into lane-major arrays (lanes >= kk stay zero)."""
    N = A.shape[1]
    for k in range(kk):
        for n in range(N):
            At[n, k] = A[d0 + k, n]
            if not bvar:
                Bl[n, k] = B2[d0 + k, n]
            if not cvar:
                Cl[n, k] = C2[d0 + k, n]
        if has_D:
            Dl[k] = D[d0 + k]


@njit(cache=True, error_model="numpy")
def _gather(dst: np.ndarray, src: np.ndarray, b: int, d0: int, kk: int, l0: int, tl: int) -> None:
    """``dst[t, k] = src[b, d0 + k, l0 + t]`` (reads are contiguous in time)."""
    for k in range(kk):
        for t in range(tl):
            dst[t, k] = src[b, d0 + k, l0 + t]


@njit(cache=True, error_model="numpy")
def _scatter(dst: np.ndarray, src: np.ndarray, b: int, d0: int, kk: int, l0: int, tl: int) -> None:
    """``dst[b, d0 + k, l0 + t] = src[t, k]``."""
    for k in range(kk):
        for t in range(tl):
            dst[b, d0 + k, l0 + t] = src[t, k]


_POOL: ThreadPoolExecutor | None = None
_POOL_PID = -1
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """Process-wide worker pool, recreated after a fork (a forked child does not inherit the threads)."""
    global _POOL, _POOL_PID
    with _POOL_LOCK:
        if _POOL is None or os.getpid() != _POOL_PID or _POOL._max_workers < workers:
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="occscene-selective-scan")
            _POOL_PID = os.getpid()
        return _POOL


def _run_tasks(fn: Callable[..., None], n_tasks: int, num_threads: int, *args: Any) -> None:
    """Runs ``fn(lo, hi, *args)`` over ``range(n_tasks)`` on ``num_threads`` threads (the caller included).

    Threads instead of numba's ``parallel=True``: the kernels release the GIL (``nogil=True``), compiling a
    ``prange`` driver took ~20 s per kernel and dtype, and numba's OpenMP pool (a second libgomp next to
    PyTorch's) spin-waits against PyTorch's threads between the element-wise ops and the scan.  Chunks are handed
    out dynamically so a core that is busy with something else does not stall the whole scan.
    """
    workers = max(1, min(num_threads, n_tasks))
    if workers == 1:
        fn(0, n_tasks, *args)
        return
    chunk = max(1, n_tasks // (4 * workers))
    starts = iter(range(0, n_tasks, chunk))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                lo = next(starts, None)
            if lo is None:
                return
            fn(lo, min(lo + chunk, n_tasks), *args)

    futures = [_pool(workers - 1).submit(work) for _ in range(workers - 1)]
    work()
    for f in futures:
        f.result()


def plan_blocks(dim: int, groups_b: int, groups_c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Splits the channels into blocks of at most ``K_LANES`` channels that never straddle a B or C group.

    Args:
        dim: Number of channels.
        groups_b: Number of B groups (0 for time-invariant B, whose values are per channel).
        groups_c: Number of C groups (0 for time-invariant C).

    Returns:
        ``(d0, kk, gB, gC)``: int64 arrays of shape ``(n_blocks,)`` with the first channel, the number of channels,
        and the B and C group index of every block.
    """
    per_b = dim // groups_b if groups_b > 0 else dim
    per_c = dim // groups_c if groups_c > 0 else dim
    seg = math.gcd(per_b, per_c)
    d0s: list[int] = []
    kks: list[int] = []
    for s0 in range(0, dim, seg):
        for off in range(0, seg, K_LANES):
            d0s.append(s0 + off)
            kks.append(min(K_LANES, seg - off))
    d0 = np.asarray(d0s, dtype=np.int64)
    kk = np.asarray(kks, dtype=np.int64)
    gB = d0 // per_b if groups_b > 0 else np.zeros_like(d0)
    gC = d0 // per_c if groups_c > 0 else np.zeros_like(d0)
    return d0, kk, gB, gC


def _split_bc(X: np.ndarray, ft: np.dtype) -> tuple[np.ndarray, np.ndarray, bool]:
    """Returns ``(X4, X2, is_variable)`` with a 1-element dummy for the unused layout (numba needs fixed ndims)."""
    if X.ndim == 4:
        return X, np.zeros((1, 1), ft), True
    return np.zeros((1, 1, 1, 1), ft), X, False
