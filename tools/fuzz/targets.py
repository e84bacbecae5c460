"""The fuzz targets: each reader of untrusted input, fed one byte string per run.

Every target turns its bytes into what a user or client could hand sd-deploy (a file, a
folder, a prompt, a request) and runs the project's own entry point on it, as far as it
goes without running a graph. The oracle (`tools.fuzz.engine.check`) accepts success or
one of `allowed` with a one-line message; anything else is a finding.

Seeds are real files the project writes: checkpoints from `save_checkpoint` of a micro
model (the tiny preset made smaller, so one load takes ~0.1 s), `torch.save` of its
state dict, the manifest of an exported tiny engine dir, diffusers configs, infotexts
and PNGs from `ImageParameters.infotext` / `save_png`. Targets import sd_deploy lazily
(inside `prepare`), so the atheris driver can instrument those imports.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.fuzz import mutate

SEEDS_DIR = Path(__file__).resolve().parent / "seeds"


@dataclass
class Target:
    name: str
    doc: str
    run: Callable[[bytes, Path], Any]  # (input, empty work dir) -> anything
    seeds: Callable[[], list[bytes]]
    mutate: Callable[[bytes, random.Random], bytes]
    modules: tuple[str, ...]  # sd_deploy modules whose lines the coverage counts
    allowed: Callable[[], tuple[type[BaseException], ...]] = field(default=lambda: (_user_error(),))
    time_limit: float = 10.0  # seconds one input may take
    max_len: int = 1 << 16  # longest input atheris makes


def _user_error() -> type[BaseException]:
    from sd_deploy.errors import UserError

    return UserError


TARGETS: dict[str, Target] = {}


def target(**kwargs: Any) -> Callable[[Callable], Callable]:
    def register(run: Callable) -> Callable:
        TARGETS[kwargs["name"]] = Target(run=run, **kwargs)
        return run

    return register


# -------------------------------------------------------------------------- payload marker

PAYLOAD_RAN: list[str] = []


def payload_ran(what: str = "payload") -> None:
    """What a hostile pickle's __reduce__ calls in the fuzz seeds: records that code ran."""
    PAYLOAD_RAN.append(what)


class Payload:
    """Unpickling this calls `payload_ran` (a stand-in for os.system)."""

    def __reduce__(self) -> tuple:
        return (payload_ran, ("pickle payload",))


# ------------------------------------------------------------------------- micro model


def micro_config() -> Any:
    """The tiny preset shrunk further: a 160 KB checkpoint that loads in about 0.1 s."""
    import dataclasses as dc

    from sd_deploy.models import get_preset

    p = get_preset("tiny")
    return dc.replace(
        p,
        family="custom",
        unet=dc.replace(
            p.unet,
            model_channels=8,
            channel_mult=(1,),
            attention_resolutions=(1,),
            context_dim=16,
            norm_num_groups=4,
        ),
        vae=dc.replace(p.vae, ch=8, ch_mult=(1,), norm_num_groups=4),
        text_encoder=dc.replace(
            p.text_encoder,
            vocab_size=64,
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=1,
            max_position_embeddings=8,
        ),
    )


@functools.cache
def micro_models() -> Any:
    import logging

    from sd_deploy.models import build_random

    logging.getLogger("transformers").setLevel(logging.ERROR)
    return build_random(micro_config(), seed=0)


@functools.cache
def micro_state() -> dict:
    from sd_deploy.models.checkpoints import ldm_state_dict

    return ldm_state_dict(micro_models())


def _tmp() -> Path:
    """A scratch folder, removed when the process that made it exits (the cached engine
    dir and tokenizer live that long); a forked fuzzing child leaves it to its parent."""
    import atexit
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="sd-fuzz-seed-"))
    owner = os.getpid()
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, ignore_errors=True))
    return path


# ------------------------------------------------------------------------ checkpoints

CHECKPOINT_MODULES = (
    "sd_deploy.models.checkpoints",
    "sd_deploy.models.checkpoints.readers",
    "sd_deploy.models.checkpoints.single_file",
    "sd_deploy.models.checkpoints.detection",
    "sd_deploy.models.checkpoints.families",
    "sd_deploy.models.checkpoints.metadata",
    "sd_deploy.models.checkpoints.assembly",
    "sd_deploy.models.checkpoints.openclip",
)


def _safetensors_seeds() -> list[bytes]:
    import torch
    from safetensors.torch import save

    from sd_deploy.models.checkpoints import save_checkpoint

    tmp = _tmp()
    try:
        out = [save_checkpoint(micro_models(), tmp / "m.safetensors").read_bytes()]
        out.append(
            save_checkpoint(micro_models(), tmp / "h.safetensors", dtype=torch.float16).read_bytes()
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    state = {k: v.contiguous() for k, v in micro_state().items()}
    out.append(save(state))  # no metadata: the architecture is read from the shapes
    out.append(save({"model.diffusion_model.x": torch.zeros(2, 3), "b": torch.ones(1)}))
    return out


@target(
    name="safetensors",
    doc="single-file .safetensors through load_checkpoint (header JSON, offsets, dtypes, "
    "shapes, metadata config, shape detection)",
    seeds=_safetensors_seeds,
    mutate=mutate.mutate_safetensors,
    modules=CHECKPOINT_MODULES,
    max_len=1 << 19,
)
def run_safetensors(data: bytes, work: Path) -> Any:
    from sd_deploy.models.checkpoints import load_checkpoint

    path = work / "model.safetensors"
    path.write_bytes(data)
    return load_checkpoint(path)


def _ckpt_seeds() -> list[bytes]:
    import io
    import pickle

    import torch

    state = dict(micro_state())
    out = []
    buf = io.BytesIO()
    torch.save({"state_dict": state, "global_step": 875000, "epoch": 3}, buf)
    out.append(buf.getvalue())
    buf = io.BytesIO()
    torch.save(state, buf, _use_new_zipfile_serialization=False)  # legacy pickle format
    out.append(buf.getvalue())
    buf = io.BytesIO()
    torch.save({"a": torch.zeros(2, 2), "n": 1}, buf)
    out.append(buf.getvalue())
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Payload()}, buf)
    out.append(buf.getvalue())  # refused: needs a global
    out.append(pickle.dumps({"x": 1, "y": [1.0, "s"]}, protocol=2))
    return out


@target(
    name="ckpt",
    doc=".ckpt zip archives and legacy pickles through torch.load(weights_only=True)",
    seeds=_ckpt_seeds,
    mutate=mutate.mutate_torch_zip,
    modules=CHECKPOINT_MODULES,
    max_len=1 << 19,
)
def run_ckpt(data: bytes, work: Path) -> Any:
    from sd_deploy.models.checkpoints import load_checkpoint

    path = work / "model.ckpt"
    path.write_bytes(data)
    return load_checkpoint(path)


SNIFF_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".txt", "")


def _sniff_seeds() -> list[bytes]:
    seeds = _safetensors_seeds()[-1:] + _ckpt_seeds()[2:]
    return [bytes([i]) + s for i, s in enumerate(seeds)]


def _mutate_sniff(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return bytes([rng.randrange(7)])
    head, rest = data[:1], data[1:]
    if rng.random() < 0.2:
        head = bytes([rng.randrange(7)])
    inner = mutate.mutate_torch_zip if rest[:2] in (b"PK", b"\x80\x02") else mutate.mutate_bytes
    if rest[8:9] == b"{":
        inner = mutate.mutate_safetensors
    return head + inner(rest, rng)


@target(
    name="sniff",
    doc="format sniffing and opening of one weights file (open_weights_file, any extension)",
    seeds=_sniff_seeds,
    mutate=_mutate_sniff,
    modules=("sd_deploy.models.checkpoints.readers",),
)
def run_sniff(data: bytes, work: Path) -> Any:
    from sd_deploy.models.checkpoints.readers import open_weights_file

    suffix = SNIFF_SUFFIXES[data[0] % len(SNIFF_SUFFIXES)] if data else ""
    path = work / f"weights{suffix}"
    path.write_bytes(data[1:])
    reader = open_weights_file(path)
    try:
        for key in list(reader.shapes)[:4]:
            reader.get(key)
    finally:
        reader.close()


# -------------------------------------------------------------------- diffusers folders


def _diffusers_seeds() -> list[bytes]:
    return [p.read_bytes() for p in sorted(SEEDS_DIR.glob("diffusers_*.json"))]


@target(
    name="diffusers",
    doc="diffusers folder: model_index.json, unet/vae/text_encoder config.json, scheduler "
    "config, tokenizer pad token, sharded weight index -> ModelConfig -> modules (meta)",
    seeds=_diffusers_seeds,
    mutate=mutate.mutate_json,
    modules=(
        "sd_deploy.models.checkpoints.diffusers_configs",
        "sd_deploy.models.checkpoints.diffusers_folder",
        "sd_deploy.models.checkpoints.families",
    ),
)
def run_diffusers(data: bytes, work: Path) -> Any:
    """Input: a JSON object {relative path: content}; objects are written as JSON."""
    from sd_deploy.errors import CheckpointError
    from sd_deploy.models.checkpoints import assembly, diffusers_configs, diffusers_folder

    try:
        files = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(files, dict):
        return None
    folder = work / "model"
    folder.mkdir()
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (folder / name).mkdir()
    for rel, content in list(files.items())[:16]:
        parts = [p for p in str(rel).split("/") if p not in ("", ".", "..")]
        if not parts:
            continue
        path = folder.joinpath(*parts)
        if path.is_dir():
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            text = content if isinstance(content, str) else json.dumps(content)
            path.write_text(text, encoding="utf-8", errors="surrogatepass")
        except (OSError, UnicodeEncodeError, ValueError):
            continue
    diffusers_folder.check_layout(folder)
    config, _how = diffusers_configs.folder_config(folder, None, None)
    assembly.meta_modules(config)
    for name in ("unet", "vae", "text_encoder"):
        try:
            diffusers_folder._weight_files(folder / name, name)
        except CheckpointError as exc:
            if "has no weights" not in str(exc):
                raise
    return config


# ------------------------------------------------------------------------- engine dirs


def small_vocab() -> tuple[dict[str, int], list[str]]:
    """A valid CLIP vocabulary of 512 byte tokens, 300 merges, BOS and EOS (ids 49406/7)."""
    from sd_deploy.engine_dir.tokenizer_files import (
        BOS_TOKEN,
        BOS_TOKEN_ID,
        END_OF_WORD,
        EOS_TOKEN,
        EOS_TOKEN_ID,
        SHIPPED_BPE_GZ,
        bytes_to_unicode,
        read_bpe_gz,
    )

    merges = read_bpe_gz(SHIPPED_BPE_GZ)[:300]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + END_OF_WORD for c in chars] + ["".join(m.split(" ")) for m in merges]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    vocab[BOS_TOKEN] = BOS_TOKEN_ID
    vocab[EOS_TOKEN] = EOS_TOKEN_ID
    return vocab, merges


def write_small_tokenizer(folder: Path) -> None:
    vocab, merges = small_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")


def seed_manifest() -> bytes:
    return (SEEDS_DIR / "manifest.json").read_bytes()


@functools.cache
def engine_dir_base() -> Path:
    """An engine dir with the seed manifest's files as empty placeholders (no graph runs)
    and a small tokenizer; targets write their manifest into a copy of this layout."""
    base = _tmp() / "engines"
    write_small_tokenizer(base / "tokenizer")
    manifest = json.loads(seed_manifest())
    for comp in manifest["components"].values():
        for rel in comp["files"]:
            (base / rel).parent.mkdir(parents=True, exist_ok=True)
            (base / rel).write_bytes(b"")
    (base / "manifest.json").write_bytes(seed_manifest())
    return base


def _engine_dir_in(work: Path, manifest: bytes) -> Path:
    """`work`/engines: symlinks to the base layout, with `manifest` as manifest.json."""
    base = engine_dir_base()
    root = work / "engines"
    root.mkdir()
    for child in base.iterdir():
        if child.name != "manifest.json":
            (root / child.name).symlink_to(child)
    (root / "manifest.json").write_bytes(manifest)
    return root


@functools.cache
def seed_pipeline() -> Any:
    """A Pipeline over the seed engine dir (ONNX Runtime, nothing loaded): for validate."""
    from sd_deploy.runtime import Pipeline

    return Pipeline(engine_dir_base(), backend="onnxruntime")


@target(
    name="manifest",
    doc="engine dir manifest.json: read_manifest, then what Pipeline() and validate() read "
    "from it (model info, tokenizer settings, scheduler config, shape ranges, I/O specs)",
    seeds=lambda: [seed_manifest()],
    mutate=mutate.mutate_json,
    modules=(
        "sd_deploy.engine_dir.manifest",
        "sd_deploy.engine_dir.shapes",
        "sd_deploy.runtime.pipeline",
        "sd_deploy.runtime.schedulers",
    ),
)
def run_manifest(data: bytes, work: Path) -> Any:
    from sd_deploy.runtime import GenerationRequest, Pipeline

    root = _engine_dir_in(work, data)
    pipe = Pipeline(root, backend="onnxruntime")
    try:
        pipe.validate(GenerationRequest(prompt="a red circle"))
        pipe.validate(GenerationRequest(prompt="x", negative_prompt="y", batch=2, seed=3))
    finally:
        pipe.close()


TOKENIZER_SEP = b"\n\x00\x00MERGES\x00\x00\n"
PROMPT_SEP = b"\n\x00\x00PROMPT\x00\x00\n"


def _tokenizer_seeds() -> list[bytes]:
    vocab, merges = small_vocab()
    v = json.dumps(vocab, ensure_ascii=False).encode()
    m = ("#version: 0.2\n" + "\n".join(merges) + "\n").encode()
    return [
        v + TOKENIZER_SEP + m + PROMPT_SEP + b"a photo of an astronaut, <|endoftext|>!",
        v + TOKENIZER_SEP + m[:400] + PROMPT_SEP + "caf\u00e9 \U0001f600".encode(),
    ]


def _mutate_tokenizer(data: bytes, rng: random.Random) -> bytes:
    vocab, _, rest = data.partition(TOKENIZER_SEP)
    merges, _, prompt = rest.partition(PROMPT_SEP)
    part = rng.randrange(3)
    if part == 0:
        vocab = mutate.mutate_json(vocab, rng)
    elif part == 1:
        merges = mutate.mutate_text(merges, rng, " \n#</w>abc")
    else:
        prompt = mutate.mutate_text(prompt, rng, " !<|endoftext|>")
    return vocab + TOKENIZER_SEP + merges + PROMPT_SEP + prompt


@target(
    name="tokenizer",
    doc="tokenizer files (vocab.json, merges.txt) through CLIPTokenizer.from_dir, then a "
    "prompt through encode / count_tokens",
    seeds=_tokenizer_seeds,
    mutate=_mutate_tokenizer,
    modules=("sd_deploy.runtime.tokenizer",),
    max_len=1 << 17,
)
def run_tokenizer(data: bytes, work: Path) -> Any:
    from sd_deploy.runtime.tokenizer import CLIPTokenizer

    vocab, _, rest = data.partition(TOKENIZER_SEP)
    merges, _, prompt = rest.partition(PROMPT_SEP)
    folder = work / "tokenizer"
    folder.mkdir()
    (folder / "vocab.json").write_bytes(vocab)
    (folder / "merges.txt").write_bytes(merges)
    pad = None if not prompt else (None, 0, 49407, 49406)[prompt[0] % 4]
    tok = CLIPTokenizer.from_dir(folder, pad_token_id=pad)
    text = prompt.decode("utf-8", "surrogateescape")
    tok.encode([text, ""])
    tok.count_tokens(text)


def _plan_seeds() -> list[bytes]:
    return [p.read_bytes() for p in sorted(SEEDS_DIR.glob("plan_*.json"))]


@target(
    name="plan",
    doc="TensorRT plan metadata (<component>/model.plan.json) through plan_status: fresh, or "
    "stale with a reason; never an exception",
    seeds=_plan_seeds,
    mutate=mutate.mutate_json,
    modules=("sd_deploy.engine_dir.plans", "sd_deploy.engine_dir.shapes"),
    allowed=lambda: (),
)
def run_plan(data: bytes, work: Path) -> Any:
    from sd_deploy.engine_dir.manifest import Manifest
    from sd_deploy.engine_dir.plans import plan_status
    from sd_deploy.engine_dir.shapes import wanted_profile

    manifest = Manifest.from_json(json.loads(seed_manifest()))
    spec = manifest.components["unet"]
    plan = work / "unet" / "model.plan"
    plan.parent.mkdir()
    plan.write_bytes(b"\x00" * 64)
    (work / "unet" / "model.plan.json").write_bytes(data)
    current = {"trt_version": "10.12.0", "gpu_name": "NVIDIA H200", "compute_capability": "9.0"}
    wanted = wanted_profile(spec, manifest.model.vae_scale_factor)
    status = plan_status(work, spec, current, wanted, onnx_sha256=spec.onnx_sha256)
    if not status.fresh and "\n" in status.reason:
        raise AssertionError(f"multi-line stale reason {status.reason!r}")
    return status


def write_int8_placeholders(root: Path) -> Path:
    """Small stand-ins for sd-quantize's model.xml / model.bin (no graph is read)."""
    folder = root / "unet" / "int8"
    folder.mkdir(parents=True)
    (folder / "model.xml").write_bytes(b"<net name='unet'/>\n")
    (folder / "model.bin").write_bytes(bytes(range(64)))
    return folder


@target(
    name="int8",
    doc="sd-quantize's int8 graph metadata (<component>/int8/int8.json) through int8_status, "
    "files re-hashed: fresh, or stale with a reason; never an exception",
    seeds=lambda: [(SEEDS_DIR / "int8_unet.json").read_bytes()],
    mutate=mutate.mutate_json,
    modules=("sd_deploy.engine_dir.int8_graphs",),
    allowed=lambda: (),
)
def run_int8(data: bytes, work: Path) -> Any:
    from sd_deploy.engine_dir.int8_graphs import int8_status
    from sd_deploy.engine_dir.manifest import Manifest

    spec = Manifest.from_json(json.loads(seed_manifest())).components["unet"]
    folder = write_int8_placeholders(work)
    (folder / "int8.json").write_bytes(data)
    status = int8_status(work, spec, verify=True)
    if not status.fresh and "\n" in status.reason:
        raise AssertionError(f"multi-line stale reason {status.reason!r}")
    return status


# --------------------------------------------------------------------------- prompts

PROMPT_ALPHABET = "()[]:\\ ,.BREAK 1.5 0 -e9<>|!\n\t"


@functools.cache
def real_tokenizer() -> Any:
    from sd_deploy.runtime.tokenizer import CLIPTokenizer, write_clip_tokenizer_files

    folder = _tmp() / "tokenizer"
    write_clip_tokenizer_files(folder)
    return CLIPTokenizer.from_dir(folder)


def _prompt_seeds() -> list[bytes]:
    texts = [
        "a (red:1.3) circle, [blurry], ((sharp)) BREAK on a white background",
        "(masterpiece:1.2), best quality, \\(escaped\\) (nested (deep:0.5)) [[x]] " * 8,
        "caf\u00e9 \u65e5\u672c\u8a9e \U0001f600 \u03a3\u03a3 <|endoftext|> !!!",
        "<lora:style:0.8> a cat",
        "",
    ]
    return [t.encode() for t in texts]


@target(
    name="prompts",
    doc="prompts (any unicode): tokenizer encode, A1111 emphasis parser, BREAK and long-prompt "
    "chunking, weights applied to a context",
    seeds=_prompt_seeds,
    mutate=lambda d, rng: mutate.mutate_text(d, rng, PROMPT_ALPHABET),
    modules=("sd_deploy.runtime.prompts", "sd_deploy.runtime.tokenizer", "sd_deploy.runtime.lora"),
    time_limit=5.0,
)
def run_prompts(data: bytes, work: Path) -> Any:
    import numpy as np

    from sd_deploy.runtime.lora import extract_lora_tags
    from sd_deploy.runtime.prompts import PromptEncoder

    # Invalid UTF-8 becomes lone surrogates: a Python caller can pass any str.
    text = data.decode("utf-8", "surrogateescape")
    tok = real_tokenizer()
    extract_lora_tags(text)  # <lora:name:scale> tags, read before the prompt is parsed
    tok.encode(text)
    for emphasis in (True, False):
        enc = PromptEncoder(
            tok.text_ids,
            bos_id=tok.bos_token_id,
            eos_id=tok.eos_token_id,
            pad_id=tok.pad_token_id,
            comma_id=tok.token_id(",</w>"),
            max_chunks=3,
            emphasis=emphasis,
        )
        context = enc.context(
            [text], lambda ids: np.ones((*ids.shape, 4), np.float32), negative_prompts=[""]
        )
        if not np.isfinite(context).all():
            raise AssertionError("prompt weights made a non-finite context")


# -------------------------------------------------------------------------- infotext


def _infotext_seeds() -> list[bytes]:
    return [p.read_bytes() for p in sorted(SEEDS_DIR.glob("infotext_*"))]


INFOTEXT_ALPHABET = ':,"\n 0123456789x.-Steps Sampler Size Seed CFG scale Negative prompt'


def _mutate_infotext(data: bytes, rng: random.Random) -> bytes:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _mutate_png(data, rng)
    return mutate.mutate_text(data, rng, INFOTEXT_ALPHABET)


def _mutate_png(data: bytes, rng: random.Random) -> bytes:
    """Edit one chunk's payload (IHDR sizes, the tEXt text) and fix its CRC, mostly."""
    import zlib

    chunks = []
    pos = 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        chunks.append([kind, data[pos + 8 : pos + 8 + length]])
        pos += 12 + length
    if not chunks or rng.random() < 0.2:
        return mutate.mutate_bytes(data, rng)
    chunk = rng.choice(chunks)
    if chunk[0] in (b"tEXt", b"iTXt", b"zTXt") and rng.random() < 0.7:
        key, _, text = chunk[1].partition(b"\x00")
        chunk[1] = key + b"\x00" + mutate.mutate_text(text, rng, INFOTEXT_ALPHABET)
    else:
        chunk[1] = mutate.mutate_bytes(chunk[1], rng)
    out = [data[:8]]
    for kind, body in chunks:
        crc = zlib.crc32(kind + body) if rng.random() < 0.95 else rng.randrange(1 << 32)
        out.append(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc))
    return b"".join(out)


@target(
    name="infotext",
    doc="sd-run --from-png: a PNG's parameters text (read_png_parameters) or the text itself, "
    "parse_infotext, request_fields, and the request validated against an engine dir",
    seeds=_infotext_seeds,
    mutate=_mutate_infotext,
    modules=("sd_deploy.runtime.infotext", "sd_deploy.runtime.images"),
)
def run_infotext(data: bytes, work: Path) -> Any:
    from sd_deploy.runtime import GenerationRequest
    from sd_deploy.runtime.images import read_png_parameters
    from sd_deploy.runtime.infotext import parse_infotext

    if data[:8] == b"\x89PNG\r\n\x1a\n":
        path = work / "image.png"
        path.write_bytes(data)
        text = read_png_parameters(path)
    else:
        text = data.decode("utf-8", "replace")
    parsed = parse_infotext(text)
    fields = parsed.request_fields()
    parsed.params.get("Model hash")
    seed_pipeline().validate(GenerationRequest(**fields))


# ----------------------------------------------------------------------------- LoRAs


@functools.cache
def lora_table() -> Any:
    from sd_deploy.models.lora import target_table

    return target_table(micro_models())


def _lora_seeds() -> list[bytes]:
    """LoRA files for the micro model from the tests' own writer (tests/models/lora_files.py):
    kohya with alphas, PEFT with adapter metadata, old diffusers names, fp16, and a .pt."""
    import io
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "models"))
    try:
        import lora_files
    finally:
        sys.path.pop(0)
    from safetensors.torch import load_file

    tmp = _tmp()
    out = []
    try:
        for fmt, alpha, dtype in (
            ("kohya", 2.0, torch.float32),
            ("peft", 8.0, torch.float32),
            ("lora_down_up", None, torch.float16),
        ):
            path = tmp / f"{fmt}.safetensors"
            lora_files.write_lora(path, micro_models(), fmt, rank=2, alpha=alpha, dtype=dtype)
            out.append(b"\x00" + path.read_bytes())
        buf = io.BytesIO()
        torch.save(load_file(tmp / "kohya.safetensors"), buf)
        out.append(b"\x01" + buf.getvalue())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _mutate_lora(data: bytes, rng: random.Random) -> bytes:
    if not data or rng.random() < 0.03:
        return bytes([rng.randrange(2)]) + data[1:]
    head, rest = data[:1], data[1:]
    if head[0] % 2 == 0:
        return head + mutate.mutate_safetensors(rest, rng)
    return head + mutate.mutate_torch_zip(rest, rng)


@target(
    name="lora",
    doc="LoRA files (.safetensors through the numpy reader, .pt through weights_only): kohya "
    "and PEFT key sets, alphas and adapter metadata, shapes, resolved onto a model and merged",
    seeds=_lora_seeds,
    mutate=_mutate_lora,
    modules=("sd_deploy.engine_dir.lora", "sd_deploy.models.lora"),
    max_len=1 << 18,
)
def run_lora(data: bytes, work: Path) -> Any:
    import numpy as np

    from sd_deploy.engine_dir.lora import merged_deltas, resolve
    from sd_deploy.models.lora import load_lora

    suffix = (".safetensors", ".pt")[data[0] % 2] if data else ".safetensors"
    path = work / f"style{suffix}"
    path.write_bytes(data[1:])
    lora = load_lora(path)
    table = lora_table()
    deltas = merged_deltas(resolve([(lora, 0.7)], table), table)
    for (component, name), delta in deltas.items():
        if not np.isfinite(delta).all():
            raise AssertionError(f"LoRA gave a non-finite delta for {component} {name}")


# ------------------------------------------------------------- ONNX initializer records


def _onnx_initializer_seeds() -> list[bytes]:
    """A graph with external fp32/fp16 weights (packed and long dims) and an inline one."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = {
        "w": np.ones((64, 48), np.float32),
        "f": np.ones((8, 4, 3, 3), np.float16),
        "t": np.ones(3, np.float32),
    }
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 48])
    inits = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y],
                              initializer=inits)  # fmt: skip
    model = helper.make_model(graph)
    for init in model.graph.initializer[:2]:
        onnx.external_data_helper.set_external_data(init, "model.onnx_data", 0, init.ByteSize())
        init.ClearField("raw_data")
    return [model.SerializeToString()]


@target(
    name="onnx-initializers",
    doc="the runtime's protobuf reader of a graph's external-initializer records (run-time "
    "LoRA sessions from ONNX Runtime's optimized-graph cache): names, dims, types, locations",
    seeds=_onnx_initializer_seeds,
    mutate=mutate.mutate_bytes,
    modules=("sd_deploy.runtime.backends.onnx_initializers",),
    allowed=lambda: (ValueError,),
)
def run_onnx_initializers(data: bytes, work: Path) -> Any:
    from sd_deploy.runtime.backends.onnx_initializers import external_initializers

    path = work / "model.onnx"
    path.write_bytes(data)
    external_initializers(path)  # records or a ValueError; never another exception or a hang


# ---------------------------------------------------------------------- Triton requests


class FakeTensor:
    def __init__(self, name: str, array: Any) -> None:
        self.name, self.array = name, array

    def as_numpy(self) -> Any:
        return self.array


class FakeRequest:
    def __init__(self, inputs: dict[str, Any], cancelled: bool = False) -> None:
        self.inputs, self.cancelled = inputs, cancelled

    def is_cancelled(self) -> bool:
        return self.cancelled


class FakeTritonError:
    INVALID_ARG, INTERNAL, CANCELLED, UNAVAILABLE = "INVALID_ARG", "INTERNAL", "CANCELLED", "U"

    def __init__(self, message: str, code: Any = None) -> None:
        self.message, self.code = message, code


class FakeResponse:
    def __init__(self, output_tensors: Any = None, error: Any = None) -> None:
        self.output_tensors, self.error = output_tensors, error


class FakePbUtils:
    """What TritonPythonModel.execute uses of triton_python_backend_utils."""

    TritonError = FakeTritonError
    InferenceResponse = FakeResponse

    @staticmethod
    def Tensor(name: str, array: Any) -> FakeTensor:  # noqa: N802 - Triton's name
        return FakeTensor(name, array)

    @staticmethod
    def get_input_tensor_by_name(request: FakeRequest, name: str) -> FakeTensor | None:
        array = request.inputs.get(name)
        return None if array is None else FakeTensor(name, array)


class NoGraphPipeline:
    """The seed pipeline's validate; generate_many validates again and returns black images
    with the real parameters, instead of running graphs (the target is request decoding)."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline

    def validate(self, request: Any) -> Any:
        return self.pipeline.validate(request)

    def generate_many(self, requests: Any, progress: Any = None, cancel: Any = None) -> Any:
        import numpy as np

        from sd_deploy.runtime import GenerationResult, ImageParameters

        results = []
        for request in requests:
            r = self.pipeline.validate(request)
            params = ImageParameters(
                prompt=r.prompt, negative_prompt=r.negative_prompt, seed=r.seed, steps=r.steps,
                sampler=r.sampler, guidance=r.guidance, width=r.width, height=r.height,
                strength=r.strength, model="fuzz", backend="none",
            )  # fmt: skip
            images = np.zeros((r.batch, r.height, r.width, 3), np.uint8)
            results.append(GenerationResult(images, [params] * r.batch, {}))
        return results


TRITON_DTYPES = {"bytes": object, "int64": "int64", "int32": "int32", "float32": "float32",
                 "float64": "float64", "bool": "bool", "uint8": "uint8"}  # fmt: skip
MAX_REQUEST_ELEMENTS = 1 << 16


def _triton_array(spec: Any) -> Any:
    """{"dtype", "shape", "data"} -> a numpy array as the Python backend hands it over."""
    import numpy as np

    if not isinstance(spec, dict):
        return None
    dtype = TRITON_DTYPES.get(str(spec.get("dtype")), object)
    shape = spec.get("shape", [1, 1])
    if not isinstance(shape, list) or not all(isinstance(d, int) and 0 <= d for d in shape):
        return None
    count = 1
    for d in shape[:6]:
        count *= d
    if count > MAX_REQUEST_ELEMENTS or len(shape) > 6:
        return None
    data = spec.get("data", [])
    data = data if isinstance(data, list) and data else [data]
    try:  # a client can send any values of these dtypes; numpy's refusals are not findings
        if dtype is object:
            items = [d.encode("utf-8", "surrogatepass") if isinstance(d, str) else d for d in data]
            flat = np.empty(count, dtype=object)
            for i in range(count):
                flat[i] = items[i % len(items)]
            return flat.reshape(shape)
        values = np.array([data[i % len(data)] for i in range(count)]).astype(dtype)
        return values.reshape(shape)
    except Exception:
        return None


def _triton_seeds() -> list[bytes]:
    def text(*values: str) -> dict:
        return {"dtype": "bytes", "shape": [len(values), 1], "data": list(values)}

    def num(dtype: str, *values: float) -> dict:
        return {"dtype": dtype, "shape": [len(values), 1], "data": list(values)}

    docs = [
        {"batched": True, "requests": [{"inputs": {"prompt": text("a red circle")}}]},
        {"batched": True, "requests": [
            {"inputs": {"prompt": text("a", "b"), "negative_prompt": text("x", "y"),
                        "seed": num("int64", 1, 2), "steps": num("int32", 2, 3),
                        "guidance": num("float32", 7.5, 1.0), "width": num("int32", 64, 64),
                        "height": num("int32", 64, 64), "sampler": text("euler_a", "")}},
            {"inputs": {"prompt": text("(red:1.2) BREAK circle")}, "cancelled": True},
        ]},
        {"batched": False, "requests": [
            {"inputs": {"prompt": {"dtype": "bytes", "shape": [1], "data": ["one"]},
                        "seed": {"dtype": "int64", "shape": [1], "data": [5]}}},
        ]},
    ]  # fmt: skip
    return [json.dumps(d).encode() for d in docs]


@functools.cache
def triton_model() -> Any:
    from sd_deploy.serving.triton_model import PipelineModel, TritonPythonModel

    model = TritonPythonModel()
    model.pb = FakePbUtils
    inner = PipelineModel.__new__(PipelineModel)
    inner.pipeline = NoGraphPipeline(seed_pipeline())
    inner.max_prompt_chars = 4096
    inner.batched = True
    inner.max_rows = 8  # sd-triton export's max_batch_size for an engine dir of batch 1..8
    model.model = inner
    return model


@target(
    name="triton",
    doc="the Triton model's request decoding: TritonPythonModel.execute over fake "
    "pb_utils requests (missing, extra, wrong-typed, oversized, mis-shaped tensors), in-process, "
    "graphs not run; every request gets an image or an error response, never INTERNAL",
    seeds=_triton_seeds,
    mutate=mutate.mutate_json,
    modules=("sd_deploy.serving.triton_model",),
)
def run_triton(data: bytes, work: Path) -> Any:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("requests"), list):
        return None
    requests = []
    for item in doc["requests"][:8]:
        if not isinstance(item, dict) or not isinstance(item.get("inputs"), dict):
            continue
        inputs = {}
        for name, spec in list(item["inputs"].items())[:12]:
            array = _triton_array(spec)
            if array is not None:
                inputs[str(name)] = array
        requests.append(FakeRequest(inputs, bool(item.get("cancelled"))))
    model = triton_model()
    model.model.batched = bool(doc.get("batched", True))
    responses = model.execute(requests)
    if len(responses) != len(requests):
        raise AssertionError(f"{len(requests)} requests got {len(responses)} responses")
    for response in responses:
        if response.error is not None:
            message = response.error.message
            if message.startswith("INTERNAL") or "\n" in message:
                raise AssertionError(f"error response {message[:300]!r}")
        elif not response.output_tensors:
            raise AssertionError("a response with neither outputs nor an error")
