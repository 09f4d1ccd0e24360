"""Tests of ``occscene_pl.ops.selective_scan``: every backend against the per-step reference (values and the
gradients of all inputs, including through the returned last state), dtypes, dispatch and input validation."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from occscene_pl.ops import (
    HAS_NUMBA,
    selective_scan,
    selective_scan_backend,
    selective_scan_chunked,
    selective_scan_reference,
)

# The package re-exports the function `selective_scan`, which shadows the submodule of the same name.
ss_module = importlib.import_module("occscene_pl.ops.selective_scan")

requires_numba = pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed (no fast CPU kernel)")

INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

# (batch, dim, L, N, B kind, C kind, groups).  Kinds: "const" (dim, N), "var" (batch, N, L), "grouped"
# (batch, G, N, L).  The shapes cover: dim below one lane block (8 < 32 lanes), several channel blocks per group
# (96 / 2 groups = 48 = 32 + 16 lanes, so per-block dB/dC partials are summed), L longer than one time block
# (150, 300 > 128, so the backward recomputes states from checkpoints) and L not a multiple of it, mixed B/C kinds.
CASES = [
    (1, 8, 17, 4, "var", "var", 1),
    (2, 40, 70, 5, "grouped", "grouped", 2),
    (2, 96, 150, 8, "grouped", "grouped", 2),
    (2, 16, 33, 3, "const", "const", 1),
    (1, 24, 300, 4, "var", "grouped", 3),
    (2, 12, 29, 6, "grouped", "const", 2),
]
CASE_IDS = [f"b{c[0]}-d{c[1]}-L{c[2]}-N{c[3]}-{c[4]}-{c[5]}-G{c[6]}" for c in CASES]

FLAGS = [
    {"D": True, "z": True, "delta_bias": True, "delta_softplus": True},
    {"D": False, "z": False, "delta_bias": False, "delta_softplus": False},
    {"D": True, "z": False, "delta_bias": True, "delta_softplus": False},
    {"D": False, "z": True, "delta_bias": False, "delta_softplus": True},
]
FLAG_IDS = ["all", "none", "D-bias", "z-softplus"]


def make_inputs(
    batch: int,
    dim: int,
    L: int,
    N: int,
    b_kind: str,
    c_kind: str,
    groups: int,
    *,
    flags: dict[str, bool],
    dtype: torch.dtype = torch.float64,
    param_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> dict[str, Tensor | None]:
    """Random inputs in mamba's test ranges; A, D and delta_bias use ``param_dtype`` (mamba keeps them fp32)."""
    g = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or dtype

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    def bc(kind: str) -> Tensor:
        if kind == "const":
            return randn(dim, N)
        if kind == "var":
            return randn(batch, N, L)
        return randn(batch, groups, N, L)

    inputs: dict[str, Tensor | None] = {
        "u": randn(batch, dim, L).to(dtype),
        "delta": (0.5 * rand(batch, dim, L)).to(dtype),
        "A": (-0.5 - 2.0 * rand(dim, N)).to(param_dtype),
        "B": bc(b_kind).to(dtype),
        "C": bc(c_kind).to(dtype),
        "D": randn(dim).to(param_dtype) if flags["D"] else None,
        "z": randn(batch, dim, L).to(dtype) if flags["z"] else None,
        "delta_bias": (0.5 * rand(dim)).to(param_dtype) if flags["delta_bias"] else None,
    }
    return inputs


def run_with_grads(
    fn: Callable[..., Any], inputs: dict[str, Tensor | None], delta_softplus: bool
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Forward with ``return_last_state=True`` and gradients of a random linear loss on out and last state."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
    kwargs = {k: leaves.get(k) for k in INPUT_NAMES}
    out, last = fn(**kwargs, delta_softplus=delta_softplus, return_last_state=True)
    g = torch.Generator().manual_seed(1234)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device)
    w_last = torch.randn(last.shape, generator=g, dtype=torch.float64).to(out.device)
    loss = (out.double() * w_out).sum() + (last.double() * w_last).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return out.detach(), last.detach(), dict(zip(leaves, grads, strict=True))


def assert_scaled_close(actual: Tensor, expected: Tensor, rtol: float, name: str) -> None:
    """``assert_close`` with an absolute tolerance relative to the largest magnitude of ``expected``: gradients
    span several orders of magnitude, and entries near zero are only meaningful relative to the whole tensor."""
    expected = expected.double()
    torch.testing.assert_close(
        actual.double(),
        expected,
        rtol=rtol,
        atol=rtol * max(expected.abs().max().item(), 1.0),
        msg=lambda m: f"{name}: {m}",
    )


def check_against_reference(
    fn: Callable[..., Any],
    inputs: dict[str, Tensor | None],
    delta_softplus: bool,
    rtol: float,
    reference_inputs: dict[str, Tensor | None] | None = None,
) -> None:
    """Compares values, last state and all gradients of ``fn`` with :func:`selective_scan_reference`."""
    out, last, grads = run_with_grads(fn, inputs, delta_softplus)
    ref_out, ref_last, ref_grads = run_with_grads(selective_scan_reference, reference_inputs or inputs, delta_softplus)
    assert out.dtype == inputs["u"].dtype and out.shape == ref_out.shape
    assert last.shape == ref_last.shape
    assert_scaled_close(out, ref_out, rtol, "out")
    assert_scaled_close(last, ref_last, rtol, "last_state")
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, name
        assert_scaled_close(grad, ref_grads[name], rtol, f"grad {name}")


# ----------------------------------------------------------------------------------------------------------------
# Fast CPU kernel
# ----------------------------------------------------------------------------------------------------------------


@requires_numba
@pytest.mark.parametrize("flags", FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fast_path_matches_reference_float64(case: tuple[Any, ...], flags: dict[str, bool]) -> None:
    inputs = make_inputs(*case, flags=flags)
    assert selective_scan_backend(inputs["u"]) == "numba"
    check_against_reference(selective_scan, inputs, flags["delta_softplus"], rtol=1e-9)


@requires_numba
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3], CASES[4]], ids=[CASE_IDS[i] for i in (0, 2, 3, 4)])
def test_fast_path_float32_matches_float64_reference(case: tuple[Any, ...]) -> None:
    """The float32 kernel (fast vectorised exp) against the exact computation on the same values."""
    inputs = make_inputs(*case, flags=FLAGS[0], dtype=torch.float32)
    inputs64 = {k: v.double() if v is not None else None for k, v in inputs.items()}
    check_against_reference(selective_scan, inputs, True, rtol=2e-5, reference_inputs=inputs64)


@requires_numba
@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=[CASE_IDS[1], CASE_IDS[3]])
def test_fast_path_float32_matches_float32_reference(case: tuple[Any, ...]) -> None:
    """Same dtype on both sides, with mamba's float32 tolerances (rtol 6e-4, atol 2e-3) on the output."""
    inputs = make_inputs(*case, flags=FLAGS[0], dtype=torch.float32)
    out, last, grads = run_with_grads(selective_scan, inputs, True)
    ref_out, ref_last, ref_grads = run_with_grads(selective_scan_reference, inputs, True)
    torch.testing.assert_close(out, ref_out, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(last, ref_last, rtol=6e-4, atol=2e-3)
    for name, grad in grads.items():
        assert_scaled_close(grad, ref_grads[name], 1e-4, f"grad {name}")


@requires_numba
@pytest.mark.parametrize("case", [CASES[1], CASES[2]], ids=[CASE_IDS[1], CASE_IDS[2]])
def test_fast_path_bfloat16(case: tuple[Any, ...]) -> None:
    """bf16 activations with fp32 A/D/delta_bias (mamba's setting): computed in fp32, returned in bf16."""
    inputs = make_inputs(*case, flags=FLAGS[0], dtype=torch.bfloat16, param_dtype=torch.float32)
    out, last, grads = run_with_grads(selective_scan, inputs, True)
    ref_out, ref_last, ref_grads = run_with_grads(selective_scan_reference, inputs, True)
    assert out.dtype == torch.bfloat16
    assert last.dtype == torch.float32  # the state stays in the compute dtype, as in mamba
    torch.testing.assert_close(out, ref_out, rtol=3e-2, atol=5e-2)  # mamba's bf16 tolerances
    torch.testing.assert_close(last, ref_last, rtol=1e-4, atol=1e-4)
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, name
        assert_scaled_close(grad, ref_grads[name], 2e-2, f"grad {name}")


@requires_numba
def test_fast_path_deterministic_across_thread_counts() -> None:
    """Tasks never share accumulators (per-block partials are summed in a fixed order), so results are bitwise
    identical for any thread count."""
    inputs = make_inputs(*CASES[2], flags=FLAGS[0], dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run_with_grads(selective_scan, inputs, True)
        torch.set_num_threads(max(2, threads))
        multi = run_with_grads(selective_scan, inputs, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single[0], multi[0]) and torch.equal(single[1], multi[1])
    for name in single[2]:
        assert torch.equal(single[2][name], multi[2][name]), name


@requires_numba
def test_fast_path_noncontiguous_and_partial_grads() -> None:
    inputs = make_inputs(2, 20, 45, 4, "grouped", "var", 2, flags=FLAGS[0], dtype=torch.float32)
    # Same values through transposed storage.
    u_t = inputs["u"].transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    B_t = inputs["B"].transpose(2, 3).contiguous().transpose(2, 3)
    assert not u_t.is_contiguous() and not B_t.is_contiguous()
    kwargs = {**inputs, "u": u_t, "B": B_t}
    out = selective_scan(**kwargs, delta_softplus=True)  # only u requires grad
    (du,) = torch.autograd.grad(out.sum(), [u_t])
    u_ref = inputs["u"].clone().requires_grad_(True)
    ref = selective_scan_reference(**{**inputs, "u": u_ref}, delta_softplus=True)
    (du_ref,) = torch.autograd.grad(ref.sum(), [u_ref])
    assert_scaled_close(out, ref, 2e-5, "out")
    assert_scaled_close(du, du_ref, 2e-5, "du")


@requires_numba
def test_fast_exp_accuracy_and_special_values() -> None:
    """The float32 kernels use their own vectorisable exp; check it against float64 exp and IEEE special cases."""
    kernels = importlib.import_module("occscene_pl.ops._scan_kernels_common")
    x = torch.cat([torch.linspace(-86.0, 88.0, 20_000), torch.tensor([0.0, -1e-30, float("nan"), float("-inf")])])
    x = torch.cat([x, torch.tensor([float("inf"), -200.0, 200.0])])
    n = x.numel()
    x = torch.nn.functional.pad(x, (0, (-n) % 32)).view(-1, 32)  # (t, lanes)
    decays = torch.empty(x.shape[0], 1, 32)
    # decays[t, 0, k] = exp(x[t, k] * A[0, k]) with A = 1.
    kernels._decays(decays.numpy(), x.numpy(), torch.ones(1, 32).numpy(), x.shape[0])
    got, expected = decays[:, 0].flatten()[:n].double(), torch.exp(x.flatten()[:n].double())
    normal = torch.isfinite(expected) & (expected > 1e-37) & (expected < 3e38)
    rel_err = ((got - expected).abs() / expected)[normal].max().item()
    assert rel_err < 2.5e-7  # ~2 float32 ulp
    special = got[-7:]
    assert special[0] == 1.0 and special[1] == 1.0  # exp(0), exp(-1e-30)
    assert torch.isnan(special[2]) and special[3] == 0.0 and special[4] == float("inf")
    assert special[5] == 0.0 and special[6] == float("inf")  # underflow / overflow


# ----------------------------------------------------------------------------------------------------------------
# Pure-PyTorch fallback
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [FLAGS[0], FLAGS[1]], ids=FLAG_IDS[:2])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_chunked_fallback_matches_reference(case: tuple[Any, ...], flags: dict[str, bool]) -> None:
    inputs = make_inputs(*case, flags=flags)
    check_against_reference(selective_scan_chunked, inputs, flags["delta_softplus"], rtol=1e-9)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 300])
def test_chunked_fallback_any_chunk_size(chunk_size: int) -> None:
    inputs = make_inputs(*CASES[4], flags=FLAGS[0])

    def chunked(**kwargs: Any) -> Any:
        return selective_scan_chunked(**kwargs, chunk_size=chunk_size)

    check_against_reference(chunked, inputs, True, rtol=1e-9)


def test_chunked_fallback_bfloat16() -> None:
    inputs = make_inputs(*CASES[1], flags=FLAGS[0], dtype=torch.bfloat16, param_dtype=torch.float32)
    out, last = selective_scan_chunked(**inputs, delta_softplus=True, return_last_state=True)
    ref_out, ref_last = selective_scan_reference(**inputs, delta_softplus=True, return_last_state=True)
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, rtol=3e-2, atol=5e-2)
    torch.testing.assert_close(last, ref_last, rtol=1e-4, atol=1e-4)


def test_dispatch_falls_back_to_torch_without_numba(monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = make_inputs(*CASES[1], flags=FLAGS[0])
    monkeypatch.setattr(ss_module, "HAS_NUMBA", False)
    assert selective_scan_backend(inputs["u"]) == "torch"
    check_against_reference(selective_scan, inputs, True, rtol=1e-9)


def test_numba_that_fails_to_import_degrades_to_torch_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    # An installed but broken numba: the lookup finds it, the import fails (None in sys.modules blocks it).
    monkeypatch.setitem(sys.modules, "numba", None)
    monkeypatch.delitem(sys.modules, "occscene_pl.ops._scan_kernels", raising=False)
    monkeypatch.setattr(ss_module, "HAS_NUMBA", True)
    monkeypatch.setattr(ss_module, "_scan_kernels", None)
    monkeypatch.setattr(ss_module, "_scan_kernels_failed", False)
    inputs = make_inputs(*CASES[1], flags=FLAGS[0])
    with pytest.warns(RuntimeWarning, match="numba is installed but cannot be imported"):
        assert selective_scan_backend(inputs["u"]) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not on every call
        assert selective_scan_backend(inputs["u"]) == "torch"
        check_against_reference(selective_scan, inputs, True, rtol=1e-9)


_WITHOUT_NUMBA = """
import sys
import warnings

sys.modules["numba"] = None  # as if numba were not installed: `import numba` raises ImportError
warnings.filterwarnings("error", message=".*numba")  # no "installed but cannot be imported" warning
import torch

import occscene_pl.models
import occscene_pl.module
from occscene_pl.ops import HAS_NUMBA, selective_scan, selective_scan_backend, selective_scan_reference

assert not HAS_NUMBA
torch.manual_seed(0)
u, delta, z = (torch.randn(2, 4, 9, dtype=torch.float64, requires_grad=True) for _ in range(3))
A = -torch.rand(4, 3, dtype=torch.float64)
B, C = torch.randn(2, 3, 9, dtype=torch.float64), torch.randn(2, 3, 9, dtype=torch.float64)
assert selective_scan_backend(u) == "torch"
out = selective_scan(u, delta, A, B, C, z=z, delta_softplus=True)
ref = selective_scan_reference(u, delta, A, B, C, z=z, delta_softplus=True)
torch.testing.assert_close(out, ref)
out.sum().backward()
assert u.grad is not None and torch.isfinite(u.grad).all()
print("ok")
"""

_LAZY = """
import sys

import occscene_pl.models
import occscene_pl.ops

assert "numba" not in sys.modules, "importing occscene_pl must not import numba"
print("ok")
"""


@pytest.mark.parametrize("script", [_WITHOUT_NUMBA, _LAZY], ids=["without-numba", "lazy-import"])
def test_package_works_without_numba_and_imports_it_lazily(script: str) -> None:
    if script is _LAZY and not HAS_NUMBA:
        pytest.skip("numba is not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env, check=False
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------------
# API and validation
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [selective_scan, selective_scan_chunked, selective_scan_reference])
def test_return_types(fn: Callable[..., Any]) -> None:
    inputs = make_inputs(2, 6, 10, 3, "var", "var", 1, flags=FLAGS[1], dtype=torch.float32)
    out = fn(**inputs)
    assert isinstance(out, Tensor) and out.shape == (2, 6, 10) and out.dtype == torch.float32
    out2, last = fn(**inputs, return_last_state=True)
    assert out2.shape == (2, 6, 10) and last.shape == (2, 6, 3) and last.dtype == torch.float32
    # The last state is the state after the final step: scanning one more (zero) step with delta = 0 keeps it.
    ext = {k: torch.nn.functional.pad(v, (0, 1)) if k in ("u", "delta", "B", "C") else v for k, v in inputs.items()}
    _, last_ext = fn(**ext, return_last_state=True)
    torch.testing.assert_close(last_ext, last, rtol=1e-6, atol=1e-6)


def test_backend_names() -> None:
    u = torch.zeros(1, 2, 3)
    assert selective_scan_backend(u) == ("numba" if HAS_NUMBA else "torch")
    assert selective_scan_backend(u.to(torch.device("meta"))) == "torch"


def _valid(**overrides: Any) -> dict[str, Any]:
    inputs: dict[str, Any] = make_inputs(2, 8, 10, 4, "grouped", "var", 2, flags=FLAGS[0], dtype=torch.float32)
    inputs.update(overrides)
    return inputs


@pytest.mark.parametrize("fn", [selective_scan, selective_scan_chunked, selective_scan_reference])
@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"u": torch.zeros(2, 8)}, ValueError, r"u must have shape \(batch, dim, L\)"),
        ({"delta": torch.zeros(2, 8, 11)}, ValueError, "delta must have the shape of u"),
        ({"A": torch.zeros(7, 4)}, ValueError, r"A must have shape \(dim=8, N\)"),
        ({"B": torch.zeros(2, 3, 4, 10)}, ValueError, "dim=8 must be divisible by the number of B groups G=3"),
        ({"B": torch.zeros(2, 4, 9)}, ValueError, r"B must have shape \(batch=2, N=4, L=10\)"),
        ({"C": torch.zeros(8, 5)}, ValueError, r"time-invariant C must have shape \(dim=8, N=4\)"),
        ({"C": torch.zeros(2, 1, 2, 4, 10)}, ValueError, "C must be"),
        ({"D": torch.zeros(8, 1)}, ValueError, r"D must have shape \(dim=8,\)"),
        ({"z": torch.zeros(2, 8, 9)}, ValueError, "z must have the shape of u"),
        ({"delta_bias": torch.zeros(4)}, ValueError, r"delta_bias must have shape \(dim=8,\)"),
        ({"u": torch.zeros(2, 8, 10, dtype=torch.int64)}, TypeError, "u must be float16, bfloat16"),
        ({"A": torch.zeros(8, 4, dtype=torch.complex64)}, NotImplementedError, "complex A is not supported"),
    ],
)
def test_invalid_inputs_raise_clear_errors(
    fn: Callable[..., Any], overrides: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        fn(**_valid(**overrides))


# ----------------------------------------------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("itype", [torch.float32, torch.bfloat16])
def test_mamba_ssm_kernel_matches_reference(itype: torch.dtype) -> None:
    pytest.importorskip("mamba_ssm")
    if not ss_module.HAS_MAMBA_SSM:
        pytest.skip("mamba_ssm is installed but its CUDA kernel does not import")
    inputs = make_inputs(
        2, 64, 200, 16, "grouped", "grouped", 2, flags=FLAGS[0], dtype=itype, param_dtype=torch.float32
    )
    cuda = {k: v.cuda() if v is not None else None for k, v in inputs.items()}
    assert selective_scan_backend(cuda["u"]) == "mamba_ssm"
    out, last = selective_scan(**cuda, delta_softplus=True, return_last_state=True)
    ref_out, ref_last = selective_scan_reference(**cuda, delta_softplus=True, return_last_state=True)
    # mamba's own test tolerances.
    rtol, atol = (6e-4, 2e-3) if itype == torch.float32 else (3e-2, 5e-2)
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol)
    torch.testing.assert_close(last, ref_last, rtol=rtol, atol=atol)
    # Gradients (mamba's kernel ignores the last state's gradient, so the loss only uses the output).
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in cuda.items() if v is not None}
    leaves_ref = {k: v.detach().clone().requires_grad_(True) for k, v in cuda.items() if v is not None}
    w = torch.randn(out.shape, generator=torch.Generator(device="cuda").manual_seed(0), device="cuda")
    (selective_scan(**leaves, delta_softplus=True).float() * w).sum().backward()
    (selective_scan_reference(**leaves_ref, delta_softplus=True).float() * w).sum().backward()
    for name, leaf in leaves.items():
        assert_scaled_close(leaf.grad, leaves_ref[name].grad, 5e-3 if itype == torch.float32 else 5e-2, f"grad {name}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_chunked_fallback_on_cuda_matches_reference() -> None:
    inputs = make_inputs(*CASES[2], flags=FLAGS[0])
    cuda = {k: v.cuda() if v is not None else None for k, v in inputs.items()}
    check_against_reference(selective_scan_chunked, cuda, True, rtol=1e-9)
