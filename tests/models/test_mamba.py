"""MambaMixer against a from-the-parameters re-implementation; BiMambaBlock directions and residual."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from occscene_pl.models.mamba import BiMambaBlock, MambaMixer
from occscene_pl.ops import selective_scan_reference


def _naive_mixer(m: MambaMixer, hidden: torch.Tensor, explicit_scan: bool) -> torch.Tensor:
    """Mamba forward written out from the parameters: explicit causal conv taps and, optionally, the recurrence."""
    batch, length, _ = hidden.shape
    xz = hidden @ m.in_proj.weight.T
    x, z = xz[..., : m.d_inner], xz[..., m.d_inner :]  # (B, L, d_inner)
    taps = m.conv1d.weight[:, 0, :]  # (d_inner, K); tap K-1 multiplies the current token
    conv = m.conv1d.bias.expand(batch, length, -1).clone()
    for t in range(length):
        for k in range(m.d_conv):
            src = t - (m.d_conv - 1) + k
            if src >= 0:
                conv[:, t] = conv[:, t] + taps[:, k] * x[:, src]
    x = conv * torch.sigmoid(conv)
    x_dbl = x @ m.x_proj.weight.T
    dt, b, c = x_dbl.split([m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = dt @ m.dt_proj.weight.T  # (B, L, d_inner), bias added inside the scan
    a = -torch.exp(m.A_log)
    if not explicit_scan:
        y = selective_scan_reference(
            x.transpose(1, 2),
            dt.transpose(1, 2),
            a,
            b.transpose(1, 2),
            c.transpose(1, 2),
            m.D,
            z=z.transpose(1, 2),
            delta_bias=m.dt_proj.bias,
            delta_softplus=True,
        ).transpose(1, 2)
    else:
        delta = F.softplus(dt + m.dt_proj.bias)  # (B, L, d_inner)
        state = torch.zeros(batch, m.d_inner, m.d_state)
        ys = []
        for t in range(length):
            state = (
                torch.exp(delta[:, t, :, None] * a) * state + delta[:, t, :, None] * b[:, t, None, :] * x[:, t, :, None]
            )
            ys.append((state * c[:, t, None, :]).sum(-1) + m.D * x[:, t])
        y = torch.stack(ys, dim=1) * F.silu(z)
    return y @ m.out_proj.weight.T


@pytest.mark.parametrize("explicit_scan", [False, True])
def test_mixer_matches_naive_reimplementation(explicit_scan: bool) -> None:
    torch.manual_seed(0)
    m = MambaMixer(d_model=12, d_state=5, d_conv=3, expand=2)
    with torch.no_grad():  # move off the structured init so every parameter matters
        m.A_log.add_(0.3 * torch.randn_like(m.A_log))
        m.D.copy_(torch.randn_like(m.D))
        m.dt_proj.bias.add_(torch.randn_like(m.dt_proj.bias))
    x = torch.randn(2, 7, 12)
    torch.testing.assert_close(m(x), _naive_mixer(m, x, explicit_scan), rtol=1e-4, atol=1e-5)


def test_mixer_initialisation_and_parameter_names_follow_mamba_ssm() -> None:
    torch.manual_seed(0)
    m = MambaMixer(d_model=40, d_state=6, d_conv=4, expand=2, dt_min=0.002, dt_max=0.05)
    assert m.d_inner == 80 and m.dt_rank == math.ceil(40 / 16) == 3
    shapes = {name: tuple(p.shape) for name, p in m.named_parameters()}
    assert shapes == {
        "A_log": (80, 6),
        "D": (80,),
        "in_proj.weight": (160, 40),
        "conv1d.weight": (80, 1, 4),
        "conv1d.bias": (80,),
        "x_proj.weight": (3 + 12, 80),
        "dt_proj.weight": (80, 3),
        "dt_proj.bias": (80,),
        "out_proj.weight": (40, 80),
    }
    torch.testing.assert_close(m.A_log, torch.log(torch.arange(1.0, 7.0)).expand(80, 6))
    assert torch.equal(m.D, torch.ones(80))
    assert m.A_log.dtype == m.D.dtype == torch.float32
    assert m.A_log._no_weight_decay and m.D._no_weight_decay and m.dt_proj.bias._no_reinit
    step = F.softplus(m.dt_proj.bias)
    assert step.min() >= 0.002 * (1 - 1e-4) and step.max() <= 0.05 * (1 + 1e-4)
    assert m.dt_proj.weight.abs().max() <= 3**-0.5
    with pytest.raises(ValueError, match="dt_init"):
        MambaMixer(8, dt_init="uniform")  # type: ignore[arg-type]


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_bimamba_shape_gradients_and_bad_input(norm: str) -> None:
    torch.manual_seed(0)
    block = BiMambaBlock(16, d_state=4, norm=norm)  # type: ignore[arg-type]
    x = torch.randn(3, 10, 16, requires_grad=True)
    y = block(x)
    assert y.shape == (3, 10, 16)
    y.square().mean().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match=r"\(B, L, 16\)"):
        block(torch.randn(3, 10, 8))


@pytest.mark.parametrize(
    ("changed", "observed", "silenced", "propagates"),
    [
        (-1, 0, None, True),  # the backward scan carries the last token to the first output
        (0, -1, None, True),  # the forward scan carries the first token to the last output
        (-1, 0, "mixer_backward", False),  # only the forward scan left: causal
        (0, -1, "mixer_forward", False),  # only the backward scan left: anti-causal
    ],
)
def test_bimamba_scans_both_directions(changed: int, observed: int, silenced: str | None, propagates: bool) -> None:
    torch.manual_seed(0)
    # A 2-tap conv leaves the far end of the sequence to the scan alone; slow decay (small |A|) and large steps keep
    # what the scan carries over 7 tokens well above float noise.
    block = BiMambaBlock(8, d_state=4, d_conv=2, dt_min=0.5, dt_max=1.0)
    with torch.no_grad():
        for mixer in (block.mixer_forward, block.mixer_backward):
            mixer.A_log.fill_(math.log(0.05))
    if silenced is not None:
        torch.nn.init.zeros_(getattr(block, silenced).out_proj.weight)
    x = torch.randn(2, 8, 8)
    x2 = x.clone()
    x2[:, changed] += torch.randn(8)  # not a constant: LayerNorm would remove that
    with torch.no_grad():
        diff = (block(x2)[:, observed] - block(x)[:, observed]).abs().max().item()
    assert (diff > 1e-4) == propagates, diff


def test_bimamba_is_identity_when_mixers_output_zero() -> None:
    block = BiMambaBlock(8, d_state=4)
    torch.nn.init.zeros_(block.mixer_forward.out_proj.weight)
    torch.nn.init.zeros_(block.mixer_backward.out_proj.weight)
    x = torch.randn(2, 5, 8)
    assert torch.equal(block(x), x)
