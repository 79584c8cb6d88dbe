"""Make diffusers' FLUX.2 modules round exactly like ai-toolkit's BFL-layout modules.

In float32 the two implementations agree to ~1e-6, but in bfloat16 the tiny golden model (and any
long sampling run) amplifies single-ulp differences into visible ones, so previews match ai-toolkit's
bf16 samples only if every rounding step is the same. The differences that matter, as measured on
the goldens:

- QK RMSNorm: torch.nn.RMSNorm multiplies by the scale in float32 and rounds once; BFL rounds the
  normalised value to the model dtype first, then multiplies by the scale (a second rounding).
  Without this c12 is 7/255 off.
- VAE: BFL's swish is x * sigmoid(x), not the fused SiLU kernel (8/255 without it), and its attention
  block projects with 1x1 convolutions where diffusers uses Linear layers (6/255 without it).
- RoPE tables: diffusers computes the angles in float64 on CPU, BFL in float32. No bf16 prediction
  tried changed with it, but the float32 goldens go from 1/255 to bit-exact.

The patches keep every parameter object and name, so LoRA merging and snapshots are unaffected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TwoStepRMSNorm(nn.Module):
    """RMSNorm as BFL's QKNorm: normalise in float32, round to the input dtype, then scale."""

    def __init__(self, norm: nn.RMSNorm):
        super().__init__()
        self.weight = norm.weight
        self.eps = norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class Float32RopeTables(nn.Module):
    """Drop-in for Flux2PosEmbed: (cos, sin) per position, interleaved pairs, computed in float32."""

    def __init__(self, theta: int, axes_dim: list[int]):
        super().__init__()
        self.theta = theta
        self.axes_dim = list(axes_dim)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = [], []
        for axis, dim in enumerate(self.axes_dim):
            # int64 ids times float32 frequencies, exactly as BFL's `rope`.
            freqs = 1.0 / (self.theta ** (torch.arange(0, dim, 2, device=ids.device) / dim))
            angles = ids[..., axis:axis + 1] * freqs
            cos.append(torch.cos(angles).repeat_interleave(2, dim=-1))
            sin.append(torch.sin(angles).repeat_interleave(2, dim=-1))
        return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class ConvAttnProcessor:
    """Single-head VAE self-attention with 1x1-convolution projections, as BFL's AttnBlock."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs) -> torch.Tensor:
        normed = attn.group_norm(hidden_states)
        batch, channels, height, width = normed.shape

        def project(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(x, linear.weight[:, :, None, None], linear.bias)

        def tokens(x: torch.Tensor) -> torch.Tensor:
            return x.flatten(2).transpose(1, 2).unsqueeze(1).contiguous()

        out = F.scaled_dot_product_attention(tokens(project(attn.to_q, normed)),
                                             tokens(project(attn.to_k, normed)),
                                             tokens(project(attn.to_v, normed)))
        out = out.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        return hidden_states + project(attn.to_out[0], out)


def match_transformer(transformer: nn.Module) -> None:
    """Patch a Flux2Transformer2DModel in place (QK norms and RoPE tables)."""
    for module in transformer.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, nn.RMSNorm):
                setattr(module, name, TwoStepRMSNorm(child))
    pos = transformer.pos_embed
    transformer.pos_embed = Float32RopeTables(pos.theta, pos.axes_dim)


def match_vae(vae: nn.Module) -> None:
    """Patch an AutoencoderKLFlux2 in place (swish activations and mid-block attention)."""
    from diffusers.models.attention_processor import Attention

    for module in vae.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, nn.SiLU):
                setattr(module, name, Swish())
        if isinstance(module, Attention):
            module.set_processor(ConvAttnProcessor())
