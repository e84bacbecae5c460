"""The Stable Diffusion UNet in the original ldm layout (openaimodel.py key names).

Keeping ldm's module tree means single-file checkpoints load with no key surgery:
`model.diffusion_model.input_blocks.1.1.proj_in.weight` is literally
`UNetModel().input_blocks[1][1].proj_in.weight`.

Precision policy (what `sd-export --fp16` bakes into the graph): group norm and
layer norm statistics run in fp32, and with `upcast_attention` (SD 2.x) the whole
attention product and softmax run in fp32, since fp16 overflows there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of an ldm UNet (the fields of ldm's `unet_config.params`)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Downsampling factors (1, 2, 4, 8 ...) at which a SpatialTransformer follows each ResBlock.
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    context_dim: int = 768
    num_heads: int = 8  # used when num_head_channels == -1
    num_head_channels: int = -1  # SD 2.x: 64 channels per head
    # Transformer blocks per SpatialTransformer: one number, or one per level (SDXL: 1, 2, 10;
    # the middle block takes the last level's). Levels without attention ignore theirs.
    transformer_depth: int | tuple[int, ...] = 1
    use_linear_in_transformer: bool = False  # SD 2.x projects with Linear, SD 1.x with 1x1 conv
    upcast_attention: bool = False  # SD 2.1 needs fp32 attention in fp16
    norm_num_groups: int = 32
    # SDXL (sgm): width of the vector `y` (pooled text embedding + size embeddings) added to
    # the timestep embedding through `label_emb`; 0 = no such conditioning (SD 1.x / 2.x).
    adm_in_channels: int = 0

    def depth_at(self, level: int) -> int:
        """Transformer blocks per SpatialTransformer at `level` (-1: the middle block)."""
        if isinstance(self.transformer_depth, int):
            return self.transformer_depth
        return self.transformer_depth[level]


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps, as ldm."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=timesteps.device)
        / half
    )
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the input dtype (ldm's GroupNorm32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(
            x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps
        ).to(x.dtype)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(
            x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps
        ).to(x.dtype)


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands emb to ResBlocks and context to transformers."""

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor,
        upsample_size: torch.Size | None = None,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


class ResBlock(nn.Module):
    """Two 3x3 convs with the timestep embedding added in between (ldm ResBlock)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection: nn.Module = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest upsampling (2x, or to the size of the matching skip) then a 3x3 conv.

    Upsampling to the skip's size, as diffusers does, lets any latent size work (an odd
    latent side is halved with rounding up on the way down), so images only need to
    be multiples of 8 pixels rather than 64.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size | None = None) -> torch.Tensor:
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when context is None."""

    def __init__(
        self, query_dim: int, context_dim: int, heads: int, dim_head: int, upcast: bool
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (
            t.reshape(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)
            for t in (q, k, v)
        )
        dtype = q.dtype
        if self.upcast:
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.to(dtype).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Linear to 2x width, gated by GELU of the second half."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP with 4x inner width."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * 4), nn.Dropout(0.0), nn.Linear(dim * 4, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, feed-forward; pre-norm residuals."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, upcast: bool) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head, upcast)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, upcast)
        self.norm1 = LayerNorm32(dim)
        self.norm2 = LayerNorm32(dim)
        self.norm3 = LayerNorm32(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image features -> tokens -> transformer blocks -> image features, with a residual."""

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        depth: int,
        context_dim: int,
        use_linear: bool,
        upcast: bool,
        groups: int,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = GroupNorm32(groups, channels, eps=1e-6)
        self.proj_in: nn.Module = (
            nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        )
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, upcast) for _ in range(depth)
        )
        self.proj_out: nn.Module = (
            nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # b, h*w, inner
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + residual


class UNetModel(nn.Module):
    """Noise (or v) prediction UNet conditioned on timestep and text embeddings."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        mc, groups = c.model_channels, c.norm_num_groups
        emb_dim = mc * 4
        self.time_embed = nn.Sequential(
            nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

        if c.adm_in_channels:
            # sgm's `num_classes="sequential"`: keys label_emb.0.0 / label_emb.0.2.
            self.label_emb = nn.Sequential(
                nn.Sequential(
                    nn.Linear(c.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
                )
            )

        def transformer(ch: int, level: int) -> SpatialTransformer:
            if c.num_head_channels == -1:
                heads, dim_head = c.num_heads, ch // c.num_heads
            else:
                heads, dim_head = ch // c.num_head_channels, c.num_head_channels
            return SpatialTransformer(
                ch, heads, dim_head, c.depth_at(level), c.context_dim,
                c.use_linear_in_transformer, c.upcast_attention, groups,
            )  # fmt: skip

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(c.in_channels, mc, 3, padding=1))]
        )
        skip_channels = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc, groups)]
                ch = mult * mc
                if ds in c.attention_resolutions:
                    layers.append(transformer(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, groups),
            transformer(ch, -1),
            ResBlock(ch, emb_dim, ch, groups),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mc * mult, groups)]
                ch = mc * mult
                if ds in c.attention_resolutions:
                    layers.append(transformer(ch, level))
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(groups, ch), nn.SiLU(), nn.Conv2d(mc, c.out_channels, 3, padding=1)
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """sample [B,C,h,w], timestep [B] (float, may be fractional), context [B,77,D];
        y [B, adm_in_channels] (SDXL's vector conditioning, `sdxl_vector` builds it)."""
        dtype = self.dtype
        emb = self.time_embed(timestep_embedding(timestep, self.config.model_channels).to(dtype))
        if self.config.adm_in_channels:
            if y is None:
                raise ValueError("this UNet needs the vector conditioning y")
            emb = emb + self.label_emb(y.to(dtype))
        x = sample.to(dtype)
        context = encoder_hidden_states.to(dtype)
        skips = []
        for block in self.input_blocks:
            x = block(x, emb, context)
            skips.append(x)
        x = self.middle_block(x, emb, context)
        for block in self.output_blocks:
            x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(x)


def sdxl_vector(text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """SDXL's `y`: the pooled text embedding, then each of the 6 size numbers (original
    height, width, crop top, left, target height, width) embedded with 256 sinusoids
    (cos | sin, sgm's ConcatTimestepEmbedderND), [B, 1280 + 6 * 256]."""
    b = time_ids.shape[0]
    sizes = timestep_embedding(time_ids.float().reshape(-1), 256).reshape(b, -1)
    return torch.cat([text_embeds.float(), sizes], dim=1)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
