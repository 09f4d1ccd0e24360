"""Backward numba kernel of the selective scan: recomputed block states, the adjoint recurrence, parameter gradients.

Only imported through :mod:`occscene_pl.ops._scan_kernels` (which needs ``numba``); see its docstring for the layout.
Per time block, last to first, the states are recomputed from the forward pass's checkpoint into a cache-resident
buffer and the adjoint runs backwards in time; channel reductions (``dB``/``dC`` of time-varying B/C) are the only
horizontal sums and are compiled with ``reassoc`` so they vectorise.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from occscene_pl.ops._scan_kernels_common import (
    _FM,
    _FM_REDUCE,
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

__all__ = ["scan_bwd"]

# --------------------------------------------------------------------------------------------------------------
# Block helpers (see the note in _scan_kernels_common.py on why they are small functions)
# --------------------------------------------------------------------------------------------------------------


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
# Task driver and entry point
# --------------------------------------------------------------------------------------------------------------


@njit(nogil=True, cache=True, fastmath=_FM, error_model="numpy")
def _bwd_tasks(
    lo: int, hi: int, u: np.ndarray, dt: np.ndarray, A: np.ndarray, B4: np.ndarray, B2: np.ndarray, C4: np.ndarray,
    C2: np.ndarray, D: np.ndarray, z: np.ndarray, bvar: bool, cvar: bool, has_D: bool, has_z: bool,
    blk_d0: np.ndarray, blk_kk: np.ndarray, blk_gB: np.ndarray, blk_gC: np.ndarray, ck: np.ndarray,
    dout: np.ndarray, dlast: np.ndarray, has_dlast: bool, du: np.ndarray, ddt: np.ndarray, dz: np.ndarray,
    dA_part: np.ndarray, dD_part: np.ndarray, dB4_part: np.ndarray, dB2_part: np.ndarray, dC4_part: np.ndarray,
    dC2_part: np.ndarray,
) -> None:  # fmt: skip
    """Backward of tasks ``lo .. hi-1``, GIL released.

    Per time block (last to first): recompute the states from the checkpoint, run the adjoint recurrence backwards
    in time and form the parameter gradients.

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
    """Runs the backward kernel on the forward inputs, the saved checkpoints and the output gradients.

    Args:
        u: ``(batch, dim, L)`` forward input.
        dt: ``(batch, dim, L)`` delta as the forward pass used it (bias and softplus applied).
        A: ``(dim, N)``.
        B: ``(batch, G, L, N)`` (time-varying) or ``(dim, N)`` (time-invariant).
        C: same layouts as B.
        D: ``(dim,)`` or None.
        z: ``(batch, dim, L)`` or None.
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
