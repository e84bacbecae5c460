"""LoRA files in numpy: reading, key formats, scales, and the weight deltas they add.

numpy only (no torch, no safetensors package), so that the exporter and the runtime read
LoRA files with the same code.

Formats (`.safetensors`):

- kohya / A1111: `lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, optional
  `.alpha`; text encoder `lora_te_<module>` (`lora_te1_` / `lora_te2_` are SDXL's two
  encoders). `<module>` is a module path with dots flattened to underscores, in diffusers'
  names (kohya trains SD 1.x/2.x on diffusers modules) or in ldm names (sgm-style files).
  Linear layers and LoCon conv layers (k x k down, 1 x 1 up).
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight`, the older
  `<module>.lora.down.weight` / `.lora.up.weight`, attention-processor names
  (`attn1.processor.to_q_lora.down.weight`), `text_encoder.<module>...`; alphas from
  `<module>.alpha` keys or the `lora_adapter_metadata` diffusers writes.

A layer adds `scale * up @ down` to its module's weight, with `scale = alpha / rank *
user_scale` (alpha = rank when the file has none). Module names are resolved through a
`TargetTable` (flattened alias -> target weight and its shape), built from the PyTorch
modules at export time and stored in the engine dir for run-time switching.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sd_deploy.errors import CheckpointError

LORA_SUFFIXES = (".safetensors",)
# Beside each LoRA-ready component's graph: which initializer holds each target weight.
LORA_TARGETS_NAME = "lora_targets.json"
# The components a LoRA patches, so the ones `--lora-ready` keeps targets for.
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
COMPONENT_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
# Text feature width the UNet's cross-attention takes, and the family it means.
CONTEXT_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
TEXT_WIDTH_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL (second text encoder)"}


class LoraError(CheckpointError):
    """A LoRA file cannot be read or does not fit the model; one line naming the file."""


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA the user asked for: a file and its strength (`FILE[:SCALE]`)."""

    path: Path
    scale: float = 1.0

    @property
    def name(self) -> str:
        """The name A1111 shows in `<lora:name:scale>`: the file name without suffix."""
        return self.path.stem


def overflow_message(key: str) -> str:
    return f"LoRA layer {key[:80]} overflows float32 (up @ down too large)"


def parse_scale(text: str, what: str) -> float:
    shown = repr(text if len(text) <= 40 else text[:37] + "...")  # from a prompt: any length
    what = what if len(what) <= 80 else what[:77] + "..."
    try:
        value = float(text)
    except ValueError:
        raise LoraError(f"LoRA scale {shown} for {what} is not a number") from None
    if not np.isfinite(value):
        raise LoraError(f"LoRA scale {shown} for {what} is not a finite number")
    return value


def parse_lora_arg(text: str) -> LoraSpec:
    """`FILE[:SCALE]` -> LoraSpec. A Windows drive letter (`C:\\x.safetensors`) is not a scale."""
    path, sep, scale = text.rpartition(":")
    if sep and path and ("/" not in scale and "\\" not in scale) and scale:
        return LoraSpec(Path(path), parse_scale(scale, path))
    return LoraSpec(Path(text))


@dataclass
class LoraLayer:
    """One module's low-rank pair, as found in the file."""

    component: str  # "unet", "text_encoder", "text_encoder_2"
    module: str  # flattened module name (dots -> underscores), as the file spells it
    key: str  # the file's key prefix, for messages
    down: np.ndarray  # [rank, in] or [rank, in, kh, kw]
    up: np.ndarray  # [out, rank] or [out, rank, 1, 1]
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def scale(self, user_scale: float) -> float:
        alpha = self.rank if self.alpha is None else self.alpha
        return alpha / self.rank * user_scale

    def factors(self, user_scale: float) -> tuple[np.ndarray, np.ndarray, bool]:
        """(`scale * up` [out, rank], `down` [rank, in * kh * kw], whether `up @ down` may
        overflow float32), float32: the scale goes on the small factor, not the product."""
        down = np.asarray(self.down, dtype=np.float32).reshape(self.rank, -1)
        up = np.asarray(self.up, dtype=np.float32).reshape(self.up.shape[0], -1)
        scale = np.float32(self.scale(user_scale))
        if not np.isfinite(scale):  # an alpha of 1e39: finite in float64, not in float32
            raise LoraError(f"LoRA layer {self.key[:80]} has an alpha too large for float32")
        # float32 overflow is possible only above this bound; checking it is cheaper than
        # checking the product (weights of 1e30 in a file are finite and still garbage)
        bound = float(np.abs(up).max(initial=0)) * float(np.abs(down).max(initial=0))
        reach = bound * max(self.rank, 1) * max(abs(float(scale)), 1.0)  # up @ down, then scaled
        return up * scale, down, reach > 1e37

    def delta(
        self, shape: tuple[int, ...], user_scale: float, transpose: bool = False
    ) -> np.ndarray:
        """`scale * up @ down` shaped like the target weight, float32; with `transpose`, the
        2-D transpose of that (a Linear exported as MatMul keeps [in, out]), computed in that
        layout: a transposed view added to a weight costs a strided pass over it."""
        up, down, risky = self.factors(user_scale)
        product = down.T @ up.T if transpose else up @ down
        if risky and not np.isfinite(product).all():
            raise LoraError(overflow_message(self.key))
        return product.reshape(shape[::-1] if transpose else shape)  # transposed: 2-D only

    def shape_problem(self, shape: tuple[int, ...]) -> str | None:
        """Why this pair cannot be added to a weight of `shape`, or None."""
        out, fan_in = shape[0], int(np.prod(shape[1:]))
        d, u = self.down.shape, self.up.shape
        problem = None
        if self.down.ndim not in (2, 4) or self.up.ndim not in (2, 4):
            problem = f"down {list(d)} / up {list(u)} are neither linear nor conv"
        elif int(np.prod(u[1:])) != self.rank:
            problem = f"up {list(u)} does not have rank {self.rank} of down {list(d)}"
        elif u[0] != out or int(np.prod(d[1:])) != fan_in:
            problem = f"down {list(d)} / up {list(u)}, the weight is {list(shape)}"
        elif self.down.ndim == 4 and len(shape) == 4 and tuple(d[2:]) != tuple(shape[2:]):
            problem = f"down kernel {list(d[2:])}, the weight's is {list(shape[2:])}"
        return problem


@dataclass
class LoraFile:
    """A LoRA file's layers and provenance (for the manifest and PNG parameters)."""

    path: Path
    sha256: str
    format: str  # "kohya" or "diffusers"
    layers: list[LoraLayer] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.stem


# --------------------------------------------------------------------------- safetensors

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_, "BF16": np.uint16,
}  # fmt: skip


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def addnet_hash(path: Path) -> str:
    """sha256 of a safetensors file's tensor data (after its header): A1111's LoRA hash."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor of a `.safetensors` file as numpy (bf16 -> float32), and its metadata.

    A truncated or malformed file is a LoraError naming it, never a numpy traceback.
    """
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise LoraError(f"LoRA {path} is truncated or not a safetensors file ({len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise LoraError(f"LoRA {path} is truncated or not a safetensors file (bad header size)")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (UnicodeDecodeError, ValueError) as e:
        raise LoraError(f"LoRA {path} is not a safetensors file (header: {e})") from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise LoraError(f"LoRA {path} is not a safetensors file (__metadata__ is not an object)")
    body = memoryview(data)[8 + n :]
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        key = name if len(name) <= 80 else name[:77] + "..."  # for messages
        try:
            dtype = _DTYPES[info["dtype"]]
            start, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(x) for x in info["shape"])
        except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: Infinity
            raise LoraError(f"LoRA {path}: tensor {key} has a malformed header entry") from None
        if end > len(body) or start > end:
            raise LoraError(
                f"LoRA {path} is truncated: tensor {key} ends at byte {end} of a "
                f"{len(body)}-byte data section"
            )
        count = int(np.prod(shape)) if shape else 1
        if (end - start) != count * np.dtype(dtype).itemsize:
            raise LoraError(
                f"LoRA {path}: tensor {key} size does not match its shape {str(shape)[:60]}"
            )
        array: np.ndarray = np.frombuffer(body[start:end], dtype=dtype).reshape(shape)
        if info["dtype"] == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = array
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray], metadata=None) -> None:
    """A minimal safetensors writer (float32/float16/int arrays), for tests and tools."""
    names = {v: k for k, v in _DTYPES.items() if k != "BF16"}
    header: dict[str, object] = {"__metadata__": dict(metadata or {})}
    chunks, offset = [], 0
    for key, array in tensors.items():
        array = np.ascontiguousarray(array)
        raw = array.tobytes()
        header[key] = {
            "dtype": names[array.dtype.type],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for raw in chunks:
            f.write(raw)


# --------------------------------------------------------------------------- key formats

_KOHYA = re.compile(r"(lora_unet_|lora_te1_|lora_te2_|lora_te_)(.+?)\.(lora_down|lora_up|alpha)")
_DIFFUSERS_PAIR = re.compile(
    r"(.+?)\.(lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up"
    r"|(?:to_q|to_k|to_v|to_out)_lora\.down|(?:to_q|to_k|to_v|to_out)_lora\.up)"
    r"(?:\.default)?\.weight"
)
_UNSUPPORTED = {
    "hada_w1": "LoHa (LyCORIS)",
    "lokr_w1": "LoKr (LyCORIS)",
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
    "lora_mid": "LoCon with a Tucker middle (lora_mid)",
    "oft_": "OFT",
    ".diff": "full-weight diffs",
}
_PROCESSOR = {
    "to_q_lora": "to_q",
    "to_k_lora": "to_k",
    "to_v_lora": "to_v",
    "to_out_lora": "to_out.0",
}
_TEXT_PROCESSOR = {
    "to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj",
}  # fmt: skip


def flatten(module: str) -> str:
    return module.replace(".", "_")


def _diffusers_component(name: str) -> tuple[str, str]:
    for prefix in ("base_model.model.",):
        name = name.removeprefix(prefix)
    for comp in ("text_encoder_2", "text_encoder", "unet"):
        if name.startswith(comp + "."):
            return comp, name[len(comp) + 1 :]
    return "", name  # unprefixed: resolved against every component's table


def _diffusers_module(component: str, module: str, kind: str) -> str:
    """Module path of a diffusers-format pair, without processor / lora wrappers."""
    module = module.replace(".processor", "")
    head = kind.split(".")[0]
    if head in _PROCESSOR:
        table = _TEXT_PROCESSOR if component.startswith("text_encoder") else _PROCESSOR
        module = f"{module}.{table[head]}"
    return module


def _alphas_from_metadata(metadata: Mapping[str, str]) -> dict[str, dict]:
    """diffusers' `lora_adapter_metadata`: {"unet": LoraConfig dict, "text_encoder": ...}."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    configs: dict[str, dict] = {}
    for key, value in data.items() if isinstance(data, dict) else ():
        comp, _, field_name = key.partition(".")
        if field_name:
            configs.setdefault(comp, {})[field_name] = value
        elif isinstance(value, dict):
            configs[key] = value
    return configs


def parse_lora_tensors(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str], path: Path
) -> tuple[str, list[LoraLayer]]:
    """Pair a LoRA file's tensors into layers; returns (format, layers)."""
    for key, value in tensors.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise LoraError(f"LoRA {path}: tensor {key} holds NaN or infinite values")
    for key in tensors:
        for marker, what in _UNSUPPORTED.items():
            if marker in key:
                raise LoraError(
                    f"LoRA {path} is a {what} network ({key}); only plain LoRA / LoCon "
                    "(lora_down/lora_up, lora_A/lora_B) is supported"
                )
    if any(k.startswith(tuple(COMPONENT_PREFIXES)) for k in tensors):
        return "kohya", _parse_kohya(tensors, path)
    return "diffusers", _parse_diffusers(tensors, metadata, path)


def _parse_kohya(tensors: Mapping[str, np.ndarray], path: Path) -> list[LoraLayer]:
    groups: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    stray = []
    for key, value in tensors.items():
        m = _KOHYA.match(key)
        if not m or key[m.end() :] not in ("", ".weight"):
            stray.append(key)
            continue
        groups.setdefault((m[1], m[2]), {})[m[3]] = value
    if stray:
        raise LoraError(f"LoRA {path}: keys in no known LoRA format: {_first(stray)}")
    layers = []
    for (prefix, module), parts in groups.items():
        key = prefix + module
        if "lora_down" not in parts or "lora_up" not in parts:
            missing = "lora_up" if "lora_down" in parts else "lora_down"
            raise LoraError(f"LoRA {path}: {key} has no {missing}.weight")
        alpha = parts.get("alpha")
        layers.append(
            LoraLayer(
                COMPONENT_PREFIXES[prefix], module, key, parts["lora_down"], parts["lora_up"],
                None if alpha is None else float(np.asarray(alpha, np.float64).reshape(-1)[0]),
            )
        )  # fmt: skip
    return layers


def _parse_diffusers(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str], path: Path
) -> list[LoraLayer]:
    pairs: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    file_keys: dict[tuple[str, str], str] = {}
    alphas: dict[str, float] = {}
    stray = []
    for key, value in tensors.items():
        if key.endswith(".alpha"):
            alphas[key.removesuffix(".alpha")] = float(np.asarray(value).reshape(-1)[0])
            continue
        m = _DIFFUSERS_PAIR.fullmatch(key)
        if not m:
            stray.append(key)
            continue
        component, module = _diffusers_component(m[1])
        module = _diffusers_module(component, module, m[2])
        side = "down" if m[2].endswith(("lora_A", "down")) else "up"
        pairs.setdefault((component, module), {})[side] = value
        file_keys.setdefault((component, module), m[1])
    if stray:
        raise LoraError(f"LoRA {path}: keys in no known LoRA format: {_first(stray)}")
    if not pairs:
        raise LoraError(f"LoRA {path} has no LoRA weights")
    configs = _alphas_from_metadata(metadata)
    layers = []
    for (component, module), parts in pairs.items():
        key = file_keys[(component, module)]
        if "down" not in parts or "up" not in parts:
            raise LoraError(f"LoRA {path}: {key} has only one of lora_A / lora_B")
        alpha = None
        for name in (f"{component}.{module}" if component else module, key):
            if name in alphas:
                alpha = alphas[name]
        config = configs.get(component or "unet")
        if alpha is None and config:
            alpha = _config_alpha(config, module, int(parts["down"].shape[0]))
        layers.append(LoraLayer(component, flatten(module), key, parts["down"], parts["up"], alpha))
    return layers


def _config_alpha(config: Mapping, module: str, rank: int) -> float | None:
    """lora_alpha from a PEFT LoraConfig dict (with alpha_pattern), None if it has none."""
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern) or re.search(pattern, module):
            return float(value)
    if config.get("lora_alpha") is None:
        return None
    return float(config["lora_alpha"])


def _first(items: Iterable[str], n: int = 3) -> str:
    items = list(items)
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def read_lora(path: str | Path) -> LoraFile:
    """Read and pair a `.safetensors` LoRA file (pickles are for `models.lora.load_lora`)."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraError(
            f"LoRA {path} is a pickle file; only .safetensors LoRAs can be applied here "
            "(convert it, or merge it at export with sd-export --lora)"
        )
    tensors, metadata = read_safetensors(path)
    return lora_from_tensors(tensors, metadata, path)


def lora_from_tensors(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str], path: Path
) -> LoraFile:
    fmt, layers = parse_lora_tensors(tensors, metadata, path)
    return LoraFile(path=path, sha256=sha256_file(path), format=fmt, layers=layers)


# --------------------------------------------------------------------------- targets


@dataclass
class TargetTable:
    """What LoRA layers can land on: per component, flattened aliases -> weight name + shape.

    `aliases[component][flat_name] = target`, `shapes[component][target] = shape`.
    `context_dim` / `text_width` let a mismatch name the family the LoRA was made for.
    """

    family: str
    aliases: dict[str, dict[str, str]] = field(default_factory=dict)
    shapes: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)
    context_dim: int | None = None
    text_width: int | None = None

    def add(self, component: str, target: str, shape: tuple[int, ...], names: Iterable[str]):
        self.shapes.setdefault(component, {})[target] = tuple(int(s) for s in shape)
        table = self.aliases.setdefault(component, {})
        for name in names:
            flat = flatten(name)
            other = table.get(flat)
            if other is not None and other != target:
                raise AssertionError(f"LoRA alias {flat} names both {other} and {target}")
            table[flat] = target

    def to_json(self) -> dict:
        return {
            "family": self.family,
            "context_dim": self.context_dim,
            "text_width": self.text_width,
            "aliases": self.aliases,
            "shapes": {c: {t: list(s) for t, s in v.items()} for c, v in self.shapes.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping) -> TargetTable:
        return cls(
            family=str(data["family"]),
            aliases={c: dict(v) for c, v in data["aliases"].items()},
            shapes={c: {t: tuple(s) for t, s in v.items()} for c, v in data["shapes"].items()},
            context_dim=data.get("context_dim"),
            text_width=data.get("text_width"),
        )


@dataclass(frozen=True)
class ResolvedLayer:
    component: str
    target: str
    layer: LoraLayer
    user_scale: float
    source: str  # file name, for messages


def resolve(loras: Iterable[tuple[LoraFile, float]], table: TargetTable) -> list[ResolvedLayer]:
    """Match every layer of every LoRA onto a target weight, or a one-line LoraError.

    Checks, in order: another family's LoRA (SDXL's lora_te1_/lora_te2_ keys, or
    cross-attention / text widths of another family), layers that match no module
    (the first few named), then pairs whose shapes do not fit their weight.
    """
    resolved = []
    for lora, scale in loras:
        _check_family(lora, table)
        unmatched, mismatched = [], []
        for layer in lora.layers:
            comps = [layer.component] if layer.component else list(table.aliases)
            found = None
            for comp in comps:
                target = table.aliases.get(comp, {}).get(layer.module)
                if target is not None:
                    found = (comp, target)
                    break
            if found is None:
                unmatched.append(layer.key)
                continue
            problem = layer.shape_problem(table.shapes[found[0]][found[1]])
            if problem:
                mismatched.append(f"{layer.key} ({problem})")
                continue
            resolved.append(ResolvedLayer(found[0], found[1], layer, scale, lora.path.name))
        if unmatched:
            raise LoraError(
                f"LoRA {lora.path}: {len(unmatched)} of {len(lora.layers)} layers match no "
                f"module of this {table.family} model: {_first(unmatched)}"
            )
        if mismatched:
            raise LoraError(
                f"LoRA {lora.path}: {len(mismatched)} layers do not fit this {table.family} "
                f"model: {_first(mismatched, 2)}"
            )
    return resolved


def _check_family(lora: LoraFile, table: TargetTable) -> None:
    keys = [layer.key for layer in lora.layers]
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in keys) or any(
        layer.component == "text_encoder_2" for layer in lora.layers
    ):
        if "text_encoder_2" not in table.aliases:
            raise LoraError(
                f"LoRA {lora.path} is an SDXL LoRA (two text encoders: lora_te1_/lora_te2_ "
                f"keys); this model is {table.family}"
            )
    for layer in lora.layers:
        module = layer.module
        if (
            table.context_dim
            and layer.component in ("unet", "")
            and re.search(r"attn2_to_[kv]$", module)
        ):
            width = int(np.prod(layer.down.shape[1:]))
            if width != table.context_dim:
                made = CONTEXT_FAMILIES.get(width, f"a model with {width}-wide text features")
                raise LoraError(
                    f"LoRA {lora.path} was made for {made} (its cross-attention takes "
                    f"{width}-wide text features, this {table.family} model's take "
                    f"{table.context_dim})"
                )
        if (
            table.text_width
            and layer.component == "text_encoder"
            and re.search(r"self_attn_q_proj$", module)
        ):
            width = int(np.prod(layer.down.shape[1:]))
            if width != table.text_width:
                made = TEXT_WIDTH_FAMILIES.get(width, f"a {width}-wide text encoder")
                raise LoraError(
                    f"LoRA {lora.path} was made for {made} (its text encoder is {width} wide, "
                    f"this {table.family} model's is {table.text_width})"
                )


def merged_deltas(
    resolved: Iterable[ResolvedLayer], table: TargetTable
) -> dict[tuple[str, str], np.ndarray]:
    """(component, target) -> the summed float32 delta of every layer landing there."""
    deltas: dict[tuple[str, str], np.ndarray] = {}
    for r in resolved:
        shape = table.shapes[r.component][r.target]
        delta = r.layer.delta(shape, r.user_scale)
        key = (r.component, r.target)
        deltas[key] = deltas[key] + delta if key in deltas else delta
    return deltas
