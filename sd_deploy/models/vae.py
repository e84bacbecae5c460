"""The Stable Diffusion autoencoder (AutoencoderKL) in the original ldm layout.

Key names follow ldm's `first_stage_model` (encoder.down.0.block.0.norm1 ...), so
single-file checkpoints load directly. Norms run in fp32 for fp16 export, like the UNet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sd_deploy.models.unet import GroupNorm32


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of an ldm AutoencoderKL (`first_stage_config.params.ddconfig`)."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def _norm(channels: int, groups: int) -> GroupNorm32:
    return GroupNorm32(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Two norm-SiLU-conv stages with a residual (1x1 conv when channels change)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels, with 1x1 conv projections (ldm AttnBlock)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (t.flatten(2).transpose(1, 2)[:, None] for t in (self.q(y), self.k(y), self.v(y)))
        dtype = q.dtype
        # The VAE's single 512-wide head overflows fp16 easily: attend in fp32.
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(dtype)
        out = out[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 conv with ldm's asymmetric (0, 1, 0, 1) padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest 2x then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: ResnetBlocks (`block`), then ldm's `downsample` or `upsample`."""

    def __init__(self, blocks: list[nn.Module], resample_name: str, resample: nn.Module | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample is not None:
            self.add_module(resample_name, resample)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            h = block(h)
        for resample in (self._modules.get("downsample"), self._modules.get("upsample")):
            if resample is not None:
                h = resample(h)
        return h


class Encoder(nn.Module):
    """Image [B,3,H,W] in [-1,1] -> 2*z_channels moments at H/8 x W/8."""

    def __init__(self, c: VAEConfig) -> None:
        super().__init__()
        g = c.norm_num_groups
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch = c.ch
        for i, mult in enumerate(c.ch_mult):
            blocks: list[nn.Module] = []
            for _ in range(c.num_res_blocks):
                blocks.append(ResnetBlock(ch, c.ch * mult, g))
                ch = c.ch * mult
            last = i == len(c.ch_mult) - 1
            self.down.append(_Level(blocks, "downsample", None if last else Downsample(ch)))
        self.mid = _Mid(ch, g)
        self.norm_out = _norm(ch, g)
        self.conv_out = nn.Conv2d(ch, 2 * c.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z [B,z_channels,h,w] -> image [B,3,8h,8w] in about [-1,1]."""

    def __init__(self, c: VAEConfig) -> None:
        super().__init__()
        g = c.norm_num_groups
        ch = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, ch, 3, padding=1)
        self.mid = _Mid(ch, g)
        levels: list[_Level] = []
        for i, mult in reversed(list(enumerate(c.ch_mult))):
            blocks: list[nn.Module] = []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(ResnetBlock(ch, c.ch * mult, g))
                ch = c.ch * mult
            levels.insert(
                0, _Level(blocks, "upsample", Upsample(ch) if i else None)
            )  # ldm stores `up` lowest resolution last
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(ch, g)
        self.conv_out = nn.Conv2d(ch, c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """Encoder + decoder with the quant convs; `scaling_factor` maps to the UNet's latent scale."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1,1] -> (mean, logvar) of the unscaled latent distribution."""
        moments = self.quant_conv(self.encoder(images.to(self.dtype)))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, torch.clamp(logvar, -30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent -> image in about [-1,1]."""
        return self.decoder(self.post_quant_conv(z.to(self.dtype)))


class VAEDecoder(nn.Module):
    """What the vae_decoder graph computes: scaled latent -> RGB in [0,1].

    The latent scale and the [-1,1] -> [0,1] mapping live inside the graph so the
    runtime hands the sampler's output straight in and gets displayable pixels out.
    """

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        image = self.vae.decode(latent / self.vae.config.scaling_factor)
        return ((image.float() + 1.0) * 0.5).clamp(0.0, 1.0).to(image.dtype)


class VAEEncoder(nn.Module):
    """What the vae_encoder graph computes: RGB in [0,1] -> scaled latent mean and std.

    The runtime samples `mean + std * noise` with its own generator, so the graph
    stays deterministic.
    """

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.vae.encode_moments(images * 2.0 - 1.0)
        scale = self.vae.config.scaling_factor
        return mean * scale, torch.exp(0.5 * logvar.float()).to(mean.dtype) * scale
