"""Names and paths inside an engine dir: the one place every part looks them up.

<engine dir>/manifest.json
<engine dir>/tokenizer/{vocab.json, merges.txt}
<engine dir>/<component>/model.onnx [+ model.onnx_data]
<engine dir>/<component>/model.plan + model.plan.json     (sd-build)
<engine dir>/<component>/ort_cpu_cache/<key>/              (ONNX Runtime's optimized graph)
"""

from __future__ import annotations

from pathlib import Path

MANIFEST_NAME = "manifest.json"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_2_DIR = "tokenizer_2"  # SDXL's second tokenizer (same BPE files, padded with 0)
ONNX_NAME = "model.onnx"
EXTERNAL_DATA_NAME = "model.onnx_data"
PLAN_NAME = "model.plan"
PLAN_METADATA_SUFFIX = ".json"
ORT_CACHE_DIR = "ort_cpu_cache"

# Every component an engine dir may hold, in pipeline order. text_encoder_2 is SDXL's second
# text tower (OpenCLIP ViT-bigG); SD 1.x / 2.x engine dirs have none.
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
# Components a txt2img run cannot do without; vae_encoder is only needed for img2img.
REQUIRED_COMPONENTS = ("text_encoder", "unet", "vae_decoder")
IMG2IMG_COMPONENTS = (*REQUIRED_COMPONENTS, "vae_encoder")
SECOND_TEXT_ENCODER = "text_encoder_2"


def needed_components(img2img: bool, two_text_encoders: bool = False) -> tuple[str, ...]:
    """The components one generation runs (SDXL: both text towers)."""
    needed = IMG2IMG_COMPONENTS if img2img else REQUIRED_COMPONENTS
    return (needed[0], SECOND_TEXT_ENCODER, *needed[1:]) if two_text_encoders else needed


def plan_path(engine_dir: str | Path, component: str) -> Path:
    return Path(engine_dir) / component / PLAN_NAME


def plan_metadata_path(plan: Path) -> Path:
    return plan.with_name(plan.name + PLAN_METADATA_SUFFIX)


def relative(path: Path, engine_dir: str | Path) -> str:
    """`path` relative to the engine dir for messages, else as given."""
    try:
        return str(Path(path).relative_to(engine_dir))
    except ValueError:
        return str(path)


def build_command(engine_dir: str | Path, component: str | None = None) -> str:
    """The sd-build command line that (re)builds plans for this engine dir: the fix that
    every stale-plan and out-of-profile message names."""
    command = f"sd-build --engine {engine_dir}"
    return f"{command} --component {component}" if component else command


def export_command(component: str) -> str:
    """The sd-export command that adds a missing component."""
    return f"sd-export --component {component}"
