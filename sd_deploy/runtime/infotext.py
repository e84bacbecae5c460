"""Generation parameters as AUTOMATIC1111 writes them (the PNG "parameters" text), and back.

The format is that of stable-diffusion-webui v1.6.0 (`create_infotext`): the prompt, then
`Negative prompt: ...` when there is one, then one line of `Key: value` items joined by
", " in A1111's order -- Steps, Sampler, CFG scale, Seed, Size, Model hash, Model,
Denoising strength, Clip skip, then extras (Lora hashes, Emphasis). Samplers carry their
A1111 display names, the schedule folded in (`DPM++ 2M Karras`; v1.9+ writes `Sampler:
DPM++ 2M, Schedule type: Karras`, which `parse_infotext` reads too). A value holding a comma,
colon or newline is written as a JSON string, as A1111 does. Numbers are written the way
A1111's web UI writes them: a whole CFG scale as `7`, others as Python prints them (`7.5`).

`Model hash` is A1111's short hash of a checkpoint, the first 10 hex digits of its sha256;
`Model` the checkpoint's file name without extension; LoRA hashes the first 12 hex digits.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from sd_deploy.errors import RequestError

__all__ = [
    "A1111_VERSION",
    "SAMPLER_DISPLAY_NAMES",
    "ParsedInfotext",
    "format_infotext",
    "generation_fields",
    "lora_hashes_value",
    "model_display_name",
    "model_short_hash",
    "parse_infotext",
    "quote_value",
    "sampler_display_name",
    "sampler_from_display",
]

A1111_VERSION = "v1.6.0"

# sd-run sampler -> A1111 v1.6.0 display name. ddpm and lcm have none in v1.6.0; they get the
# names later versions gave them (v1.8 "LCM", v1.9 "DDPM").
SAMPLER_DISPLAY_NAMES: dict[str, str] = {
    "ddim": "DDIM",
    "plms": "PLMS",
    "ddpm": "DDPM",
    "euler": "Euler",
    "euler_a": "Euler a",
    "lms": "LMS",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "unipc": "UniPC",
    "lcm": "LCM",
}
_FROM_DISPLAY = {v: k for k, v in SAMPLER_DISPLAY_NAMES.items()}
_SCHEDULE_SUFFIX = {"Karras": " Karras"}  # v1.9+ "Schedule type" values with a v1.6 name
_DEFAULT_SCHEDULES = ("", "Automatic", "Uniform")

# One `Key: value` item of the last line: a key of word characters, spaces, '-' and '/', then a
# JSON string or anything up to the next comma.
_KEY_VALUE = re.compile(r'\s*(?P<key>\w[\w \-/]+):\s*(?P<value>"(?:[^"\\]|\\.)+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_NEGATIVE = "Negative prompt:"


def sampler_display_name(name: str) -> str:
    """A1111's name of an sd-run sampler (`dpmpp_2m_karras` -> `DPM++ 2M Karras`)."""
    return SAMPLER_DISPLAY_NAMES.get(name, name)


def sampler_from_display(display: str, schedule_type: str | None = None) -> str | None:
    """The sd-run sampler of an A1111 sampler name (and v1.9+ schedule type); None if none."""
    display = display.strip()
    schedule = (schedule_type or "").strip()
    if schedule not in _DEFAULT_SCHEDULES:
        suffix = _SCHEDULE_SUFFIX.get(schedule)
        if suffix is None:
            return None
        display += suffix
    if display in _FROM_DISPLAY:
        return _FROM_DISPLAY[display]
    return display if display in SAMPLER_DISPLAY_NAMES else None


def model_short_hash(sha256: str | None) -> str | None:
    """A1111's `Model hash`: the first 10 hex digits of the checkpoint file's sha256."""
    if not sha256:
        return None
    return sha256.lower()[:10]


def model_display_name(source: str | None) -> str | None:
    """A1111's `Model`: the checkpoint's file name without its extension (None for a
    source that is no file, such as `preset:tiny:random-seed-0`)."""
    if not source or str(source).startswith("preset:"):
        return None
    path = PurePath(str(source).rstrip("/\\"))
    checkpoint = path.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
    return path.stem if checkpoint else path.name


def lora_hashes_value(hashes: Mapping[str, str]) -> str | None:
    """`Lora hashes` value: `name: <first 12 hex of sha256>, ...` (A1111's LoRA short hash)."""
    if not hashes:
        return None
    return ", ".join(f"{name}: {sha.lower()[:12]}" for name, sha in hashes.items())


def _number(value: float | int) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def quote_value(value: Any) -> str:
    """A1111's `quote`: a value holding ',', ':' or a newline becomes a JSON string."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def generation_fields(
    *,
    steps: int,
    sampler: str,
    guidance: float,
    seed: int,
    width: int,
    height: int,
    model_sha256: str | None = None,
    model: str | None = None,
    strength: float | None = None,
    clip_skip: int = 1,
    lora_hashes: Mapping[str, str] | None = None,
    emphasis: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str | None]:
    """The `Key: value` items of one image in A1111 v1.6.0's order (None = left out).

    `sampler` is an sd-run name; `strength` only for img2img; `clip_skip` 1 is not written
    (A1111 reads a missing Clip skip as 1); `emphasis=False` adds `Emphasis: None` (the name
    A1111 v1.8+ gives emphasis switched off); `extra` items go last."""
    fields: dict[str, str | None] = {
        "Steps": str(int(steps)),
        "Sampler": sampler_display_name(sampler),
        "CFG scale": _number(guidance),
        "Seed": str(int(seed)),
        "Size": f"{int(width)}x{int(height)}",
        "Model hash": model_short_hash(model_sha256),
        "Model": model,
        "Denoising strength": None if strength is None else _number(strength),
        "Clip skip": None if clip_skip <= 1 else str(int(clip_skip)),
        "Lora hashes": lora_hashes_value(lora_hashes or {}),
        "Emphasis": None if emphasis else "None",
    }
    for key, value in (extra or {}).items():
        fields[key] = None if value is None else str(value)
    return fields


def format_infotext(prompt: str, negative_prompt: str, fields: Mapping[str, Any]) -> str:
    """The whole "parameters" text: prompt, negative prompt line, then the items line."""
    items = ", ".join(
        key if key == value else f"{key}: {quote_value(value)}"
        for key, value in fields.items()
        if value is not None
    )
    negative = f"\n{_NEGATIVE} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{items}".strip()


def _shown(value: str, limit: int = 60) -> str:
    """A value from the image, quoted for a one-line message (shortened, newlines escaped)."""
    return repr(value if len(value) <= limit else value[: limit - 3] + "...")


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            decoded = json.loads(value)
        except ValueError:
            return value
        if isinstance(decoded, str):
            return decoded
    return value


@dataclass(frozen=True)
class ParsedInfotext:
    """An infotext read back: prompts and the raw items (`Size` kept as `WxH`)."""

    prompt: str
    negative_prompt: str
    params: dict[str, str] = field(default_factory=dict)

    def _int(self, key: str) -> int | None:
        value = self.params.get(key)
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            raise RequestError(f"infotext {key} {_shown(value)} is not an integer") from None

    def _float(self, key: str) -> float | None:
        value = self.params.get(key)
        if value is None:
            return None
        try:
            return float(value)
        except ValueError:
            raise RequestError(f"infotext {key} {_shown(value)} is not a number") from None

    @property
    def steps(self) -> int | None:
        return self._int("Steps")

    @property
    def seed(self) -> int | None:
        return self._int("Seed")

    @property
    def guidance(self) -> float | None:
        return self._float("CFG scale")

    @property
    def strength(self) -> float | None:
        return self._float("Denoising strength")

    @property
    def clip_skip(self) -> int:
        return self._int("Clip skip") or 1

    @property
    def emphasis(self) -> bool:
        return self.params.get("Emphasis", "Original") != "None"

    @property
    def size(self) -> tuple[int, int] | None:
        """(width, height)."""
        value = self.params.get("Size")
        if value is None:
            return None
        m = _SIZE.match(value)
        if m is None:
            raise RequestError(f"infotext Size {_shown(value)} is not WIDTHxHEIGHT")
        return int(m.group(1)), int(m.group(2))

    @property
    def sampler(self) -> str | None:
        """The sd-run sampler; RequestError if the image's sampler is not one of them."""
        display = self.params.get("Sampler")
        if display is None:
            return None
        name = sampler_from_display(display, self.params.get("Schedule type"))
        if name is None:
            schedule = self.params.get("Schedule type")
            shown = display if schedule is None else f"{display} ({schedule})"
            known = ", ".join(SAMPLER_DISPLAY_NAMES.values())
            raise RequestError(
                f"the image's sampler {_shown(shown)} is not one sd-run has ({known}); "
                "choose one with --sampler"
            )
        return name

    def request_fields(self, skip: Collection[str] = ()) -> dict[str, Any]:
        """`GenerationRequest` keyword arguments the infotext gives, except those in `skip`
        (what the caller sets itself; a skipped field is not even read, so an unknown
        sampler does not matter when the caller chooses one). `strength` is the image's
        Denoising strength: it only matters with an init image."""
        readers: dict[str, Any] = {
            "prompt": lambda: self.prompt,
            "negative_prompt": lambda: self.negative_prompt,
            "steps": lambda: self.steps,
            "sampler": lambda: self.sampler,
            "guidance": lambda: self.guidance,
            "seed": lambda: self.seed,
            "width": lambda: None if self.size is None else self.size[0],
            "height": lambda: None if self.size is None else self.size[1],
            "strength": lambda: self.strength,
            "clip_skip": lambda: self.clip_skip if "Clip skip" in self.params else None,
            "emphasis": lambda: False if not self.emphasis else None,
        }
        fields = {}
        for name, read in readers.items():
            if name in skip:
                continue
            value = read()
            if value is not None:
                fields[name] = value
        return fields


def parse_infotext(text: str) -> ParsedInfotext:
    """Read an A1111 "parameters" text (ours or A1111's), as A1111's own reader does.

    The last line holds the items when it has at least 3 `Key: value`; lines before it are
    the prompt until one starts with `Negative prompt:`, then the negative prompt. Each line
    is stripped, as A1111 does."""
    *lines, last = str(text).strip().split("\n")
    if len(_KEY_VALUE.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE):
            in_negative = True
            line = line[len(_NEGATIVE) :].strip()
        (negative if in_negative else prompt).append(line)
    params: dict[str, str] = {}
    for key, value in _KEY_VALUE.findall(last):
        params[key.strip()] = _unquote(value.strip())
    return ParsedInfotext("\n".join(prompt), "\n".join(negative), params)
