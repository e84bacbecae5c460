"""The ldm single-file layout: key prefixes, and the entries that are not module weights.

Kept in one place because readers, detection, key planning and writing must all agree on it.
"""

from __future__ import annotations

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."
COMPONENTS = ("unet", "vae", "text_encoder")

# ldm LatentDiffusion buffers and bookkeeping that single files often carry.
IGNORED_KEYS = frozenset(
    {
        "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
        "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
        "logvar", "lvlb_weights", "scale_factor", "model_ema.decay", "model_ema.num_updates",
        OPENCLIP_PREFIX + "text_projection", OPENCLIP_PREFIX + "logit_scale",
        OPENCLIP_PREFIX + "attn_mask",
    }
)  # fmt: skip
IGNORED_PREFIXES = ("first_stage_model.loss.",)


def text_bare(key: str) -> str:
    """CLIPTextModel key without `TextEncoder`'s `model.` and transformers' `text_model.`."""
    return key.removeprefix("model.").removeprefix("text_model.")
