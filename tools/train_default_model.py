"""Train the default model that ships with sd-deploy: a small latent diffusion model of shapes.

    .venv/bin/python tools/train_default_model.py --trial    # a few steps of each stage

The shipped model came from two runs (see sd_deploy/data/default_model/MODEL_CARD.md):

    .venv/bin/python tools/train_default_model.py --out phase1.safetensors
    .venv/bin/python tools/train_default_model.py --reuse-vae --init-from phase1.safetensors \
        --seed 1 --unet-steps 1500 --unet-lr 2e-4

about 92 min in all on one core of a shared 2-core machine (VAE 45, UNet 25 + 20).

Stages, all seeded (same seed, same torch build, same thread count -> same weights):

1. VAE (`AutoencoderKL`, 64x64 RGB -> 4x8x8 latents): L1 + MSE + edge (L1 of pixel
   differences) reconstruction plus a small KL term, on pictures rendered on the fly from
   the training combinations of `sd_deploy.models.shapes_data` (the held-out combinations
   are never drawn).
2. Latents of a fixed set of training pictures (mean and std of the posterior); the latent
   scaling factor is 1 / std of sampled latents, as Stable Diffusion's 0.18215 was chosen.
3. Text encoder (a small `CLIPTextModel` fed the real CLIP BPE ids of the runtime's
   tokenizer) and UNet, trained together with the DDPM epsilon objective on SD's
   scaled_linear schedule (betas 0.00085..0.012, 1000 steps), min-SNR-5 loss weights, 15%
   empty captions for classifier-free guidance, and an EMA of both (what is saved).
4. A check on held-out prompts (DDIM sampling here in torch, read by `shapes_check`), then
   `save_checkpoint` in fp16 to sd_deploy/data/default_model/model.safetensors.

Threads: one by default. On a shared 2-core machine two OpenMP threads that get preempted
spin at barriers and ran a training step ~15x slower than one thread did; pass --threads 2
on an idle machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sd_deploy.models import shapes_check, shapes_data  # noqa: E402
from sd_deploy.models.checkpoints import DEFAULT_MODEL_PATH, save_checkpoint  # noqa: E402
from sd_deploy.models.loaded import LoadedModels  # noqa: E402
from sd_deploy.models.presets import PRESETS, ModelConfig  # noqa: E402
from sd_deploy.models.text_encoder import TextEncoder  # noqa: E402
from sd_deploy.models.unet import UNetModel, count_parameters  # noqa: E402
from sd_deploy.models.vae import AutoencoderKL  # noqa: E402
from sd_deploy.runtime.tokenizer import CLIPTokenizer, write_clip_tokenizer_files  # noqa: E402

PRESET = "shapes"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.05) -> float:
    """Linear warm-up then cosine decay to floor * peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,3] -> float [N,3,H,W] in [-1,1], channels-last memory."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x.contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------- stage 1: VAE


def edge_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between horizontal and vertical pixel differences: keeps edges and corners sharp.

    Plain L1/L2 alone left corners rounded and small stars blobby at this training budget.
    """
    dx = (out[..., :, 1:] - out[..., :, :-1]) - (target[..., :, 1:] - target[..., :, :-1])
    dy = (out[..., 1:, :] - out[..., :-1, :]) - (target[..., 1:, :] - target[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def train_vae(config: ModelConfig, args: argparse.Namespace) -> AutoencoderKL:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed + 1)
    combos = shapes_data.train_combinations()
    vae = AutoencoderKL(config.vae).to(memory_format=torch.channels_last)
    log(f"VAE: {count_parameters(vae):,} parameters, {args.vae_steps} steps of {args.vae_batch}")
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    start = time.time()
    running: dict[str, float] = {}
    for step in range(args.vae_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.vae_lr, warmup=50)
        specs = [shapes_data.random_spec(rng, combos) for _ in range(args.vae_batch)]
        x = to_tensor(shapes_data.render_batch(specs))
        mean, logvar = vae.encode_moments(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        out = vae.decode(z)
        l1 = (out - x).abs().mean()
        l2 = (out - x).pow(2).mean()
        edge = edge_loss(out, x)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = l1 + l2 + args.edge_weight * edge + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        for name, value in (("loss", loss), ("l1", l1), ("l2", l2), ("edge", edge), ("kl", kl)):
            running[name] = 0.98 * running.get(name, value.item()) + 0.02 * value.item()
        if step % args.log_every == 0 or step == args.vae_steps - 1:
            rate = (step + 1) / (time.time() - start)
            log(
                f"vae step {step}/{args.vae_steps} "
                + " ".join(f"{k} {v:.4f}" for k, v in running.items())
                + f" ({rate:.2f} steps/s)"
            )
    args.results["vae"] = {k: round(v, 5) for k, v in running.items()}
    args.results["vae_seconds"] = round(time.time() - start)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_dataset(
    vae: AutoencoderKL, specs: list[shapes_data.ShapeSpec], batch: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(specs), batch):
        x = to_tensor(shapes_data.render_batch(specs[i : i + batch]))
        mean, logvar = vae.encode_moments(x)
        means.append(mean.contiguous())
        stds.append(torch.exp(0.5 * logvar).contiguous())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruction_error(vae: AutoencoderKL, seed: int, n: int = 256) -> dict[str, float]:
    """Mean abs error of encode->decode (posterior mean), and how often the checker agrees."""
    specs = shapes_data.sample_specs(n, seed, shapes_data.all_combinations())
    images = shapes_data.render_batch(specs)
    x = to_tensor(images)
    mean, _ = vae.encode_moments(x)
    out = vae.decode(mean).clamp(-1, 1)
    decoded = ((out + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    scores = shapes_check.score(decoded, specs)
    return {
        "l1": round(float((out - x).abs().mean()), 5),
        "checker_colour": scores.colour,
        "checker_shape": scores.shape,
    }


# --------------------------------------------------------------------------- stage 3: UNet


def schedule(config: ModelConfig) -> torch.Tensor:
    """alphas_cumprod of SD's scaled_linear schedule."""
    s = config.scheduler
    betas = (
        torch.linspace(
            s["beta_start"] ** 0.5,
            s["beta_end"] ** 0.5,
            s["num_train_timesteps"],
            dtype=torch.float64,
        )
        ** 2
    )
    return torch.cumprod(1.0 - betas, 0).float()


def train_unet(
    config: ModelConfig,
    latents: tuple[torch.Tensor, torch.Tensor],
    prompt_ids: torch.Tensor,
    empty_ids: torch.Tensor,
    caption_index: torch.Tensor,
    args: argparse.Namespace,
) -> tuple[UNetModel, TextEncoder]:
    torch.manual_seed(args.seed + 2)
    generator = torch.Generator().manual_seed(args.seed + 3)
    unet = UNetModel(config.unet)
    text = TextEncoder(config.text_encoder)
    if args.init_from is not None:
        # Continue from a saved model (its EMA weights) with a fresh optimizer and schedule.
        from sd_deploy.models.checkpoints import load_checkpoint

        start_from = load_checkpoint(args.init_from)
        unet.load_state_dict(start_from.unet.state_dict())
        text.load_state_dict(start_from.text_encoder.state_dict())
        log(f"UNet and text encoder start from {args.init_from}")
    unet = unet.to(memory_format=torch.channels_last)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    for module in (ema_unet, ema_text):
        module.requires_grad_(False)
    log(
        f"UNet: {count_parameters(unet):,} parameters, text encoder: "
        f"{count_parameters(text):,}; {args.unet_steps} steps of {args.unet_batch}"
    )
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.01)
    alphas_cumprod = schedule(config)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    loss_weight = torch.clamp(snr, max=args.min_snr) / snr  # min-SNR-gamma, epsilon target
    mean_all, std_all = latents
    scale = config.vae.scaling_factor
    n = len(mean_all)
    start = time.time()
    running = None
    for step in range(args.unet_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.unet_steps, args.unet_lr, warmup=200)
        idx = torch.randint(0, n, (args.unet_batch,), generator=generator)
        eps_latent = torch.randn(mean_all[idx].shape, generator=generator)
        x0 = (mean_all[idx] + std_all[idx] * eps_latent) * scale
        t = torch.randint(0, len(alphas_cumprod), (args.unet_batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        ab = alphas_cumprod[t][:, None, None, None]
        xt = (ab.sqrt() * x0 + (1 - ab).sqrt() * noise).contiguous(
            memory_format=torch.channels_last
        )
        drop = torch.rand(args.unet_batch, generator=generator) < args.caption_dropout
        ids = torch.where(drop[:, None], empty_ids[None], prompt_ids[caption_index[idx]])
        context = text(ids)
        pred = unet(xt, t.float(), context)
        per_sample = (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text)):
                for e, p in zip(ema.parameters(), live.parameters(), strict=True):
                    e.lerp_(p, 1 - decay)
        mse = per_sample.mean().item()
        running = mse if running is None else 0.99 * running + 0.01 * mse
        if step % args.log_every == 0 or step == args.unet_steps - 1:
            rate = (step + 1) / (time.time() - start)
            eta = (args.unet_steps - step - 1) / rate
            log(
                f"unet step {step}/{args.unet_steps} weighted loss {loss.item():.4f} "
                f"eps mse (avg) {running:.4f} ({rate:.2f} steps/s, {eta / 60:.0f} min left)"
            )
        if args.eval_every and step and step % args.eval_every == 0:
            evaluate(config, ema_unet, ema_text, args.eval_vae, args, guidance=5.0, tag=str(step))
    args.results["unet_eps_mse"] = round(running or 0.0, 5)
    args.results["unet_seconds"] = round(time.time() - start)
    return ema_unet, ema_text


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def ddim_sample(
    config: ModelConfig,
    unet: UNetModel,
    context: torch.Tensor,
    uncond: torch.Tensor,
    noise: torch.Tensor,
    guidance: float,
    steps: int = 20,
) -> torch.Tensor:
    """Deterministic DDIM with classifier-free guidance (a quick check during training)."""
    alphas_cumprod = schedule(config)
    timesteps = torch.arange(0, 1000, 1000 // steps).flip(0) + 1
    x = noise
    for i, t in enumerate(timesteps):
        tt = torch.full((len(x),), float(t))
        eps_c = unet(x, tt, context)
        eps_u = unet(x, tt, uncond)
        eps = eps_u + guidance * (eps_c - eps_u)
        ab = alphas_cumprod[t]
        ab_prev = alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0)
        x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
    return x


def held_out_specs(per_combo: int) -> list[tuple[str, str, str]]:
    return [c for c in shapes_data.held_out_combinations() for _ in range(per_combo)]


@torch.no_grad()
def evaluate(
    config: ModelConfig,
    unet: UNetModel,
    text: TextEncoder,
    vae: AutoencoderKL,
    args: argparse.Namespace,
    guidance: float,
    tag: str,
    save_to: Path | None = None,
) -> shapes_check.CheckScores:
    combos = held_out_specs(args.eval_per_combo)
    prompts = [f"a {c} {s} on a {b} background" for c, s, b in combos]
    ids = torch.from_numpy(args.tokenizer.encode(prompts)).long()
    empty = torch.from_numpy(args.tokenizer.encode([""] * len(prompts))).long()
    noise = torch.randn(
        (len(prompts), 4, 8, 8), generator=torch.Generator().manual_seed(args.seed + 100)
    )
    latent = ddim_sample(config, unet, text(ids), text(empty), noise, guidance)
    images = vae.decode(latent / config.vae.scaling_factor).clamp(-1, 1)
    pixels = ((images + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    scores = shapes_check.score(pixels, combos)
    log(f"eval [{tag}] held-out prompts, guidance {guidance}: {scores.summary()}")
    if save_to is not None:
        from PIL import Image

        k = len(pixels)
        cols = args.eval_per_combo
        rows = k // cols
        grid = pixels[: rows * cols].reshape(rows, cols, 64, 64, 3).transpose(0, 2, 1, 3, 4)
        Image.fromarray(grid.reshape(rows * 64, cols * 64, 3)).save(save_to)
    return scores


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_PATH)
    parser.add_argument("--work-dir", type=Path, default=REPO / ".scratch" / "train")
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-4)
    parser.add_argument("--edge-weight", type=float, default=1.0)
    parser.add_argument("--latent-images", type=int, default=12000)
    parser.add_argument("--unet-steps", type=int, default=1700)
    parser.add_argument("--unet-batch", type=int, default=64)
    parser.add_argument("--unet-lr", type=float, default=5e-4)
    parser.add_argument("--min-snr", type=float, default=5.0)
    parser.add_argument("--caption-dropout", type=float, default=0.15)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--eval-every", type=int, default=800)
    parser.add_argument("--eval-per-combo", type=int, default=4)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--reuse-vae", action="store_true", help="load work-dir/vae.pt")
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start the UNet and text encoder from this checkpoint (a second training phase)",
    )
    parser.add_argument("--trial", action="store_true", help="a few steps of everything")
    args = parser.parse_args()
    if args.trial:
        args.vae_steps, args.unet_steps, args.latent_images = 20, 20, 512
        args.log_every, args.eval_every, args.eval_per_combo = 5, 10, 1
        args.work_dir = args.work_dir / "trial"  # never overwrite a real run's vae.pt
        args.out = args.work_dir / "trial.safetensors"
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.results = {"seed": args.seed, "threads": args.threads}
    begin = time.time()

    config = PRESETS[PRESET]
    with tempfile.TemporaryDirectory() as tok_dir:
        write_clip_tokenizer_files(Path(tok_dir))
        args.tokenizer = CLIPTokenizer.from_dir(
            Path(tok_dir), max_length=77, pad_token_id=config.pad_token_id
        )

    vae_path = args.work_dir / "vae.pt"
    if args.reuse_vae and vae_path.is_file():
        vae = AutoencoderKL(config.vae)
        vae.load_state_dict(torch.load(vae_path, weights_only=True))
        vae = vae.to(memory_format=torch.channels_last).eval().requires_grad_(False)
        log(f"VAE loaded from {vae_path}")
    else:
        vae = train_vae(config, args)
        torch.save(vae.state_dict(), vae_path)
    args.results["vae_reconstruction"] = reconstruction_error(vae, args.seed + 7)
    log(f"VAE reconstruction (all combinations): {args.results['vae_reconstruction']}")

    specs = shapes_data.sample_specs(args.latent_images, args.seed + 4)
    t0 = time.time()
    mean, std = encode_dataset(vae, specs)
    sampled = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    scaling = float(1.0 / sampled.std())
    log(
        f"encoded {len(specs)} pictures in {time.time() - t0:.0f}s; latent std "
        f"{float(sampled.std()):.4f} -> scaling factor {scaling:.5f}"
    )
    args.results["scaling_factor"] = round(scaling, 5)
    config = replace(config, vae=replace(config.vae, scaling_factor=round(scaling, 5)))
    if abs(PRESETS[PRESET].vae.scaling_factor - config.vae.scaling_factor) > 1e-5:
        log(
            f"note: PRESETS[{PRESET!r}] has scaling_factor {PRESETS[PRESET].vae.scaling_factor};"
            f" this run's is {config.vae.scaling_factor} (the checkpoint carries its own)"
        )
    vae.config = config.vae
    args.eval_vae = vae

    captions = sorted({shapes_data.caption(s) for s in specs})
    caption_of = {c: i for i, c in enumerate(captions)}
    prompt_ids = torch.from_numpy(args.tokenizer.encode(captions)).long()
    empty_ids = torch.from_numpy(args.tokenizer.encode([""])).long()[0]
    caption_index = torch.tensor([caption_of[shapes_data.caption(s)] for s in specs])
    unet, text = train_unet(config, (mean, std), prompt_ids, empty_ids, caption_index, args)

    final: dict[str, dict[str, float]] = {}
    for guidance in (1.0, config.default_guidance):
        grid = args.work_dir / f"eval_g{guidance:g}.png"
        scores = evaluate(config, unet, text, vae, args, guidance, "final", save_to=grid)
        final[f"guidance_{guidance:g}"] = {
            "colour": scores.colour,
            "shape": scores.shape,
            "all": scores.all,
            "n": scores.n,
        }
    args.results["ddim20_held_out"] = final

    models = LoadedModels(
        unet=unet.to(memory_format=torch.contiguous_format),
        vae=vae.to(memory_format=torch.contiguous_format),
        text_encoder=text,
        config=config,
        source="tools/train_default_model.py",
    )
    save_checkpoint(models, args.out, dtype=torch.float16)
    args.results["total_seconds"] = round(time.time() - begin)
    args.results["parameters"] = {
        "unet": count_parameters(unet),
        "vae": count_parameters(vae),
        "text_encoder": count_parameters(text),
    }
    args.results["file_bytes"] = args.out.stat().st_size
    (args.work_dir / "results.json").write_text(json.dumps(args.results, indent=2))
    log(f"saved {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    log("results: " + json.dumps(args.results))


if __name__ == "__main__":
    main()
