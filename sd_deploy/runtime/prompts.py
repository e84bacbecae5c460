"""Prompts as SD users write them: emphasis, BREAK, long prompts in chunks of 75 tokens.

The rules are those of AUTOMATIC1111's stable-diffusion-webui v1.6.0 (the version whose
infotext `sd_deploy.runtime.infotext` writes), implemented here from its documented behaviour:

Emphasis (`parse_emphasis`):
    `(text)` multiplies the weight of `text` by 1.1, `[text]` by 1/1.1, `(text:1.3)` by 1.3
    (spaces allowed around the number: `( text : 1.3 )`); nesting multiplies; brackets still
    open at the end of the prompt close there (all round ones, then all square ones); a `)` or
    `]` with nothing to close, and a `:` that is not `:number)`, are plain text; `\\(` `\\)`
    `\\[` `\\]` `\\\\` are the literal characters and any other backslash is dropped. The word
    `BREAK` (upper case, standing alone) becomes the marker `("BREAK", -1.0)`. Runs of equal
    weight are merged. A weight that looks like a number but is not one (`(a:1.2.3)`) is an
    error, where A1111 raises ValueError.

Chunking (`chunk_prompt`):
    the text of each weighted piece is tokenized on its own; tokens fill chunks of 75. When a
    chunk is full and the next token is not a comma, and a comma lies within the chunk's last
    20 tokens, the tokens after that comma move to the next chunk. A `("BREAK", -1.0)` starts
    a new chunk (a BREAK inside brackets has another weight and is text, as in A1111). Each
    chunk is BOS + 75 tokens (padded with EOS) + EOS = 77 ids; with a tokenizer whose pad
    token is not EOS (SD 2.x) every id after the chunk's first EOS becomes the pad id. Every
    chunk position has a weight; BOS, EOS and padding weigh 1.

Weighting (`apply_weights`), A1111's default "Original" emphasis:
    each token's text-encoder output is multiplied by its weight, then the chunk is rescaled
    so the mean over all its values is what it was. A1111 takes that mean over the whole
    batch of distinct prompts of a chunk; here it is per prompt, so an image never depends on
    the other prompts it was batched with (the same when a batch has one prompt).

Positive and negative prompts are padded to the same number of chunks with empty-prompt
chunks, which is A1111's "Pad prompt/negative prompt to be same length" option.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from sd_deploy.errors import RequestError

log = logging.getLogger("sd_deploy")

__all__ = [
    "BREAK",
    "CHUNK_LENGTH",
    "COMMA_BACKTRACK",
    "PromptChunks",
    "PromptEncoder",
    "apply_weights",
    "chunk_prompt",
    "empty_chunk",
    "encode_chunks",
    "pad_chunks",
    "parse_emphasis",
]

BREAK: tuple[str, float] = ("BREAK", -1.0)
CHUNK_LENGTH = 75  # text tokens per chunk; with BOS and EOS a chunk is the encoder's 77
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default

_ROUND = 1.1
_SQUARE = 1 / 1.1

# One lexical item per match, tried in this order:
#   \( \) \[ \] \\  escaped literals (the char after the backslash)
#   \               a lone backslash, dropped
#   ( [             open a bracket
#   :number)        close the innermost round bracket with that weight
#   ) ]             close a bracket
#   text            a run of anything but backslash, brackets and colon
#   :               a colon that is not a weight
_ITEM = re.compile(
    r"""
    (?P<escaped>\\[()\[\]\\])
  | (?P<backslash>\\)
  | (?P<open>[(\[])
  | :\s*(?P<weight>[+-]?[.\d]+)\s*\)
  | (?P<close>[)\]])
  | (?P<text>[^\\()\[\]:]+|:)
    """,
    re.VERBOSE,
)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)


# Larger weights overflow the float32 context (and mean nothing): refused, not drawn as NaN.
MAX_WEIGHT = 1e6


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """A1111's `parse_prompt_attention`: `text` -> [(piece, weight), ...] (see module doc).

    >>> parse_emphasis("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a str, got {type(text).__name__}")
    pieces: list[list] = []  # [text, weight], weights multiplied in place
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in _ITEM.finditer(text):
        item = m.group(0)
        if m.group("escaped") is not None:
            pieces.append([item[1], 1.0])
        elif m.group("backslash") is not None:
            pieces.append(["", 1.0])
        elif item == "(":
            open_round.append(len(pieces))
        elif item == "[":
            open_square.append(len(pieces))
        elif m.group("weight") is not None and open_round:
            number = m.group("weight")
            try:
                factor = float(number)
            except ValueError:
                raise RequestError(
                    f"prompt weight {number!r} in {item!r} is not a number"
                ) from None
            scale_from(open_round.pop(), factor)
        elif item == ")" and open_round:
            scale_from(open_round.pop(), _ROUND)
        elif item == "]" and open_square:
            scale_from(open_square.pop(), _SQUARE)
        else:
            for i, part in enumerate(_BREAK_SPLIT.split(item)):
                if i:
                    pieces.append(list(BREAK))
                pieces.append([part, 1.0])
    for start in open_round:
        scale_from(start, _ROUND)
    for start in open_square:
        scale_from(start, _SQUARE)
    if not pieces:
        return [("", 1.0)]
    for text_piece, weight in pieces:
        if not abs(weight) <= MAX_WEIGHT:  # e.g. 8000 unclosed "(": 1.1 ** 8000 (or NaN)
            raise RequestError(
                f"prompt emphasis gives {_shorten(text_piece or '(empty)', 30)!r} the weight "
                f"{weight}: too many nested brackets or too large a (word:weight)"
            )
    merged: list[list] = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, float(w)) for t, w in merged]


@dataclass(frozen=True)
class PromptChunks:
    """One prompt as the text encoder sees it: `ids` int32 and `weights` float32, both
    [chunks, CHUNK_LENGTH + 2]. `token_count` is the number of text tokens (A1111's count)."""

    ids: np.ndarray
    weights: np.ndarray
    token_count: int

    @property
    def num_chunks(self) -> int:
        return int(self.ids.shape[0])

    @property
    def weighted(self) -> bool:
        """Whether any weight differs from 1 (otherwise weighting changes nothing)."""
        return bool((self.weights != 1.0).any())

    def truncated(self, max_chunks: int) -> PromptChunks:
        """The first `max_chunks` chunks (all of them when there are fewer)."""
        if self.num_chunks <= max_chunks:
            return self
        kept = max_chunks * CHUNK_LENGTH
        return PromptChunks(
            self.ids[:max_chunks], self.weights[:max_chunks], min(self.token_count, kept)
        )


def _finish_chunk(
    tokens: list[int], weights: list[float], bos: int, eos: int, pad: int
) -> tuple[list[int], list[float]]:
    fill = CHUNK_LENGTH - len(tokens)
    ids = [bos, *tokens, *([eos] * fill), eos]
    mults = [1.0, *weights, *([1.0] * fill), 1.0]
    if pad != eos:
        first_eos = ids.index(eos)
        ids[first_eos + 1 :] = [pad] * (len(ids) - first_eos - 1)
    return ids, mults


def chunk_prompt(
    parsed: Sequence[tuple[str, float]],
    tokenize: Callable[[str], Sequence[int]],
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    comma_id: int | None,
    backtrack: int = COMMA_BACKTRACK,
) -> PromptChunks:
    """Split weighted pieces (`parse_emphasis` output) into 77-id chunks, A1111's way.

    `tokenize` gives the text token ids of one piece (no BOS/EOS). See the module doc."""
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1
    count = 0

    def next_chunk(final: bool = False) -> None:
        nonlocal tokens, weights, last_comma, count
        count += len(tokens) if final else CHUNK_LENGTH
        chunks.append(_finish_chunk(tokens, weights, bos_id, eos_id, pad_id))
        tokens, weights, last_comma = [], [], -1

    for text, weight in parsed:
        if text == BREAK[0] and weight == BREAK[1]:
            next_chunk()
            continue
        for token in tokenize(text):
            if comma_id is not None and token == comma_id:
                last_comma = len(tokens)
            elif (
                backtrack > 0
                and len(tokens) == CHUNK_LENGTH
                and last_comma != -1
                and len(tokens) - last_comma <= backtrack
            ):
                cut = last_comma + 1
                moved_tokens, moved_weights = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                next_chunk()
                tokens, weights = moved_tokens, moved_weights
            if len(tokens) == CHUNK_LENGTH:
                next_chunk()
            tokens.append(int(token))
            weights.append(float(weight))
    if tokens or not chunks:
        next_chunk(final=True)
    ids = np.array([c[0] for c in chunks], dtype=np.int32)
    mults = np.array([c[1] for c in chunks], dtype=np.float32)
    return PromptChunks(ids, mults, count)


def empty_chunk(bos_id: int, eos_id: int, pad_id: int) -> PromptChunks:
    """The one chunk of the empty prompt (what shorter prompts are padded with)."""
    ids, mults = _finish_chunk([], [], bos_id, eos_id, pad_id)
    return PromptChunks(np.array([ids], np.int32), np.array([mults], np.float32), 0)


def pad_chunks(prompt: PromptChunks, num_chunks: int, empty: PromptChunks) -> PromptChunks:
    """`prompt` followed by empty-prompt chunks up to `num_chunks` chunks."""
    extra = num_chunks - prompt.num_chunks
    if extra <= 0:
        return prompt
    return PromptChunks(
        np.concatenate([prompt.ids, np.repeat(empty.ids, extra, axis=0)]),
        np.concatenate([prompt.weights, np.repeat(empty.weights, extra, axis=0)]),
        prompt.token_count,
    )


def apply_weights(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A1111's "Original" emphasis on one chunk per row.

    `hidden` [rows, 77, dim] text-encoder output, `weights` [rows, 77]. Each token's vector is
    multiplied by its weight, then each row is scaled back to its own former mean. Rows whose
    weights are all 1 come back unchanged (bit for bit)."""
    hidden = np.asarray(hidden)
    out = hidden.astype(np.float32, copy=True)
    w = np.asarray(weights, np.float32)
    for row in range(out.shape[0]):
        if (w[row] == 1.0).all():
            continue
        before = out[row].mean(dtype=np.float32)
        out[row] *= w[row][:, None]
        after = out[row].mean(dtype=np.float32)
        out[row] *= np.float32(before / after)
    return out.astype(hidden.dtype, copy=False)


def encode_chunks(
    prompts: Sequence[PromptChunks],
    encode: Callable[[np.ndarray], np.ndarray],
    *,
    emphasis: bool = True,
) -> np.ndarray:
    """Text-encoder context for prompts of equal chunk count: [rows, 77 * chunks, dim].

    `encode` maps int32 ids [rows, 77] to hidden states [rows, 77, dim]; it is called once
    per chunk index (as A1111 does), so the encoder's batch never exceeds `rows`."""
    if not prompts:
        raise ValueError("no prompts to encode")
    counts = {p.num_chunks for p in prompts}
    if len(counts) != 1:
        raise ValueError(f"prompts have different chunk counts {sorted(counts)}; pad them first")
    outs = []
    for k in range(prompts[0].num_chunks):
        ids = np.stack([p.ids[k] for p in prompts])
        hidden = encode(ids)
        if emphasis and any(p.weighted for p in prompts):
            hidden = apply_weights(hidden, np.stack([p.weights[k] for p in prompts]))
        outs.append(hidden)
    return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=1)


def _shorten(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class PromptEncoder:
    """Prompts -> the UNet's context [rows, 77 * chunks, dim], A1111's way, for one engine dir.

    `tokenize` gives a text's token ids without BOS/EOS (`CLIPTokenizer.text_ids`);
    `max_chunks` is the most chunks the UNet graph takes (its context length range / 77:
    1 for engine dirs exported before long prompts). A prompt needing more chunks keeps its
    first `max_chunks` and a warning says what was dropped. `emphasis=False` (A1111's
    emphasis off, `--no-emphasis`) reads a prompt as plain text: brackets and BREAK are words.
    Stateless after construction: safe to share between threads.
    """

    def __init__(
        self,
        tokenize: Callable[[str], Sequence[int]],
        *,
        bos_id: int,
        eos_id: int,
        pad_id: int,
        comma_id: int | None,
        max_chunks: int = 1,
        emphasis: bool = True,
    ) -> None:
        if max_chunks < 1:
            raise ValueError(f"max_chunks must be >= 1, got {max_chunks}")
        self.tokenize = tokenize
        self.bos_id, self.eos_id, self.pad_id, self.comma_id = bos_id, eos_id, pad_id, comma_id
        self.max_chunks = int(max_chunks)
        self.emphasis = bool(emphasis)
        self.empty = empty_chunk(bos_id, eos_id, pad_id)

    def parse(self, prompt: str) -> list[tuple[str, float]]:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        return parse_emphasis(prompt) if self.emphasis else [(prompt, 1.0)]

    def chunks(self, prompt: str, what: str = "prompt") -> PromptChunks:
        """`prompt` as chunks, cut to `max_chunks` (with a warning naming `what`)."""
        full = chunk_prompt(
            self.parse(prompt),
            self.tokenize,
            bos_id=self.bos_id,
            eos_id=self.eos_id,
            pad_id=self.pad_id,
            comma_id=self.comma_id,
        )
        if full.num_chunks <= self.max_chunks:
            return full
        log.warning(
            "%s (%r) needs %d chunks of %d tokens; the UNet takes at most %d (%d tokens): "
            "dropped the rest (re-export with a wider --context-length)",
            what,
            _shorten(prompt),
            full.num_chunks,
            CHUNK_LENGTH,
            self.max_chunks,
            self.max_chunks * (CHUNK_LENGTH + 2),
        )
        return full.truncated(self.max_chunks)

    def num_chunks(self, prompts: Sequence[str]) -> int:
        """Chunks the context of these prompts (positives and negatives together) needs."""
        return max(self.chunks(p).num_chunks for p in prompts) if prompts else 1

    def rows(
        self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None
    ) -> list[PromptChunks]:
        """Rows [negatives..., prompts...] (negatives first, when given), all padded with
        empty-prompt chunks to the same chunk count."""
        rows = [self.chunks(p, f"prompt {i}") for i, p in enumerate(prompts)]
        if negative_prompts is not None:
            negs = [self.chunks(p, f"negative prompt {i}") for i, p in enumerate(negative_prompts)]
            rows = negs + rows
        count = max(r.num_chunks for r in rows)
        return [pad_chunks(r, count, self.empty) for r in rows]

    def context(
        self,
        prompts: Sequence[str],
        encode: Callable[[np.ndarray], np.ndarray],
        negative_prompts: Sequence[str] | None = None,
    ) -> np.ndarray:
        """`encode_chunks` of `rows(prompts, negative_prompts)`."""
        return encode_chunks(self.rows(prompts, negative_prompts), encode, emphasis=self.emphasis)
