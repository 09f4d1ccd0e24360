"""Mamba mixer and the bidirectional (Vision-Mamba style) residual block used by the dual-alignment module.

:class:`MambaMixer` is ``mamba_ssm.modules.mamba_simple.Mamba`` (Gu & Dao, 2023) re-stated on top of
:func:`occscene_pl.ops.selective_scan`: the same parameters, names, initialisation and numbers, so a ``state_dict``
of either loads into the other. :class:`BiMambaBlock` runs one mixer over the token sequence and a second one over
the flipped sequence, sums them and adds the result to the input (``docs/design.md`` §6, "Bidirectional Mamba
block").
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from occscene_pl.ops import selective_scan

__all__ = ["BiMambaBlock", "MambaMixer"]

try:  # the fused CUDA kernels are optional (`pip install .[cuda]`)
    from causal_conv1d import causal_conv1d_fn
    from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn
except ImportError:  # pragma: no cover - depends on the environment
    causal_conv1d_fn, mamba_inner_fn = None, None


class MambaMixer(nn.Module):
    """Selective state-space mixer, parameter-for-parameter ``mamba_ssm``'s ``Mamba`` module.

    ``in_proj`` splits each token into a scan branch ``x`` and a gate ``z``; ``x`` goes through a depthwise causal
    conv and SiLU, ``x_proj`` makes the input-dependent ``(dt, B, C)``, ``dt_proj`` lifts ``dt`` back to
    ``d_inner`` channels, the selective scan (``delta_softplus=True``, ``delta_bias=dt_proj.bias``, skip ``D``,
    gate ``silu(z)``) mixes along the sequence and ``out_proj`` maps back to ``d_model``.

    Args:
        d_model: Token width ``D``.
        d_state: SSM state size ``N``.
        d_conv: Width of the causal depthwise convolution.
        expand: ``d_inner = expand * d_model``.
        dt_rank: Rank of the ``dt`` projection; ``"auto"`` is ``ceil(d_model / 16)``.
        dt_min: Smallest initial step ``softplus(dt_proj.bias)``.
        dt_max: Largest initial step.
        dt_init: ``"random"`` (uniform ``dt_proj.weight``) or ``"constant"``.
        dt_scale: Scale of the ``dt_proj.weight`` initialisation.
        dt_init_floor: Lower clamp of the sampled initial steps.
        conv_bias: Bias in the depthwise convolution.
        bias: Bias in ``in_proj`` / ``out_proj``.
        use_fast_path: Use ``mamba_ssm``'s fused ``mamba_inner_fn`` when it and ``causal_conv1d`` import and the
            input is on CUDA (same numbers up to float rounding); otherwise :func:`occscene_pl.ops.selective_scan`.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | Literal["auto"] = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: Literal["random", "constant"] = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,
    ) -> None:
        super().__init__()
        if d_model < 1 or d_state < 1 or d_conv < 1 or expand <= 0:
            raise ValueError(
                f"MambaMixer needs positive d_model, d_state, d_conv and expand; got d_model={d_model}, "
                f"d_state={d_state}, d_conv={d_conv}, expand={expand}"
            )
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"MambaMixer needs 0 < dt_min <= dt_max; got dt_min={dt_min}, dt_max={dt_max}")
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_fast_path = use_fast_path

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner, padding=d_conv - 1, bias=conv_bias
        )
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)

        # Mamba's dt initialisation keeps the variance of the step at init and puts softplus(bias) in [dt_min, dt_max].
        dt_init_std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        else:
            raise ValueError(f"MambaMixer dt_init must be 'random' or 'constant', got {dt_init!r}")
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(
            min=dt_init_floor
        )
        inv_dt = dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_dt)
        # A model-wide re-initialisation that zeroes Linear biases must leave this one alone.
        self.dt_proj.bias._no_reinit = True  # type: ignore[attr-defined]

        # S4D-real initialisation; A_log and D stay fp32 whatever the module's dtype (as in mamba_ssm).
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(a))
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D = nn.Parameter(torch.ones(self.d_inner, dtype=torch.float32))
        self.D._no_weight_decay = True  # type: ignore[attr-defined]

        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def forward(self, hidden_states: Tensor) -> Tensor:
        """Mix a batch of token sequences.

        Args:
            hidden_states: ``(B, L, d_model)``.

        Returns:
            ``(B, L, d_model)``.
        """
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(
                f"MambaMixer expects hidden_states of shape (B, L, {self.d_model}), got {tuple(hidden_states.shape)}"
            )
        seqlen = hidden_states.shape[1]
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (B, 2 * d_inner, L)
        a = -torch.exp(self.A_log.float())  # (d_inner, d_state)
        if self.use_fast_path and mamba_inner_fn is not None and causal_conv1d_fn is not None and xz.is_cuda:
            return mamba_inner_fn(
                xz.contiguous(),
                self.conv1d.weight,
                self.conv1d.bias,
                self.x_proj.weight,
                self.dt_proj.weight,
                self.out_proj.weight,
                self.out_proj.bias,
                a,
                None,
                None,
                self.D.float(),
                delta_bias=self.dt_proj.bias.float(),
                delta_softplus=True,
            )
        x, z = xz.chunk(2, dim=1)
        x = self.act(self.conv1d(x)[..., :seqlen])  # causal: keep the first L outputs of the left-padded conv
        x_dbl = self.x_proj(x.transpose(1, 2))  # (B, L, dt_rank + 2 * d_state)
        dt, b, c = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        # The bias is applied inside the scan (delta_bias), exactly as mamba_ssm does.
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # (B, d_inner, L)
        y: Tensor = selective_scan(  # type: ignore[assignment]  # a tensor without return_last_state
            x,
            dt,
            a,
            b.transpose(1, 2).contiguous(),
            c.transpose(1, 2).contiguous(),
            self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
        )
        return self.out_proj(y.transpose(1, 2).to(hidden_states.dtype))


class BiMambaBlock(nn.Module):
    """Pre-norm residual block scanning the sequence in both directions (Vision Mamba style).

    ``out = x + mixer_f(norm(x)) + flip(mixer_b(flip(norm(x))))``: the two mixers have their own weights, so every
    output token sees the whole sequence (the forward scan sees the prefix, the backward scan the suffix).

    Args:
        d_model: Token width ``D``.
        d_state: SSM state size.
        d_conv: Causal depthwise conv width.
        expand: Inner expansion of each mixer.
        dt_rank: ``dt`` projection rank (``"auto"`` = ``ceil(d_model / 16)``).
        norm: ``"layer"`` (LayerNorm) or ``"rms"`` (RMSNorm) before the mixers.
        norm_eps: Epsilon of the norm.
        dt_min: See :class:`MambaMixer`.
        dt_max: See :class:`MambaMixer`.
        dt_init: See :class:`MambaMixer`.
        dt_scale: See :class:`MambaMixer`.
        dt_init_floor: See :class:`MambaMixer`.
        conv_bias: See :class:`MambaMixer`.
        bias: See :class:`MambaMixer`.
        use_fast_path: See :class:`MambaMixer`.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | Literal["auto"] = "auto",
        norm: Literal["layer", "rms"] = "layer",
        norm_eps: float = 1e-5,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: Literal["random", "constant"] = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,
    ) -> None:
        super().__init__()
        if norm == "layer":
            self.norm: nn.Module = nn.LayerNorm(d_model, eps=norm_eps)
        elif norm == "rms":
            self.norm = nn.RMSNorm(d_model, eps=norm_eps)
        else:
            raise ValueError(f"BiMambaBlock norm must be 'layer' or 'rms', got {norm!r}")
        mixer_kwargs = dict(
            d_state=d_state,
            d_conv=d_conv,
            expand=expand,
            dt_rank=dt_rank,
            dt_min=dt_min,
            dt_max=dt_max,
            dt_init=dt_init,
            dt_scale=dt_scale,
            dt_init_floor=dt_init_floor,
            conv_bias=conv_bias,
            bias=bias,
            use_fast_path=use_fast_path,
        )
        self.d_model = d_model
        self.mixer_forward = MambaMixer(d_model, **mixer_kwargs)  # type: ignore[arg-type]
        self.mixer_backward = MambaMixer(d_model, **mixer_kwargs)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block.

        Args:
            x: ``(B, L, d_model)``.

        Returns:
            ``(B, L, d_model)``.
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"BiMambaBlock expects x of shape (B, L, {self.d_model}), got {tuple(x.shape)}")
        h = self.norm(x)
        backward = self.mixer_backward(h.flip(1)).flip(1)
        return x + self.mixer_forward(h) + backward
