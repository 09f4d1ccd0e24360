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

The kernels live in three modules: :mod:`occscene_pl.ops._scan_kernels_common` (constants, ``exp``, lane loads,
the thread driver, :func:`plan_blocks`), :mod:`occscene_pl.ops._scan_kernels_fwd` (:func:`scan_fwd`) and
:mod:`occscene_pl.ops._scan_kernels_bwd` (:func:`scan_bwd`); this module imports ``numba`` first, so it fails to
import as a whole when numba is missing or broken, and re-exports their entry points.
"""

from __future__ import annotations

import numba

from occscene_pl.ops._scan_kernels_bwd import scan_bwd
from occscene_pl.ops._scan_kernels_common import K_LANES, T_BLOCK, plan_blocks
from occscene_pl.ops._scan_kernels_fwd import scan_fwd

__all__ = ["K_LANES", "T_BLOCK", "NUMBA_VERSION", "plan_blocks", "scan_bwd", "scan_fwd"]

NUMBA_VERSION: str = numba.__version__
