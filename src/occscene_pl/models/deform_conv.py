"""``DeformConv3d``: a 3D deformable convolution (DCNv1 in 3D) in pure PyTorch (``docs/design.md`` §6, step 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from occscene_pl.geometry import grid_sample_dtype

__all__ = ["DeformConv3d"]


class DeformConv3d(nn.Module):
    """3D deformable convolution (DCNv1 in 3D), pure PyTorch: learned offsets + trilinear ``grid_sample``.

    Stride 1, "same" zero padding. An offset ``Conv3d`` (zero-initialised, so the layer starts as a regular
    ``Conv3d``) predicts per output voxel and kernel tap a displacement ``(dd, dh, dw)`` in voxels (offset channel
    ``3 t + axis`` for tap ``t`` in ``(kd, kh, kw)`` C order); the input is sampled at ``p + k_t + offset_t`` (zeros
    outside) and the taps are combined by the kernel weights. Taps are sampled and reduced one at a time, so no
    ``(N, C * K^3, D, H, W)`` tensor is materialised; with ``checkpoint_taps`` each tap's sample is recomputed in
    backward instead of being kept, which bounds training memory at ``O(C + 3 K^3)`` per voxel instead of
    ``O(K^3 (C + 3))``.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Odd kernel edge ``K``.
        bias: Add a bias.
        checkpoint_taps: Recompute each tap's trilinear sample in backward.
    """

    kernel_taps: Tensor

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        bias: bool = True,
        checkpoint_taps: bool = False,
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"DeformConv3d kernel_size must be odd and positive, got {kernel_size}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.checkpoint_taps = checkpoint_taps
        # Same parameters and initialisation as nn.Conv3d, so the zero-offset layer is exactly a Conv3d.
        reference = nn.Conv3d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.weight = nn.Parameter(reference.weight.detach().clone())
        self.bias = nn.Parameter(reference.bias.detach().clone()) if reference.bias is not None else None
        taps = kernel_size**3
        self.offset_conv = nn.Conv3d(in_channels, 3 * taps, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.offset_conv.weight)
        nn.init.zeros_(self.offset_conv.bias)  # type: ignore[arg-type]
        r = torch.arange(kernel_size, dtype=torch.float32) - kernel_size // 2
        taps_grid = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(taps, 3)  # (K^3, 3) (d, h, w)
        self.register_buffer("kernel_taps", taps_grid, persistent=False)

    @staticmethod
    def _tap(x: Tensor, position: Tensor, weight: Tensor) -> Tensor:
        # position: (N, D, H, W, 3) voxel-index coordinates (d, h, w); weight: (C_out, C_in) of this tap.
        dims = position.new_tensor([float(s) for s in x.shape[-3:]])
        grid = ((2.0 * position + 1.0) / dims - 1.0).flip(-1)  # align_corners=False, grid_sample's (w, h, d) order
        sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return torch.einsum("oc,ncdhw->nodhw", weight, sampled)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the deformable convolution.

        Args:
            x: ``(N, C_in, D, H, W)``.

        Returns:
            ``(N, C_out, D, H, W)``.
        """
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"DeformConv3d expects (N, {self.in_channels}, D, H, W), got {tuple(x.shape)}")
        n, _, d, h, w = x.shape
        taps = int(self.kernel_taps.shape[0])
        offsets = self.offset_conv(x).reshape(n, taps, 3, d, h, w).permute(0, 1, 3, 4, 5, 2)  # (N, K^3, D, H, W, 3)
        dtype = grid_sample_dtype(x)
        x, offsets = x.to(dtype), offsets.to(dtype)
        axes = [torch.arange(s, device=x.device, dtype=dtype) for s in (d, h, w)]
        base = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (D, H, W, 3) voxel indices
        weight = self.weight.reshape(self.out_channels, self.in_channels, taps).to(dtype)
        recompute = self.checkpoint_taps and torch.is_grad_enabled()
        out = None
        for t in range(taps):
            position = base + self.kernel_taps[t].to(offsets.dtype) + offsets[:, t]
            if recompute:
                term = checkpoint(self._tap, x, position, weight[:, :, t], use_reentrant=False)
            else:
                term = self._tap(x, position, weight[:, :, t])
            out = term if out is None else out + term
        assert out is not None
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, 1, 1, 1)
        return out
