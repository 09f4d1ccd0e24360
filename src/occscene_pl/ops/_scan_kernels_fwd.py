"""Forward numba kernel of the selective scan: per task, the recurrence over time blocks, D and the SiLU gate.

Only imported through :mod:`occscene_pl.ops._scan_kernels` (which needs ``numba``); see its docstring for the layout
(tasks of ``K_LANES`` channels, time blocks of ``T_BLOCK`` steps, checkpoints for the backward pass).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from occscene_pl.ops._scan_kernels_common import (
    _FM,
    K_LANES,
    T_BLOCK,
    _decays,
    _exp,
    _gather,
    _load_lanes,
    _one,
    _run_tasks,
    _scatter,
    _split_bc,
    plan_blocks,
)

__all__ = ["scan_fwd"]

# --------------------------------------------------------------------------------------------------------------
# Block helpers (see the note in _scan_kernels_common.py on why they are small functions)
# --------------------------------------------------------------------------------------------------------------


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
    """As :func:`_rec_fwd_var` for any B/C kind (one code path for all kinds).

    The B value is ``Bt[t, n] + Bl[n, k]``, where the unused one of the time-varying row ``Bt`` and the per-lane
    time-invariant ``Bl`` is zero; likewise for C.
    """
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


# --------------------------------------------------------------------------------------------------------------
# Task driver and entry point
# --------------------------------------------------------------------------------------------------------------


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
