"""Diffusers folders: finding each component's weight files and planning them into our modules.

Weights are safetensors or `.bin`, sharded (an `.index.json` weight map) or not, with fp16
variants as a fallback; their diffusers names are looked up from our ldm names
(`diffusers_names`), so a folder loads into the same modules as a single file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from torch import nn

from sd_deploy.errors import CheckpointError
from sd_deploy.models.checkpoints.assembly import Component, Source, as_conv1x1, plain, resolve
from sd_deploy.models.checkpoints.diffusers_configs import read_json
from sd_deploy.models.checkpoints.diffusers_names import (
    unet_key_to_diffusers,
    vae_keys_to_diffusers,
)
from sd_deploy.models.checkpoints.layout import COMPONENTS, text_bare
from sd_deploy.models.checkpoints.readers import MultiReader, Reader, open_weights_file
from sd_deploy.models.presets import ModelConfig

_WEIGHT_NAMES = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}
XL_COMPONENTS = (*COMPONENTS, "text_encoder_2")
_TEXT_BIN = "pytorch_model"


def _weight_files(folder: Path, name: str) -> list[Path]:
    """The weight files of one diffusers component, best format first."""
    stems = [_WEIGHT_NAMES[name]] + ([_TEXT_BIN] if name.startswith("text_encoder") else [])
    stems += [s for s in ("diffusion_pytorch_model", "model", "pytorch_model") if s not in stems]
    for variant in ("", ".fp16"):
        for ext in (".safetensors", ".bin"):
            for stem in stems:
                single = folder / f"{stem}{variant}{ext}"
                if single.is_file():
                    return [single]
                index = folder / f"{stem}{variant}{ext}.index.json"
                if index.is_file():
                    weight_map = read_json(index).get("weight_map")
                    if not isinstance(weight_map, dict) or not weight_map:
                        raise CheckpointError(f"{index} has no weight_map")
                    for f in weight_map.values():  # shard file names in this folder
                        if not isinstance(f, str) or Path(f).name != f or f in ("", ".", ".."):
                            raise CheckpointError(f"{index} names {str(f)[:60]!r}, not a file here")
                    files = [folder / f for f in sorted(set(weight_map.values()))]
                    for f in files:
                        if not f.is_file():
                            raise CheckpointError(f"{index} names {f.name}, which is missing")
                    return files
    raise CheckpointError(
        f"{folder} has no weights ({_WEIGHT_NAMES[name]}.safetensors or .bin, sharded or not)"
    )


def _open_component(folder: Path, name: str) -> tuple[Reader, list[Path]]:
    """One reader over the component's weight files (several when sharded)."""
    files = _weight_files(folder, name)
    readers: list[Reader] = []
    try:
        for f in files:
            readers.append(open_weights_file(f))
    except CheckpointError:
        for r in readers:
            r.close()
        raise
    if len(readers) == 1:
        return readers[0], files
    return MultiReader(folder, readers), files


def _components(folder: Path) -> tuple[str, ...]:
    """The component folders to load: SDXL's second text tower too (text_encoder_2/)."""
    return XL_COMPONENTS if (folder / "text_encoder_2").is_dir() else COMPONENTS


def check_layout(folder: Path) -> None:
    """The folder has the three component folders we load (model_index.json is read first)."""
    index = read_json(folder / "model_index.json")
    if (folder / "text_encoder_2").is_dir() and not (folder / "text_encoder").is_dir():
        raise CheckpointError(
            f"{folder} is an SDXL refiner (text_encoder_2/ alone: one OpenCLIP bigG tower, "
            "aesthetic-score conditioning): only SDXL base models are supported"
        )
    for name in _components(folder):
        if not (folder / name).is_dir():
            listed = " (model_index.json lists it)" if name in index else ""
            raise CheckpointError(f"{folder} is a diffusers folder without {name}/{listed}")


def open_components(folder: Path) -> tuple[dict[str, Reader], list[Path]]:
    """Readers for unet/, vae/ and text_encoder/, and their files in that order.

    Readers opened before a failure are closed again; on success the caller closes them.
    """
    readers: dict[str, Reader] = {}
    files: list[Path] = []
    try:
        for name in _components(folder):
            readers[name], component_files = _open_component(folder / name, name)
            files += component_files
    except BaseException:
        for reader in readers.values():
            reader.close()
        raise
    return readers, files


def tokenizer_dir(folder: Path, name: str = "tokenizer") -> Path | None:
    """The folder's CLIP tokenizer files (tokenizer/, or SDXL's tokenizer_2/), when both are
    there."""
    tokenizer = folder / name
    has_tokenizer = (tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file()
    return tokenizer if has_tokenizer else None


def folder_components(
    readers: dict[str, Reader], config: ModelConfig, modules: dict[str, nn.Module]
) -> list[Component]:
    """Plan the three modules (from `meta_modules(config)`) from the components' keys."""
    names = [n for n in XL_COMPONENTS if n in modules]
    components = [Component(n, modules[n]) for n in names]
    unet, vae, text = components[:3]
    consumed: dict[str, set[str]] = {n: set() for n in names}

    def finder(
        name: str, candidates: Callable[[str], Iterable[str]], conv1x1: bool = False
    ) -> Callable[[str, tuple[int, ...]], Source | str]:
        """A lookup in one component: the first candidate name present wins."""
        reader = readers[name]

        def lookup(key: str, shape: tuple[int, ...]) -> Source | str:
            names = list(candidates(key))
            for candidate in names:
                if candidate in reader.shapes:
                    consumed[name].add(candidate)
                    source = plain(reader, candidate)
                    source.key = f"{name}/{candidate}"  # messages name the component
                    return as_conv1x1(source, shape) if conv1x1 else source
            return f"{name}/{names[0] if names else key}"

        return lookup

    layers = config.unet.num_res_blocks

    def unet_names(key: str) -> list[str]:
        mapped = unet_key_to_diffusers(key, layers)
        return [mapped] if mapped else []

    levels = len(config.vae.ch_mult)
    resolve(unet, finder("unet", unet_names))
    resolve(vae, finder("vae", lambda k: vae_keys_to_diffusers(k, levels), conv1x1=True))
    resolve(text, finder("text_encoder", lambda k: ("text_model." + text_bare(k), text_bare(k))))
    if len(components) == 4:  # SDXL: CLIPTextModelWithProjection keeps text_model. names
        both = finder("text_encoder_2", lambda k: ("text_model." + text_bare(k), text_bare(k)))
        resolve(components[3], both)
    for component in components:
        for key in readers[component.name].shapes:
            if key not in consumed[component.name] and not key.endswith("position_ids"):
                component.unexpected.append(f"{component.name}/{key}")
    return components
