"""Mamba's selective scan (S6) with a fused CPU kernel, a pure-PyTorch fallback and the per-step reference.

Semantics, argument names, shapes and dtypes follow ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``
and ``selective_scan_ref`` (state-spaces/mamba).  For every channel ``d`` of every batch element the scan runs the
discretised linear recurrence over time ``l``::

    delta_l = softplus(delta[l] + delta_bias)            (bias / softplus optional)
    h_l     = exp(delta_l * A) * h_{l-1} + delta_l * B_l * u_l      h: (N,), h_{-1} = 0
    y_l     = C_l . h_l + D * u_l
    out_l   = y_l * silu(z_l)                            (gate optional)

Backends, chosen by :func:`selective_scan` (see :func:`selective_scan_backend`):

* ``"mamba_ssm"``: the CUDA kernel of ``mamba_ssm`` when it imports and the tensors are on a CUDA device.
* ``"numba"``: on CPU when the optional ``numba`` is installed (``pip install occscene-pl[cpu-fast]``): fused
  forward and hand-written backward kernels (:mod:`occscene_pl.ops._scan_kernels`) wrapped in a
  :class:`torch.autograd.Function`; never materialises the ``(batch, dim, L, N)`` state.  The kernel module, and so
  numba, is imported on first use, not with this module; a numba that is installed but fails to import (e.g. an
  incompatible llvmlite or NumPy) gives one warning and the ``"torch"`` backend.
* ``"torch"``: everywhere else (CUDA without ``mamba_ssm``, CPU without numba, other devices, float64 on CUDA): a
  chunked two-level scan in plain PyTorch (:func:`selective_scan_chunked`), differentiated by autograd.

:func:`selective_scan_reference` is the slow per-time-step loop of mamba's ``selective_scan_ref`` and is the
correctness reference of the tests.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import warnings
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "HAS_MAMBA_SSM",
    "HAS_NUMBA",
    "selective_scan",
    "selective_scan_backend",
    "selective_scan_chunked",
    "selective_scan_reference",
]

# mamba_ssm raises all sorts of errors (ImportError, OSError for a missing libcudart, RuntimeError from CUDA
# extension loading, ...) on machines without a working CUDA build, hence the broad except.
try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_selective_scan_fn

    HAS_MAMBA_SSM: bool = True
except Exception:  # noqa: BLE001 - see above
    _mamba_selective_scan_fn = None
    HAS_MAMBA_SSM = False

# numba is optional (the `cpu-fast` extra). Whether it is installed is looked up without importing it; the kernels
# are imported by _load_scan_kernels on first use.
HAS_NUMBA: bool = importlib.util.find_spec("numba") is not None
_scan_kernels: ModuleType | None = None
_scan_kernels_failed = False


def _load_scan_kernels() -> ModuleType | None:
    """The numba kernel module, imported on the first call.

    Returns:
        :mod:`occscene_pl.ops._scan_kernels`, or ``None`` when numba is not installed or fails to import (then a
        :class:`RuntimeWarning` is issued once and the PyTorch scan is used).
    """
    global _scan_kernels, _scan_kernels_failed
    if _scan_kernels is None and HAS_NUMBA and not _scan_kernels_failed:
        try:
            _scan_kernels = importlib.import_module("occscene_pl.ops._scan_kernels")
        except ImportError as error:  # numba without a compatible llvmlite / NumPy
            _scan_kernels_failed = True
            warnings.warn(
                f"numba is installed but cannot be imported ({error}); the selective scan uses its PyTorch fallback",
                RuntimeWarning,
                stacklevel=2,
            )
    return _scan_kernels


def _require_scan_kernels() -> ModuleType:
    """The numba kernel module; only called on the ``"numba"`` backend, which is chosen only when it imports."""
    kernels = _load_scan_kernels()
    if kernels is None:
        raise RuntimeError("the numba selective-scan kernels are not available")
    return kernels


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAMBA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Internal precision: float32 for half/bfloat16/float32 inputs (as mamba), float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_inputs(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
) -> None:
    """Validates shapes and dtypes; raises ``ValueError``/``TypeError``/``NotImplementedError`` with the culprit."""
    if u.dim() != 3:
        raise ValueError(f"u must have shape (batch, dim, L), got {tuple(u.shape)}")
    batch, dim, L = u.shape
    if L == 0:
        raise ValueError("u has sequence length L = 0")
    if u.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"u must be float16, bfloat16, float32 or float64, got {u.dtype}")
    if delta.shape != u.shape:
        raise ValueError(f"delta must have the shape of u {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.is_complex():
        raise NotImplementedError("complex A is not supported by occscene_pl's selective_scan (only real A)")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must have shape (dim={dim}, N), got {tuple(A.shape)}")
    N = A.shape[1]
    for name, X in (("B", B), ("C", C)):
        if X.is_complex():
            raise NotImplementedError(f"complex {name} is not supported by occscene_pl's selective_scan")
        if X.dim() == 2:
            if tuple(X.shape) != (dim, N):
                raise ValueError(f"time-invariant {name} must have shape (dim={dim}, N={N}), got {tuple(X.shape)}")
        elif X.dim() == 3:
            if tuple(X.shape) != (batch, N, L):
                raise ValueError(f"{name} must have shape (batch={batch}, N={N}, L={L}), got {tuple(X.shape)}")
        elif X.dim() == 4:
            G = X.shape[1]
            if X.shape[0] != batch or X.shape[2] != N or X.shape[3] != L or G == 0:
                raise ValueError(
                    f"grouped {name} must have shape (batch={batch}, G, N={N}, L={L}), got {tuple(X.shape)}"
                )
            if dim % G != 0:
                raise ValueError(f"dim={dim} must be divisible by the number of {name} groups G={G}")
        else:
            raise ValueError(f"{name} must be (dim, N), (batch, N, L) or (batch, G, N, L), got {tuple(X.shape)}")
    if D is not None and tuple(D.shape) != (dim,):
        raise ValueError(f"D must have shape (dim={dim},), got {tuple(D.shape)}")
    if delta_bias is not None and tuple(delta_bias.shape) != (dim,):
        raise ValueError(f"delta_bias must have shape (dim={dim},), got {tuple(delta_bias.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have the shape of u {tuple(u.shape)}, got {tuple(z.shape)}")


def _expand_groups(X: Tensor, dim: int) -> Tensor:
    """Expand grouped B/C ``(batch, G, N, L)`` to ``(batch, dim, N, L)``.

    Channel ``d`` uses group ``d // (dim // G)`` (einops ``"B G N L -> B (G H) N L"`` in mamba).
    """
    return X.repeat_interleave(dim // X.shape[1], dim=1)


def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-time-step reference scan, a transcription of mamba's ``selective_scan_ref`` (real A only).

    Slow on purpose (a Python loop over L with small tensor ops, and autograd through all of it): it is the
    ground truth for the tests.  Only deviation from mamba: float64 inputs are computed in float64 (mamba's
    ``.float()`` would silently downcast them), which lets the tests compare in double precision.

    Args:
        u: ``(batch, dim, L)`` input sequence.
        delta: ``(batch, dim, L)`` time steps (before ``delta_bias`` / softplus).
        A: ``(dim, N)`` real state matrix (diagonal per channel).
        B: ``(dim, N)`` time-invariant, ``(batch, N, L)`` or grouped ``(batch, G, N, L)`` with ``dim % G == 0``.
        C: Same layouts as B.
        D: Optional ``(dim,)`` skip connection.
        z: Optional ``(batch, dim, L)`` gate; the output is multiplied by ``silu(z)``.
        delta_bias: Optional ``(dim,)`` added to delta.
        delta_softplus: Apply softplus to ``delta + delta_bias``.
        return_last_state: Also return the final state.

    Returns:
        ``out (batch, dim, L)`` in u's dtype, and with ``return_last_state`` also ``last_state (batch, dim, N)`` in
        the compute dtype (float32, or float64 for float64 inputs).
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    cdt = _compute_dtype(dtype_in)
    u = u.to(cdt)
    delta = delta.to(cdt)
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].to(cdt)
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, dstate = u.shape[0], A.shape[0], A.shape[1]
    is_variable_B = B.dim() >= 3
    is_variable_C = C.dim() >= 3
    A = A.to(cdt)
    B = B.to(cdt)
    C = C.to(cdt)
    x = A.new_zeros((batch, dim, dstate))
    ys = []
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    if not is_variable_B:
        deltaB_u = torch.einsum("bdl,dn,bdl->bdln", delta, B, u)
    elif B.dim() == 3:
        deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    else:
        deltaB_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, _expand_groups(B, dim), u)
    if is_variable_C and C.dim() == 4:
        C = _expand_groups(C, dim)
    last_state = x
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        if not is_variable_C:
            y = torch.einsum("bdn,dn->bd", x, C)
        elif C.dim() == 3:
            y = torch.einsum("bdn,bn->bd", x, C[:, :, i])
        else:
            y = torch.einsum("bdn,bdn->bd", x, C[:, :, :, i])
        if i == u.shape[2] - 1:
            last_state = x
        ys.append(y)
    y = torch.stack(ys, dim=2)  # (batch, dim, L)
    out = y if D is None else y + u * D.to(cdt)[:, None]
    if z is not None:
        out = out * F.silu(z)
    out = out.to(dtype=dtype_in)
    return out if not return_last_state else (out, last_state)


def _prepare_delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, cdt: torch.dtype) -> Tensor:
    """Applies the optional bias and softplus in the compute dtype (differentiable torch ops)."""
    dt = delta.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    return dt


def _default_chunk(L: int) -> int:
    """Chunk length minimising the number of sequential Python steps (``chunk + L / chunk``)."""
    return max(1, int(round(math.sqrt(L))))


def selective_scan_chunked(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    chunk_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Pure-PyTorch selective scan (any device, autograd), same arguments and results as :func:`selective_scan`.

    Two-level scan: the sequence is cut into ``n_chunks`` chunks of ``chunk_size`` steps.  (1) All chunks run the
    recurrence from a zero state simultaneously (``chunk_size`` vectorised steps) while also tracking the
    cumulative decay ``P_t = prod exp(delta A)``; (2) the carries between chunks are propagated
    (``n_chunks`` small steps); (3) ``h = h_local + P * carry``.  About ``2 sqrt(L)`` sequential steps instead of
    L, and only products of decays and sums (no ``exp(-cumsum)`` as in log-space scans), so it is as stable as
    the sequential recurrence.  It materialises a few ``(batch, dim, L, N)`` tensors: memory-bound, and meant as a
    portable fallback, not the fast path.

    Args:
        u: ``(batch, dim, L)`` input sequence.
        delta: ``(batch, dim, L)`` time steps (before ``delta_bias`` / softplus).
        A: ``(dim, N)`` real state matrix.
        B: ``(dim, N)``, ``(batch, N, L)`` or grouped ``(batch, G, N, L)``, as in :func:`selective_scan_reference`.
        C: Same layouts as B.
        D: Optional ``(dim,)`` skip connection.
        z: Optional ``(batch, dim, L)`` gate; the output is multiplied by ``silu(z)``.
        delta_bias: Optional ``(dim,)`` added to delta.
        delta_softplus: Apply softplus to ``delta + delta_bias``.
        return_last_state: Also return the final state.
        chunk_size: Steps per chunk (default ``round(sqrt(L))``).

    Returns:
        ``out (batch, dim, L)`` in u's dtype, and with ``return_last_state`` also ``(batch, dim, N)`` (compute dtype).
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    cdt = _compute_dtype(dtype_in)
    batch, dim, L = u.shape
    N = A.shape[1]
    T = chunk_size or _default_chunk(L)
    n_chunks = -(-L // T)
    pad = n_chunks * T - L
    uc = u.to(cdt)
    dt = _prepare_delta(delta, delta_bias, delta_softplus, cdt)
    # Padding at the end uses delta = 0: decay exp(0) = 1 and no input, so the state after the padding equals the
    # state at step L - 1 (the last state) and the outputs of real steps are unaffected.
    dt_p = F.pad(dt, (0, pad))
    du_p = F.pad(dt * uc, (0, pad))
    log_a = dt_p[..., None] * A.to(cdt)[:, None, :]  # (batch, dim, L', N)
    a = torch.exp(log_a).view(batch, dim, n_chunks, T, N)
    if B.dim() == 2:
        bu = du_p[..., None] * B.to(cdt)[:, None, :]
    else:
        Bv = B.to(cdt) if B.dim() == 4 else B.to(cdt)[:, None]  # (batch, G, N, L)
        Bv = F.pad(Bv, (0, pad)).transpose(-1, -2)  # (batch, G, L', N)
        bu = (du_p.view(batch, Bv.shape[1], dim // Bv.shape[1], -1)[..., None] * Bv[:, :, None]).view(batch, dim, -1, N)
    bu = bu.view(batch, dim, n_chunks, T, N)
    # (1) local scans of all chunks at once, zero initial state.
    h = torch.zeros(batch, dim, n_chunks, N, dtype=cdt, device=u.device)
    hs = []
    for t in range(T):
        h = a[:, :, :, t] * h + bu[:, :, :, t]
        hs.append(h)
    h_local = torch.stack(hs, dim=3)  # (batch, dim, n_chunks, T, N)
    decay = torch.cumprod(a, dim=3)  # P_t: decay from the chunk start to step t (inclusive)
    # (2) carries: state entering chunk c.
    carry = torch.zeros(batch, dim, N, dtype=cdt, device=u.device)
    carries = []
    for c in range(n_chunks):
        carries.append(carry)
        carry = h_local[:, :, c, -1] + decay[:, :, c, -1] * carry
    carry_in = torch.stack(carries, dim=2)  # (batch, dim, n_chunks, N)
    # (3) true states.
    states = (h_local + decay * carry_in[:, :, :, None]).view(batch, dim, n_chunks * T, N)[:, :, :L]
    if C.dim() == 2:
        y = torch.einsum("bdln,dn->bdl", states, C.to(cdt))
    else:
        Cv = C.to(cdt) if C.dim() == 4 else C.to(cdt)[:, None]  # (batch, G, N, L)
        G = Cv.shape[1]
        y = torch.einsum("bghln,bgnl->bghl", states.view(batch, G, dim // G, L, N), Cv).reshape(batch, dim, L)
    out = y if D is None else y + uc * D.to(cdt)[:, None]
    if z is not None:
        out = out * F.silu(z.to(cdt))
    out = out.to(dtype_in)
    return out if not return_last_state else (out, carry)


def _bc_kernel_layout(X: Tensor, cdt: torch.dtype) -> Tensor:
    """Converts B/C to the kernel layout: ``(batch, G, L, N)`` contiguous (time-varying) or ``(dim, N)``.

    Done with differentiable torch ops outside the autograd.Function, so autograd maps the kernel's gradient back
    to the caller's layout and dtype.
    """
    X = X.to(cdt)
    if X.dim() == 3:
        X = X[:, None]
    if X.dim() == 4:
        X = X.transpose(-1, -2)
    return X.contiguous()


def _numpy_view(t: Tensor | None) -> np.ndarray | None:
    """Zero-copy NumPy view of a contiguous CPU tensor (None stays None)."""
    return t.detach().numpy() if t is not None else None


def _numpy_views(*ts: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Zero-copy NumPy views of the five required kernel inputs ``(u, dt, A, B, C)``."""
    u, dt, A, B, C = (t.detach().numpy() for t in ts)
    return u, dt, A, B, C


class _NumbaSelectiveScan(torch.autograd.Function):
    """Autograd wrapper of the numba kernels; all inputs are contiguous CPU tensors of one compute dtype."""

    @staticmethod
    def forward(
        ctx: Any,
        u: Tensor,
        dt: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor | None,
        z: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        save = any(ctx.needs_input_grad)
        # The kernels use as many threads as PyTorch's intra-op pool, so torch.set_num_threads() applies.
        out, last, ck = _require_scan_kernels().scan_fwd(
            *_numpy_views(u, dt, A, B, C),
            _numpy_view(D),
            _numpy_view(z),
            save_checkpoints=save,
            num_threads=torch.get_num_threads(),
        )
        if save:
            ctx.save_for_backward(u, dt, A, B, C, D, z, torch.from_numpy(ck))
        return torch.from_numpy(out), torch.from_numpy(last)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: Tensor | None, dlast: Tensor | None) -> tuple[Tensor | None, ...]:
        u, dt, A, B, C, D, z, ck = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(u)
        grads = _require_scan_kernels().scan_bwd(
            *_numpy_views(u, dt, A, B, C),
            _numpy_view(D),
            _numpy_view(z),
            ck.numpy(),
            dout.to(u.dtype).contiguous().numpy(),
            _numpy_view(dlast.to(u.dtype).contiguous() if dlast is not None else None),
            num_threads=torch.get_num_threads(),
        )

        def wrap(name: str, i: int) -> Tensor | None:
            g = grads[name]
            return torch.from_numpy(g) if g is not None and ctx.needs_input_grad[i] else None

        return wrap("du", 0), wrap("ddt", 1), wrap("dA", 2), wrap("dB", 3), wrap("dC", 4), wrap("dD", 5), wrap("dz", 6)


def _selective_scan_numba(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    return_last_state: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    """CPU fast path: the selective scan in the numba kernels.

    Bias/softplus, dtype casts and layout changes are cheap element-wise torch ops done here (autograd
    differentiates them); the scan, D and the SiLU gate run inside the kernels.
    """
    cdt = _compute_dtype(u.dtype)
    out, last = _NumbaSelectiveScan.apply(
        u.to(cdt).contiguous(),
        _prepare_delta(delta, delta_bias, delta_softplus, cdt).contiguous(),
        A.to(cdt).contiguous(),
        _bc_kernel_layout(B, cdt),
        _bc_kernel_layout(C, cdt),
        D.to(cdt).contiguous() if D is not None else None,
        z.to(cdt).contiguous() if z is not None else None,
    )
    out = out.to(u.dtype)
    return out if not return_last_state else (out, last)


def selective_scan_backend(u: Tensor) -> str:
    """Name of the backend :func:`selective_scan` uses for inputs like ``u``.

    Returns:
        ``"mamba_ssm"``, ``"numba"`` or ``"torch"`` (see the module docstring).
    """
    if u.device.type == "cuda":
        return "mamba_ssm" if HAS_MAMBA_SSM and u.dtype in _MAMBA_DTYPES else "torch"
    if u.device.type == "cpu" and HAS_NUMBA and _load_scan_kernels() is not None:
        return "numba"
    return "torch"


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan with mamba's ``selective_scan_fn`` interface, dispatched to the fastest available backend.

    Differentiable in u, delta, A, B, C, D, z and delta_bias.  Unlike mamba's CUDA kernel, the CPU backends also
    propagate gradients through the returned last state.

    Args:
        u: ``(batch, dim, L)`` input sequence (float16, bfloat16, float32 or float64).
        delta: ``(batch, dim, L)`` time steps (before ``delta_bias`` / softplus).
        A: ``(dim, N)`` real state matrix (diagonal per channel); complex A raises ``NotImplementedError``.
        B: ``(dim, N)`` time-invariant, ``(batch, N, L)`` or grouped ``(batch, G, N, L)`` with ``dim % G == 0``.
        C: Same layouts as B.
        D: Optional ``(dim,)`` skip connection: ``y += D * u``.
        z: Optional ``(batch, dim, L)`` gate: ``out = y * silu(z)``.
        delta_bias: Optional ``(dim,)`` added to delta before the softplus.
        delta_softplus: Apply softplus to ``delta + delta_bias``.
        return_last_state: Also return the state after the last step.

    Returns:
        ``out (batch, dim, L)`` in u's dtype, or ``(out, last_state)`` with ``last_state (batch, dim, N)`` in the
        compute dtype (float32, float64 for float64 inputs).  Half-precision inputs are computed in float32.

    Raises:
        ValueError: On inconsistent shapes.
        TypeError: If u is not a floating-point tensor.
        NotImplementedError: For complex A, B or C.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    backend = selective_scan_backend(u)
    if backend == "mamba_ssm":
        assert _mamba_selective_scan_fn is not None
        return _mamba_selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if backend == "numba":
        return _selective_scan_numba(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
