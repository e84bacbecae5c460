"""`export_engine_dir`: reference modules -> validated ONNX graphs + manifest, atomically."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import gc
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import sd_deploy
from sd_deploy.engine_dir import shapes
from sd_deploy.engine_dir.atomic import staged_dir
from sd_deploy.engine_dir.hashing import files_sha256
from sd_deploy.engine_dir.layout import COMPONENTS, TOKENIZER_2_DIR
from sd_deploy.engine_dir.lora import LORA_COMPONENTS
from sd_deploy.engine_dir.manifest import (
    CONTEXT_CHUNK,
    ComponentSpec,
    Manifest,
    ModelInfo,
    ShapeRanges,
    TensorSpec,
    TokenizerInfo,
)
from sd_deploy.errors import ExportError
from sd_deploy.exporter.components import (
    IO_CONVENTIONS,
    SDXL_TIME_IDS,
    SDXL_UNET_CONVENTIONS,
    ComponentGraph,
    clip_skip_max,
    component_graphs,
    sample_inputs,
)
from sd_deploy.exporter.lora_ready import prepare_lora_ready
from sd_deploy.exporter.onnx_export import export_module, export_onnx, finalize_onnx
from sd_deploy.exporter.output_dir import (
    existing_manifest,
    link_or_copy,
    model_identity,
)
from sd_deploy.exporter.validate import validate_component
from sd_deploy.models import LoadedModels

DEFAULT_OPSET = 17


def resolve_components(names: Sequence[str], available: Sequence[str] | None = None) -> list[str]:
    """'all' or component names -> ordered unique list; unknown names are a user error.

    available: the model's graphs ('all' means those; text_encoder_2 is SDXL's only)."""
    result: list[str] = []
    for name in names:
        wanted = COMPONENTS if name == "all" else (name,)
        for n in wanted:
            if n not in COMPONENTS:
                raise ExportError(
                    f"unknown component {n!r}; choose from {', '.join(COMPONENTS)} or all"
                )
            if available is not None and n not in available:
                if name == "all":
                    continue
                raise ExportError(f"this model has no component {n!r} (it is SDXL's only)")
            if n not in result:
                result.append(n)
    return result


def validation_shapes(
    graph: ComponentGraph, ranges: ShapeRanges, vae_scale_factor: int
) -> list[dict[str, list[int]]]:
    """Two shapes inside the ranges: optimum size and batch, then minimum size at maximum batch.

    Both are guided (UNet batch doubled); together they move every dynamic axis (the edge
    one with the longest prompt context).
    """
    ctx = ranges.context_length
    opt = shapes.symbol_values(
        ranges.batch.opt, ranges.height.opt, ranges.width.opt, vae_scale_factor, True, ctx.opt
    )
    edge = shapes.symbol_values(
        ranges.batch.max, ranges.height.min, ranges.width.min, vae_scale_factor, True, ctx.max
    )
    return [{i.name: shapes.resolve(i.shape, v) for i in graph.inputs} for v in (opt, edge)]


def trace_shapes(graph: ComponentGraph, vae_scale_factor: int) -> dict[str, list[int]]:
    """Small shapes to trace at: the graph's axes stay dynamic, and fp16 on a CPU is slow.

    Batch 2, an 8x8 latent and a two-chunk context, so no axis is 1 (the tracer could treat
    it as broadcast) and the context length is not the text encoder's 77.
    """
    side = 8 * vae_scale_factor
    values = shapes.symbol_values(
        2, side, side, vae_scale_factor, guided=False, context_length=2 * CONTEXT_CHUNK
    )
    return {i.name: shapes.resolve(i.shape, values) for i in graph.inputs}


def export_component(
    models: LoadedModels,
    graph: ComponentGraph,
    stage: Path,
    fp16: bool,
    ranges: ShapeRanges,
    opset: int,
    validate: bool,
    bar: Any,
    lora_ready: bool = False,
) -> ComponentSpec:
    """Export, pack and (optionally) validate one component inside the staging dir.

    lora_ready: keep the weights external and write lora_targets.json (run-time LoRAs).
    """
    fp16 = fp16 and not graph.keep_fp32
    precision = "fp16" if fp16 else "fp32"
    scale = models.config.vae_scale_factor
    reference = graph.build(models).eval()
    module = export_module(reference, fp16)
    # A big fp32 module's weights go to disk while its fp16 copy is traced, and again while
    # ONNX Runtime validates the graph: one copy of the weights in memory at a time.
    park = functools.partial(parked, reference, stage / f".{graph.name}.fp32.safetensors")
    trace = trace_shapes(graph, scale)
    example = {k: torch.from_numpy(v) for k, v in sample_inputs(graph, trace, fp16, seed=0).items()}
    out_dir = stage / graph.name
    raw_dir = stage / f".{graph.name}.raw"
    raw_dir.mkdir()
    out_dir.mkdir()
    bar.set_description(f"export {graph.name} ({precision})")
    with park() if fp16 else contextlib.nullcontext():
        export_onnx(module, graph, example, raw_dir / "model.onnx", opset)
        del module
        gc.collect()
        # Run-time LoRAs patch MatMul weights by initializer name, in ONNX Runtime's
        # optimized graph and TensorRT's refit, where a Transpose before them would be folded
        # into unnamed weights: those graphs keep the tracer's layout.
        lora = lora_ready and graph.name in LORA_COMPONENTS
        files = finalize_onnx(raw_dir / "model.onnx", out_dir / "model.onnx", not lora)
        shutil.rmtree(raw_dir)
    if lora:
        files = prepare_lora_ready(out_dir / "model.onnx", models, graph.name)
    bar.update(1)

    validation: dict[str, Any] = {"validated": False, "reason": "--no-validate"}
    if validate:
        bar.set_description(f"validate {graph.name} ({precision})")
        validation = validate_component(
            out_dir / "model.onnx",
            reference,
            graph,
            validation_shapes(graph, ranges, scale),
            precision,
            parked=park,
        )
    bar.update(1)
    inputs = [(i.name, i.shape) for i in graph.inputs]
    return ComponentSpec(
        name=graph.name,
        onnx=f"{graph.name}/model.onnx",
        files=[f"{graph.name}/{f.name}" for f in files],
        precision=precision,
        inputs=[
            TensorSpec(i.name, graph.input_dtype(i, fp16), list(i.shape)) for i in graph.inputs
        ],
        outputs=[
            TensorSpec(name, "float16" if fp16 else "float32", list(shape))
            for name, shape in graph.outputs
        ],
        shape_ranges=ranges,
        profile_shapes=shapes.profile_shapes(inputs, ranges, scale),
        # The graph and its external weights: a re-export with other weights of the same
        # architecture writes a byte-identical model.onnx beside a different .onnx_data.
        onnx_sha256=files_sha256(out_dir.parent, files),
        validation=validation,
    )


# fp32 references larger than this are parked on disk while their fp16 copy is traced and
# packed (the full-size SDXL UNet: 10.3 GB), then mapped back for validation.
SPILL_BYTES = 4 << 30


def spill_reference(reference: torch.nn.Module, path: Path) -> Path | None:
    """Write the fp32 module's tensors to `path` and free them (meta device), when it is big
    and every buffer is in its state dict; None when it stays in memory."""
    from safetensors.torch import save_file

    state = reference.state_dict()
    size = sum(t.numel() * t.element_size() for t in state.values())
    if size <= SPILL_BYTES or len(state) != sum(1 for _ in reference.parameters()) + sum(
        1 for _ in reference.buffers()
    ):
        return None
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    del state
    reference.to_empty(device="meta")
    gc.collect()
    return path


@contextlib.contextmanager
def parked(reference: torch.nn.Module, path: Path) -> Iterator[None]:
    """The module's weights parked on disk at `path` (when big: `spill_reference`) for the
    duration, then mapped back."""
    spilled = spill_reference(reference, path)
    try:
        yield
    finally:
        if spilled is not None:
            restore_reference(reference, spilled)


def restore_reference(reference: torch.nn.Module, path: Path) -> None:
    """Map the spilled tensors back (file-backed pages: the kernel may drop and re-read
    them under memory pressure); the file is unlinked, the mapping keeps it alive."""
    from safetensors.torch import load_file

    reference.load_state_dict(load_file(str(path)), strict=True, assign=True)
    path.unlink()


def write_tokenizer(models: LoadedModels, dest: Path, source: Path | None = None) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    source = models.tokenizer_dir if source is None else source
    if source is not None:
        for name in ("vocab.json", "merges.txt"):
            shutil.copy2(source / name, dest / name)
    else:
        from sd_deploy.engine_dir.tokenizer_files import write_clip_tokenizer_files

        write_clip_tokenizer_files(dest)


def provenance(models: LoadedModels, opset: int, validate: bool) -> dict[str, Any]:
    import onnx

    return {
        "source": models.source,
        "source_sha256": models.source_sha256,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "sd_deploy_version": sd_deploy.__version__,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "opset": opset,
        "exporter": "torch.onnx TorchScript-based (dynamo=False)",
        "validated": validate,
    }


def build_manifest(
    models: LoadedModels, components: dict[str, ComponentSpec], prov: dict[str, Any]
) -> Manifest:
    cfg = models.config
    xl = cfg.text_encoder_2
    conventions = dict(IO_CONVENTIONS)
    if xl is None:
        conventions.pop("text_encoder_2")
    else:
        conventions["unet"] = SDXL_UNET_CONVENTIONS
    return Manifest(
        model=ModelInfo(
            family=cfg.family,
            prediction_type=cfg.prediction_type,
            latent_channels=cfg.latent_channels,
            vae_scale_factor=cfg.vae_scale_factor,
            scaling_factor=cfg.vae.scaling_factor,
            text_embed_dim=cfg.unet.context_dim if xl else cfg.text_encoder.hidden_size,
            default_height=cfg.default_size,
            default_width=cfg.default_size,
            clip_skip_max=clip_skip_max(models),
            fixed_text_layer=cfg.fixed_text_layer,
            pooled_embed_dim=xl.hidden_size if xl else 0,
            time_ids=list(SDXL_TIME_IDS) if xl else [],
            zero_negative_for_empty_prompt=xl is not None,
        ),
        tokenizer=TokenizerInfo(
            path="tokenizer",
            max_length=cfg.text_encoder.max_position_embeddings,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=cfg.pad_token_id,
        ),
        tokenizer_2=None
        if xl is None
        else TokenizerInfo(
            path=TOKENIZER_2_DIR,
            max_length=xl.max_position_embeddings,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=cfg.pad_token_id_2,
        ),
        scheduler=cfg.scheduler_config(),
        components=dict(sorted(components.items(), key=lambda kv: COMPONENTS.index(kv[0]))),
        provenance=prov,
        io_conventions=conventions,
    )


def export_engine_dir(
    models: LoadedModels,
    out: str | Path,
    components: Sequence[str] = ("all",),
    fp16: bool = False,
    ranges: ShapeRanges | None = None,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    validate: bool = True,
    progress: bool = True,
    loras: Sequence[Mapping[str, Any]] = (),
    lora_ready: bool = False,
) -> Manifest:
    """Export `components` of `models` into the engine dir `out` (created or updated).

    loras: the LoRAs already merged into `models` (`models.lora.merge_loras`), recorded in
    the manifest's provenance (name, file, sha256, scale). lora_ready: keep what run-time
    LoRA switching needs (`exporter.lora_ready`).
    """
    out = Path(out)
    graphs = component_graphs(models)
    names = resolve_components(components, tuple(graphs))
    ranges = shapes.check_ranges(ranges or shapes.default_ranges(models.config.default_size))
    prov = provenance(models, opset, validate)
    prov["loras"] = [dict(lora) for lora in loras]
    prov["lora_ready"] = lora_ready
    old = existing_manifest(out, model_identity(prov), force)
    specs: dict[str, ComponentSpec] = {}
    with (
        staged_dir(out, error=ExportError) as stage,
        tqdm(total=2 * len(names), disable=not progress, unit="step", leave=False) as bar,
    ):
        if old is not None:
            for name, spec in old.components.items():
                if name not in names:
                    for rel in spec.files:
                        link_or_copy(out / rel, stage / rel)
                    specs[name] = spec
        for name in names:
            specs[name] = export_component(
                models, graphs[name], stage, fp16, ranges, opset, validate, bar, lora_ready
            )
        write_tokenizer(models, stage / "tokenizer")
        if models.text_encoder_2 is not None:
            write_tokenizer(models, stage / TOKENIZER_2_DIR, models.tokenizer_2_dir)
        manifest = build_manifest(models, specs, prov)
        manifest.write(stage)
    return manifest
