"""Numba CPU kernels for the selective scan (forward and hand-written backward).

This module is only imported when ``numba`` is installed; :mod:`occscene_pl.ops.selective_scan` falls back to a
pure-PyTorch scan otherwise.  The kernels work on NumPy views of contiguous torch tensors and never allocate the
``(batch, dim, L, N)`` state tensor that the reference materialises.

Layout and vectorisation strategy (why the code looks the way it does):

* Work is split into *tasks* of ``(batch index, block of K_LANES consecutive channels)``.  All channels of a block
  share the same B/C group, so a time-varying ``B[b, g, l, n]`` is a scalar that is broadcast across the block's
  channels.  The innermost loop of every hot loop runs over the ``K_LANES`` channels ("lanes"), which is an
  element-wise loop with a compile-time trip count: LLVM turns it into AVX/SSE vector code without any
  ``fastmath`` reassociation, and the per-channel state ``h[n, k]`` never needs a horizontal reduction in the
  forward pass.  ``K_LANES = 32`` matters: LLVM refuses to vectorise (runtime alias checks are needed because numba
  cannot prove that local arrays do not alias) loops whose trip count is below 16, and 32 was measurably faster.
* Time is processed in blocks of ``T_BLOCK`` steps.  Per block, ``exp(delta * A)`` is evaluated for all
  ``T_BLOCK * N * K_LANES`` entries in one flat loop with a vectorisable float32 ``exp`` (Cody-Waite range reduction
  + degree-6 polynomial + exponent bit manipulation; max relative error ~1e-7, i.e. ~1 ulp like ``torch.exp``).
  ``math.exp`` would compile to a scalar libm call that is ~4x slower and dominated the runtime.  Float64 inputs
  use ``math.exp`` (they are used for tests, where accuracy matters more than speed).
* The forward pass stores the state at the start of every time block (``(batch, dim, n_blocks, N)``, 1/T_BLOCK of
  the full state tensor).  The backward pass walks the blocks in reverse, recomputes the block's states from the
  checkpoint into an L1/L2-resident buffer and runs the adjoint recurrence backwards in time.
* Reductions over channels (``dB``/``dC`` for time-varying B/C) are the only horizontal sums; the backward kernel is
  compiled with ``fastmath={"reassoc", "contract"}`` so those vectorise.  No ``nnan``/``ninf`` flags are used, so
  NaN/inf propagate exactly as in PyTorch.  The ``exp`` helper is compiled without ``reassoc`` because reassociation
  would destroy its extended-precision range reduction.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numba
import numpy as np
from llvmlite import ir as llvm_ir
from numba import njit, types
from numba.extending import intrinsic, overload

__all__ = ["K_LANES", "T_BLOCK", "NUMBA_VERSION", "scan_bwd", "scan_fwd"]

NUMBA_VERSION: str = numba.__version__

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
    """The constant 1 in the float type of ``like`` (Python float literals are float64 in numba and would promote
    float32 arithmetic to float64, which halves the SIMD width and blocks vectorisation)."""
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


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _rec_fwd_var(
    dA: np.ndarray, h: np.ndarray, dul: np.ndarray, yl: np.ndarray, Bt: np.ndarray, Ct: np.ndarray, tl: int
) -> None:
    """Forward recurrence over one block, time-varying B and C: ``h = dA h + dt u B_t``, ``y = C_t . h``."""
    N = h.shape[0]
    nk = dul.shape[1]
    for t in range(tl):
        for k in range(nk):
            yl[t, k] = 0.0
        for n in range(N):
            bs = Bt[t, n]
            cs = Ct[t, n]
            for k in range(nk):
                hv = dA[t, n, k] * h[n, k] + dul[t, k] * bs
                h[n, k] = hv
                yl[t, k] += cs * hv


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _rec_fwd_any(
    dA: np.ndarray, h: np.ndarray, dul: np.ndarray, yl: np.ndarray, Bt: np.ndarray, Ct: np.ndarray,
    Bl: np.ndarray, Cl: np.ndarray, tl: int,
) -> None:  # fmt: skip
    """As :func:`_rec_fwd_var` for any B/C kind: the B value is ``Bt[t, n] + Bl[n, k]`` where the unused one of
    the time-varying row ``Bt`` and the per-lane time-invariant ``Bl`` is zero (one code path for all kinds)."""
    N = h.shape[0]
    nk = dul.shape[1]
    for t in range(tl):
        for k in range(nk):
            yl[t, k] = 0.0
        for n in range(N):
            bs = Bt[t, n]
            cs = Ct[t, n]
            for k in range(nk):
                hv = dA[t, n, k] * h[n, k] + dul[t, k] * (bs + Bl[n, k])
                h[n, k] = hv
                yl[t, k] += (cs + Cl[n, k]) * hv


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _rec_states(dA: np.ndarray, H: np.ndarray, dul: np.ndarray, Bt: np.ndarray, Bl: np.ndarray, tl: int) -> None:
    """Recomputes a block's states ``H[t + 1] = dA[t] H[t] + dt u B`` from the checkpoint ``H[0]``."""
    N = H.shape[1]
    nk = dul.shape[1]
    for t in range(tl):
        for n in range(N):
            bs = Bt[t, n]
            for k in range(nk):
                H[t + 1, n, k] = dA[t, n, k] * H[t, n, k] + dul[t, k] * (bs + Bl[n, k])


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _y_from_states(yl: np.ndarray, H1: np.ndarray, Ct: np.ndarray, Cl: np.ndarray, tl: int) -> None:
    """``yl[t] = C_t . H1[t]`` (``H1`` = states after each step)."""
    nk = yl.shape[1]  # runtime trip count: a constant one gets fully unrolled, not vectorised
    N = H1.shape[1]
    for t in range(tl):
        for k in range(nk):
            yl[t, k] = 0.0
        for n in range(N):
            cs = Ct[t, n]
            for k in range(nk):
                yl[t, k] += (cs + Cl[n, k]) * H1[t, n, k]


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _gate_fwd(yl: np.ndarray, ul: np.ndarray, zl: np.ndarray, Dl: np.ndarray, has_z: bool, tl: int) -> None:
    """``yl = (yl + D u) * silu(z)`` in place (``Dl`` is zero without D)."""
    nk = yl.shape[1]  # runtime trip count: a constant one gets fully unrolled, not vectorised
    for t in range(tl):
        for k in range(nk):
            yl[t, k] += Dl[k] * ul[t, k]
    if has_z:
        for t in range(tl):
            for k in range(nk):
                zv = zl[t, k]
                yl[t, k] *= zv / (_one(zv) + _exp(-zv))


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _gate_bwd(
    dyl: np.ndarray, dzl: np.ndarray, dol: np.ndarray, yl: np.ndarray, ul: np.ndarray, zl: np.ndarray,
    Dl: np.ndarray, tl: int,
) -> None:  # fmt: skip
    """Backward of the SiLU gate: ``dy = dout * silu(z)``, ``dz = dout * (y + D u) * silu'(z)``."""
    nk = dyl.shape[1]  # runtime trip count: a constant one gets fully unrolled, not vectorised
    for t in range(tl):
        for k in range(nk):
            zv = zl[t, k]
            one = _one(zv)
            s = one / (one + _exp(-zv))
            do = dol[t, k]
            dyl[t, k] = do * zv * s
            dzl[t, k] = do * (yl[t, k] + Dl[k] * ul[t, k]) * s * (one + zv * (one - s))


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _adjoint(
    g: np.ndarray, G: np.ndarray, dA: np.ndarray, dyl: np.ndarray, Ct: np.ndarray, Cl: np.ndarray, tl: int
) -> None:
    """Adjoint recurrence backwards over a block: ``G[t] = g + dy_t C_t`` (= dL/dh_t), then ``g = dA[t] G[t]``."""
    nk = dyl.shape[1]  # runtime trip count: a constant one gets fully unrolled, not vectorised
    N = g.shape[0]
    for t in range(tl - 1, -1, -1):
        for n in range(N):
            cs = Ct[t, n]
            for k in range(nk):
                gv = g[n, k] + dyl[t, k] * (cs + Cl[n, k])
                G[t, n, k] = gv
                g[n, k] = gv * dA[t, n, k]


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _decay_grad(S: np.ndarray, G: np.ndarray, H: np.ndarray, m: int) -> None:
    """``S = G * H_prev * dA`` in place over the flat block (``S`` holds dA on entry, ``H`` starts at H[0])."""
    for i in range(m):
        S[i] = G[i] * H[i] * S[i]


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _lane_sums(
    S: np.ndarray, G: np.ndarray, At: np.ndarray, dtl: np.ndarray, Bt: np.ndarray, Bl: np.ndarray,
    sdt: np.ndarray, sgb: np.ndarray, dA_acc: np.ndarray, tl: int,
) -> None:  # fmt: skip
    """Per-lane sums over n and t: ``sdt[t] = sum_n S A``, ``sgb[t] = sum_n G B``, ``dA_acc += sum_t S dt``."""
    nk = sdt.shape[1]  # runtime trip count: a constant one gets fully unrolled, not vectorised
    N = At.shape[0]
    for t in range(tl):
        for k in range(nk):
            sdt[t, k] = 0.0
            sgb[t, k] = 0.0
        for n in range(N):
            for k in range(nk):
                sdt[t, k] += S[t, n, k] * At[n, k]
        for n in range(N):
            bs = Bt[t, n]
            for k in range(nk):
                sgb[t, k] += G[t, n, k] * (bs + Bl[n, k])
        for n in range(N):
            for k in range(nk):
                dA_acc[n, k] += S[t, n, k] * dtl[t, k]


@njit(cache=True, fastmath=_FM_REDUCE, error_model="numpy")
def _reduce_lanes(out: np.ndarray, X: np.ndarray, w: np.ndarray, tl: int) -> None:
    """``out[t, n] = sum_k X[t, n, k] w[t, k]`` (gradient of a time-varying B or C row)."""
    nk = w.shape[1]  # runtime trip count: a constant one gets fully unrolled, not vectorised
    N = X.shape[1]
    for t in range(tl):
        for n in range(N):
            acc = X[t, n, 0] * w[t, 0]
            for k in range(1, nk):
                acc += X[t, n, k] * w[t, k]
            out[t, n] = acc


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _accumulate_lanes(acc: np.ndarray, X: np.ndarray, w: np.ndarray, tl: int) -> None:
    """``acc[n, k] += sum_t X[t, n, k] w[t, k]`` (gradient of a time-invariant B or C)."""
    nk = w.shape[1]  # runtime trip count: a constant one gets fully unrolled, not vectorised
    N = X.shape[1]
    for t in range(tl):
        for n in range(N):
            for k in range(nk):
                acc[n, k] += X[t, n, k] * w[t, k]


# --------------------------------------------------------------------------------------------------------------
# Tasks and parallel drivers
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


@njit(nogil=True, cache=True, fastmath=_FM, error_model="numpy")
def _fwd_tasks(
    lo: int, hi: int, u: np.ndarray, dt: np.ndarray, A: np.ndarray, B4: np.ndarray, B2: np.ndarray, C4: np.ndarray,
    C2: np.ndarray, D: np.ndarray, z: np.ndarray, bvar: bool, cvar: bool, has_D: bool, has_z: bool,
    blk_d0: np.ndarray, blk_kk: np.ndarray, blk_gB: np.ndarray, blk_gC: np.ndarray, out: np.ndarray,
    last: np.ndarray, ck: np.ndarray, save_ck: bool,
) -> None:  # fmt: skip
    """Forward scan of tasks ``lo .. hi-1`` (task = batch index * n_blocks + channel block), GIL released.

    The per-task driver is deliberately not a separate function: every extra level of numba functions around
    the helpers costs seconds of (cold) compile time.
    """
    K = K_LANES
    T = T_BLOCK
    L = u.shape[2]
    N = A.shape[1]
    ft = u.dtype
    nb = blk_d0.shape[0]
    h = np.zeros((N, K), ft)
    At = np.zeros((N, K), ft)
    Bl = np.zeros((N, K), ft)
    Cl = np.zeros((N, K), ft)
    Dl = np.zeros(K, ft)
    zero_rows = np.zeros((T, N), ft)  # stands in for the B/C rows of a time-invariant B/C
    dtl = np.zeros((T, K), ft)
    ul = np.zeros((T, K), ft)
    dul = np.zeros((T, K), ft)
    yl = np.zeros((T, K), ft)
    zl = np.zeros((T, K), ft)
    dA = np.zeros((T, N, K), ft)
    both_var = bvar and cvar
    for task in range(lo, hi):
        b = task // nb
        j = task - b * nb
        d0 = blk_d0[j]
        kk = blk_kk[j]
        gB = blk_gB[j]
        gC = blk_gC[j]
        # Lanes k >= kk must be zero (delta = 0 -> decay exp(0) = 1, zero input: a harmless zero state); the
        # scratch is reused across tasks with different kk, so reset it.
        for buf in (h, At, Bl, Cl, dtl, ul, zl):
            buf[:] = 0.0
        Dl[:] = 0.0
        _load_lanes(b, d0, kk, A, B2, C2, D, bvar, cvar, has_D, At, Bl, Cl, Dl)
        for jb in range((L + T - 1) // T):
            l0 = jb * T
            tl = min(T, L - l0)
            if save_ck:
                for k in range(kk):
                    for n in range(N):
                        ck[b, d0 + k, jb, n] = h[n, k]
            _gather(dtl, dt, b, d0, kk, l0, tl)
            _gather(ul, u, b, d0, kk, l0, tl)
            if has_z:
                _gather(zl, z, b, d0, kk, l0, tl)
            for t in range(tl):
                for k in range(K):
                    dul[t, k] = dtl[t, k] * ul[t, k]
            Bt = B4[b, gB, l0 : l0 + tl] if bvar else zero_rows
            Ct = C4[b, gC, l0 : l0 + tl] if cvar else zero_rows
            _decays(dA, dtl, At, tl)
            if both_var:
                _rec_fwd_var(dA, h, dul, yl, Bt, Ct, tl)
            else:
                _rec_fwd_any(dA, h, dul, yl, Bt, Ct, Bl, Cl, tl)
            _gate_fwd(yl, ul, zl, Dl, has_z, tl)
            _scatter(out, yl, b, d0, kk, l0, tl)
        for k in range(kk):
            for n in range(N):
                last[b, d0 + k, n] = h[n, k]


@njit(nogil=True, cache=True, fastmath=_FM, error_model="numpy")
def _bwd_tasks(
    lo: int, hi: int, u: np.ndarray, dt: np.ndarray, A: np.ndarray, B4: np.ndarray, B2: np.ndarray, C4: np.ndarray,
    C2: np.ndarray, D: np.ndarray, z: np.ndarray, bvar: bool, cvar: bool, has_D: bool, has_z: bool,
    blk_d0: np.ndarray, blk_kk: np.ndarray, blk_gB: np.ndarray, blk_gC: np.ndarray, ck: np.ndarray,
    dout: np.ndarray, dlast: np.ndarray, has_dlast: bool, du: np.ndarray, ddt: np.ndarray, dz: np.ndarray,
    dA_part: np.ndarray, dD_part: np.ndarray, dB4_part: np.ndarray, dB2_part: np.ndarray, dC4_part: np.ndarray,
    dC2_part: np.ndarray,
) -> None:  # fmt: skip
    """Backward of tasks ``lo .. hi-1``: per time block (last to first) recompute the states from the checkpoint,
    run the adjoint recurrence backwards in time and form the parameter gradients.

    With ``a_t = exp(delta_t A)``, ``h_t = a_t h_{t-1} + delta_t B_t u_t`` and ``y_t = C_t . h_t``, the adjoint
    ``G_t = dL/dh_t`` obeys ``G_t = a_{t+1} G_{t+1} + dy_t C_t`` (plus dL/dlast_state at the last step), and
    ``d delta_t = sum_n G_t (h_{t-1} a_t A + B_t u_t)``, ``dA = sum_t G_t h_{t-1} a_t delta_t``,
    ``dB_t = G_t delta_t u_t``, ``du_t = delta_t sum_n G_t B_t``, ``dC_t = dy_t h_t``.
    """
    K = K_LANES
    T = T_BLOCK
    L = u.shape[2]
    N = A.shape[1]
    ft = u.dtype
    nb = blk_d0.shape[0]
    g = np.zeros((N, K), ft)  # adjoint carried into the current step from the next one (a_{t+1} G_{t+1})
    At = np.zeros((N, K), ft)
    Bl = np.zeros((N, K), ft)
    Cl = np.zeros((N, K), ft)
    Dl = np.zeros(K, ft)
    dA_acc = np.zeros((N, K), ft)
    dB_acc = np.zeros((N, K), ft)
    dC_acc = np.zeros((N, K), ft)
    dD_acc = np.zeros(K, ft)
    zero_rows = np.zeros((T, N), ft)
    dA = np.zeros((T, N, K), ft)  # decays, then (in place) G * h_prev * decay
    dA_flat = dA.reshape(T * N * K)
    H = np.zeros((T + 1, N, K), ft)  # H[0] = state before the block, H[t + 1] = state after step t
    H_flat = H.reshape((T + 1) * N * K)
    H1 = H[1:]
    G = np.zeros((T, N, K), ft)
    G_flat = G.reshape(T * N * K)
    dtl = np.zeros((T, K), ft)
    ul = np.zeros((T, K), ft)
    dul = np.zeros((T, K), ft)
    yl = np.zeros((T, K), ft)
    zl = np.zeros((T, K), ft)
    dol = np.zeros((T, K), ft)
    dyl = np.zeros((T, K), ft)
    dzl = np.zeros((T, K), ft)
    sdt = np.zeros((T, K), ft)
    sgb = np.zeros((T, K), ft)
    for task in range(lo, hi):
        b = task // nb
        j = task - b * nb
        d0 = blk_d0[j]
        kk = blk_kk[j]
        gB = blk_gB[j]
        gC = blk_gC[j]
        for buf in (g, At, Bl, Cl, dA_acc, dB_acc, dC_acc, dtl, ul, zl, dol):
            buf[:] = 0.0
        Dl[:] = 0.0
        dD_acc[:] = 0.0
        H[0] = 0.0
        _load_lanes(b, d0, kk, A, B2, C2, D, bvar, cvar, has_D, At, Bl, Cl, Dl)
        if has_dlast:
            for k in range(kk):
                for n in range(N):
                    g[n, k] = dlast[b, d0 + k, n]
        for jb in range((L + T - 1) // T - 1, -1, -1):
            l0 = jb * T
            tl = min(T, L - l0)
            for k in range(kk):
                for n in range(N):
                    H[0, n, k] = ck[b, d0 + k, jb, n]
            _gather(dtl, dt, b, d0, kk, l0, tl)
            _gather(ul, u, b, d0, kk, l0, tl)
            _gather(dol, dout, b, d0, kk, l0, tl)
            for t in range(tl):
                for k in range(K):
                    dul[t, k] = dtl[t, k] * ul[t, k]
            Bt = B4[b, gB, l0 : l0 + tl] if bvar else zero_rows
            Ct = C4[b, gC, l0 : l0 + tl] if cvar else zero_rows
            _decays(dA, dtl, At, tl)
            _rec_states(dA, H, dul, Bt, Bl, tl)
            if has_z:
                _gather(zl, z, b, d0, kk, l0, tl)
                _y_from_states(yl, H1, Ct, Cl, tl)
                _gate_bwd(dyl, dzl, dol, yl, ul, zl, Dl, tl)
                _scatter(dz, dzl, b, d0, kk, l0, tl)
            else:
                for t in range(tl):
                    for k in range(K):
                        dyl[t, k] = dol[t, k]
            for t in range(tl):
                for k in range(K):
                    dD_acc[k] += dyl[t, k] * ul[t, k]
            _adjoint(g, G, dA, dyl, Ct, Cl, tl)
            _decay_grad(dA_flat, G_flat, H_flat, tl * N * K)
            _lane_sums(dA, G, At, dtl, Bt, Bl, sdt, sgb, dA_acc, tl)
            if bvar:
                _reduce_lanes(dB4_part[b, j, l0 : l0 + tl], G, dul, tl)
            else:
                _accumulate_lanes(dB_acc, G, dul, tl)
            if cvar:
                _reduce_lanes(dC4_part[b, j, l0 : l0 + tl], H1, dyl, tl)
            else:
                _accumulate_lanes(dC_acc, H1, dyl, tl)
            for t in range(tl):
                for k in range(K):
                    # Reuse buffers: sdt becomes d delta, sgb becomes du.
                    sdt[t, k] += sgb[t, k] * ul[t, k]
                    sgb[t, k] = sgb[t, k] * dtl[t, k] + dyl[t, k] * Dl[k]
            _scatter(ddt, sdt, b, d0, kk, l0, tl)
            _scatter(du, sgb, b, d0, kk, l0, tl)
        for k in range(kk):
            for n in range(N):
                dA_part[b, d0 + k, n] = dA_acc[n, k]
                if not bvar:
                    dB2_part[b, d0 + k, n] = dB_acc[n, k]
                if not cvar:
                    dC2_part[b, d0 + k, n] = dC_acc[n, k]
            dD_part[b, d0 + k] = dD_acc[k]


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


def scan_fwd(
    u: np.ndarray,
    dt: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    C: np.ndarray,
    D: np.ndarray | None,
    z: np.ndarray | None,
    save_checkpoints: bool,
    num_threads: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs the forward kernel on C-contiguous arrays of one float dtype (float32 or float64).

    Args:
        u: ``(batch, dim, L)`` input.
        dt: ``(batch, dim, L)`` delta, bias and softplus already applied.
        A: ``(dim, N)``.
        B: ``(batch, G, L, N)`` (time-varying, note L before N) or ``(dim, N)`` (time-invariant).
        C: same layouts as B (the group counts of B and C may differ).
        D: ``(dim,)`` or None.
        z: ``(batch, dim, L)`` or None.
        save_checkpoints: Whether to store the per-block states needed by :func:`scan_bwd`.
        num_threads: Worker threads (tasks are distributed dynamically, see :func:`_run_tasks`).

    Returns:
        ``out (batch, dim, L)``, ``last_state (batch, dim, N)`` and the checkpoints
        ``(batch, dim, ceil(L / T_BLOCK), N)`` (a 1-element dummy if not saved).
    """
    batch, dim, L = u.shape
    N = A.shape[1]
    ft = u.dtype
    B4, B2, bvar = _split_bc(B, ft)
    C4, C2, cvar = _split_bc(C, ft)
    d0, kk, gB, gC = plan_blocks(dim, B4.shape[1] if bvar else 0, C4.shape[1] if cvar else 0)
    out = np.empty((batch, dim, L), ft)
    last = np.empty((batch, dim, N), ft)
    n_blocks = (L + T_BLOCK - 1) // T_BLOCK
    ck = np.empty((batch, dim, n_blocks, N) if save_checkpoints else (1, 1, 1, 1), ft)
    _run_tasks(
        _fwd_tasks, batch * d0.shape[0], num_threads,
        u, dt, A, B4, B2, C4, C2,
        D if D is not None else np.zeros(1, ft), z if z is not None else np.zeros((1, 1, 1), ft),
        bvar, cvar, D is not None, z is not None,
        d0, kk, gB, gC, out, last, ck, save_checkpoints,
    )  # fmt: skip
    return out, last, ck


def scan_bwd(
    u: np.ndarray,
    dt: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    C: np.ndarray,
    D: np.ndarray | None,
    z: np.ndarray | None,
    checkpoints: np.ndarray,
    dout: np.ndarray,
    dlast: np.ndarray | None,
    num_threads: int = 1,
) -> dict[str, np.ndarray | None]:
    """Runs the backward kernel; arguments as in :func:`scan_fwd` plus the saved checkpoints and output grads.

    Args:
        u, dt, A, B, C, D, z: The forward inputs (see :func:`scan_fwd`).
        checkpoints: ``(batch, dim, ceil(L / T_BLOCK), N)`` from :func:`scan_fwd`.
        dout: ``(batch, dim, L)`` gradient of the output.
        dlast: ``(batch, dim, N)`` gradient of the last state, or None.
        num_threads: Worker threads.

    Returns:
        Dict with ``du``, ``ddt`` ``(batch, dim, L)``, ``dz`` (or None), ``dA`` ``(dim, N)``, ``dD`` ``(dim,)``
        (or None), ``dB``/``dC`` in the layout of B/C.  Time-varying ones are first written per channel block
        (different blocks of one group run on different threads, so they cannot share an accumulator) and summed
        per group here.
    """
    batch, dim, L = u.shape
    N = A.shape[1]
    ft = u.dtype
    B4, B2, bvar = _split_bc(B, ft)
    C4, C2, cvar = _split_bc(C, ft)
    d0, kk, gB, gC = plan_blocks(dim, B4.shape[1] if bvar else 0, C4.shape[1] if cvar else 0)
    nblk = d0.shape[0]
    du = np.empty((batch, dim, L), ft)
    ddt = np.empty((batch, dim, L), ft)
    dz = np.empty((batch, dim, L), ft) if z is not None else np.zeros((1, 1, 1), ft)
    dA_part = np.empty((batch, dim, N), ft)
    dD_part = np.empty((batch, dim), ft)
    dB4 = np.empty((batch, nblk, L, N), ft) if bvar else np.zeros((1, 1, 1, 1), ft)
    dB2 = np.zeros((1, 1, 1), ft) if bvar else np.empty((batch, dim, N), ft)
    dC4 = np.empty((batch, nblk, L, N), ft) if cvar else np.zeros((1, 1, 1, 1), ft)
    dC2 = np.zeros((1, 1, 1), ft) if cvar else np.empty((batch, dim, N), ft)
    _run_tasks(
        _bwd_tasks, batch * nblk, num_threads,
        u, dt, A, B4, B2, C4, C2,
        D if D is not None else np.zeros(1, ft), z if z is not None else np.zeros((1, 1, 1), ft),
        bvar, cvar, D is not None, z is not None,
        d0, kk, gB, gC, checkpoints, dout,
        dlast if dlast is not None else np.zeros((1, 1, 1), ft), dlast is not None,
        du, ddt, dz, dA_part, dD_part, dB4, dB2, dC4, dC2,
    )  # fmt: skip
    return {
        "du": du,
        "ddt": ddt,
        "dz": dz if z is not None else None,
        "dA": dA_part.sum(0),
        "dD": dD_part.sum(0) if D is not None else None,
        "dB": _reduce_blocks(dB4, gB, B4.shape[1]) if bvar else dB2.sum(0),
        "dC": _reduce_blocks(dC4, gC, C4.shape[1]) if cvar else dC2.sum(0),
    }


def _reduce_blocks(part: np.ndarray, group_of_block: np.ndarray, groups: int) -> np.ndarray:
    """Sums ``(batch, n_blocks, L, N)`` per-block partial gradients into ``(batch, groups, L, N)``."""
    if part.shape[1] == groups:  # one block per group: nothing to reduce
        return part
    res = np.zeros((part.shape[0], groups) + part.shape[2:], part.dtype)
    for j in range(part.shape[1]):
        res[:, group_of_block[j]] += part[:, j]
    return res
