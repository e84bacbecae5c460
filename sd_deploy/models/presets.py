"""Architecture presets: the configurations of the real Stable Diffusion families.

A preset says what the networks look like, never what their weights are: building one
from a preset alone needs an explicit `random_init=True` (CLI: `--random-weights`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from sd_deploy.errors import UserError
from sd_deploy.models.text_encoder import TextEncoderConfig
from sd_deploy.models.unet import UNetConfig
from sd_deploy.models.vae import VAEConfig

SD_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything about a model that is not weights: architectures plus how to sample it."""

    family: str
    unet: UNetConfig
    vae: VAEConfig
    text_encoder: TextEncoderConfig
    prediction_type: str = "epsilon"
    default_size: int = 512
    # SD 1.x pads prompts with EOS; SD 2.x (OpenCLIP) pads with 0.
    pad_token_id: int = 49407
    # SD 2.x conditions on a fixed layer (the penultimate, built in: the text encoder's last
    # layer is dropped), so A1111's "Clip skip" does not apply; SD 1.x chooses at run time.
    fixed_text_layer: bool = False
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD_SCHEDULER))
    default_sampler: str = "dpmpp_2m_karras"
    default_steps: int = 30
    default_guidance: float = 7.5
    # SDXL: the second text tower (OpenCLIP ViT-bigG, `ProjectedTextEncoder`) and its pad id
    # (OpenCLIP pads with 0); None for one-tower families.
    text_encoder_2: TextEncoderConfig | None = None
    pad_token_id_2: int = 0

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def latent_channels(self) -> int:
        return self.unet.in_channels

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.downsample_factor

    def scheduler_config(self) -> dict[str, Any]:
        """diffusers-style scheduler config plus the defaults sd-run uses."""
        return {
            **self.scheduler,
            "prediction_type": self.prediction_type,
            "default_sampler": self.default_sampler,
            "default_steps": self.default_steps,
            "default_guidance": self.default_guidance,
        }

    def with_prediction_type(self, prediction_type: str) -> ModelConfig:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise UserError(
                f"prediction type {prediction_type!r} is not one of epsilon, v_prediction"
            )
        return replace(self, prediction_type=prediction_type)


_SD1_TEXT = TextEncoderConfig()
_SD2_TEXT = TextEncoderConfig(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    hidden_act="gelu",
)
_SD2_UNET = UNetConfig(
    num_head_channels=64, context_dim=1024, use_linear_in_transformer=True, upcast_attention=True
)

_SDXL_TEXT_2 = TextEncoderConfig(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
)
_TINY_XL_TEXT_1 = TextEncoderConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
)
_TINY_XL_TEXT_2 = TextEncoderConfig(
    hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    hidden_act="gelu",
)  # fmt: skip
# SDXL conditions the UNet on 6 size numbers, 256 sinusoids each, after the pooled embedding.
SDXL_TIME_IDS = 6
SDXL_TIME_EMBED = 256

PRESETS: dict[str, ModelConfig] = {
    "sd15": ModelConfig("sd15", UNetConfig(), VAEConfig(), _SD1_TEXT),
    "sd21": ModelConfig(
        "sd21", _SD2_UNET, VAEConfig(), _SD2_TEXT,
        prediction_type="v_prediction", default_size=768, pad_token_id=0,
        fixed_text_layer=True,
    ),
    "sd21-base": ModelConfig(
        "sd21-base", replace(_SD2_UNET, upcast_attention=False), VAEConfig(), _SD2_TEXT,
        pad_token_id=0, fixed_text_layer=True,
    ),
    # A few M parameters through every code path of the real ones (conv and linear
    # projections, head count and head channels, skip convs, 8x VAE) for fast tests.
    "tiny": ModelConfig(
        "tiny",
        UNetConfig(
            model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
            context_dim=64, num_heads=2, transformer_depth=1,
        ),
        VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
        TextEncoderConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2
        ),
        default_size=64,
        default_steps=10,
    ),
    "tiny-v": ModelConfig(
        "tiny-v",
        UNetConfig(
            model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
            context_dim=64, num_head_channels=16, use_linear_in_transformer=True,
            upcast_attention=True,
        ),
        VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
        TextEncoderConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            hidden_act="gelu",
        ),
        prediction_type="v_prediction",
        default_size=64,
        pad_token_id=0,
        fixed_text_layer=True,
        default_steps=10,
    ),
    # SDXL base 1.0 (sgm layout): attention at the two lower levels only, 1/2/10 transformer
    # blocks, context 768 + 1280, vector conditioning 1280 + 6 * 256.
    "sdxl": ModelConfig(
        "sdxl",
        UNetConfig(
            channel_mult=(1, 2, 4), attention_resolutions=(2, 4), context_dim=2048,
            num_head_channels=64, transformer_depth=(1, 2, 10), use_linear_in_transformer=True,
            adm_in_channels=1280 + SDXL_TIME_IDS * SDXL_TIME_EMBED,
        ),
        VAEConfig(scaling_factor=0.13025),
        TextEncoderConfig(),
        default_size=1024,
        fixed_text_layer=True,
        default_guidance=5.0,
        text_encoder_2=_SDXL_TEXT_2,
    ),
    # The SDXL code paths at a few M parameters: no attention at level 0, per-level depths,
    # linear projections, head channels, the label embedding, two towers.
    "tiny-xl": ModelConfig(
        "tiny-xl",
        UNetConfig(
            model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
            attention_resolutions=(2, 4), context_dim=32 + 64, num_head_channels=16,
            transformer_depth=(1, 1, 2), use_linear_in_transformer=True,
            adm_in_channels=64 + SDXL_TIME_IDS * SDXL_TIME_EMBED,
        ),
        VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, scaling_factor=0.13025),
        _TINY_XL_TEXT_1,
        # 128 px (not 64): at the smallest exported size (half) the lowest UNet level is
        # still 2x2, not 1x1, where group norm over 2 values amplifies rounding noise.
        default_size=128,
        fixed_text_layer=True,
        default_steps=10,
        default_guidance=5.0,
        text_encoder_2=_TINY_XL_TEXT_2,
    ),
    # The small model trained on coloured shapes that ships with the package (the default
    # model; tools/train_default_model.py). scaling_factor is 1/std of its VAE's latents.
    "shapes": ModelConfig(
        "shapes",
        UNetConfig(
            model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1,
            attention_resolutions=(1, 2), context_dim=64, num_head_channels=32,
        ),
        VAEConfig(ch=16, ch_mult=(1, 1, 2, 4), num_res_blocks=1, norm_num_groups=8,
                  scaling_factor=0.42109),
        TextEncoderConfig(
            hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4
        ),
        default_size=64,
        default_sampler="dpmpp_2m_karras",
        default_steps=20,
        default_guidance=3.0,
    ),
}  # fmt: skip


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(
            f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}"
        ) from None
