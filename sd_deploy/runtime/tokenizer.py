"""CLIP BPE tokenizer of the runtime (numpy + `regex` + stdlib; no transformers, torch or ftfy).

The vocabulary ships with the package (`sd_deploy/data/clip_bpe/bpe_simple_vocab_16e6.txt.gz`,
MIT, see the LICENSE next to it). The exporter calls `write_clip_tokenizer_files` to put
`vocab.json` and `merges.txt` into an engine directory's `tokenizer/` folder, in the format
that transformers' `CLIPTokenizer` reads; the runtime reads them back with
`CLIPTokenizer.from_dir`.

Text cleaning follows the `CLIPTokenizer` of transformers 5, the class diffusers'
`StableDiffusionPipeline` uses (in transformers 5 it is backed by the `tokenizers` library;
there is no slow/Python CLIP tokenizer any more and ftfy is never used):

1. the special tokens `<|startoftext|>`, `<|endoftext|>` and the pad token's text written
   literally in a prompt are split out first (matched case-sensitively on the raw text) and
   map to their ids; with SD 2.x's pad token "!" (id 0), every "!" is id 0, as in diffusers;
2. each remaining piece is NFC-normalized, every run of whitespace becomes one space, and
   it is lowercased character by character (no context-dependent final sigma, as in Rust);
3. it is split into words by CLIP's pattern (contractions, letter runs, single digits,
   runs of other non-space characters), each word is mapped to byte-level unicode and
   BPE-merged with an end-of-word marker `</w>`.

Differences from other CLIP tokenizers, on purpose: OpenAI's original tokenizer and
transformers 4 with ftfy installed also ran `ftfy.fix_text` and `html.unescape`, so `&amp;`
became `&` there but stays `&amp;` here (as in transformers 5). Transformers 4's slow tokenizer
without ftfy used BERT's BasicTokenizer, which put every CJK character in a word of its own
and dropped control characters; here (as in transformers 5 and every "fast" CLIP tokenizer)
a run of CJK letters is one word and control characters are kept as byte tokens.

Not matched: characters assigned after Unicode 14 (Python 3.11's `unicodedata`) may tokenize
differently, since lowercasing/NFC (Python here, Rust std there) and the letter/number classes
(`regex` here, Oniguruma there) use tables of different Unicode versions. Every codepoint
assigned in Unicode 14 was checked to give the same ids, alone and in context.
"""

from __future__ import annotations

import functools
import heapq
import json
import logging
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import regex

from sd_deploy.engine_dir.tokenizer_files import (
    BOS_TOKEN,
    BOS_TOKEN_ID,
    END_OF_WORD,
    EOS_TOKEN,
    EOS_TOKEN_ID,
    MERGES_FILE,
    SHIPPED_BPE_GZ,
    VOCAB_FILE,
    VOCAB_SIZE,
    bytes_to_unicode,
    write_clip_tokenizer_files,
)
from sd_deploy.errors import EngineDirError, RequestError

log = logging.getLogger("sd_deploy")

__all__ = [
    "BOS_TOKEN",
    "BOS_TOKEN_ID",
    "EOS_TOKEN",
    "EOS_TOKEN_ID",
    "SHIPPED_BPE_GZ",
    "VOCAB_SIZE",
    "CLIPTokenizer",
    "write_clip_tokenizer_files",
]

# transformers 5 CLIPTokenizer: normalizer Replace(Regex(r"\s+"), " ") and pre-tokenizer
# Split(pattern, behavior="removed", invert=True), i.e. keep the matches, drop the rest.
_WHITESPACE = regex.compile(r"\s+")
_WORD = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")

_BPE_CACHE_SIZE = 1 << 16
_CACHED_WORD_CHARS = 128  # longer words are merged every time, not cached
_PROMPT_SHOWN = 60


def _lowercase(text: str) -> str:
    # `str.lower` maps a word-final capital sigma to "ς" (context rule); the Rust normalizer
    # lowercases char by char and gives "σ". Everything else is the same per char.
    if "Σ" in text:
        return "".join(c.lower() for c in text)
    return text.lower()


def _shorten(text: str, limit: int = _PROMPT_SHOWN) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_vocab(path: Path) -> dict[str, int]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EngineDirError(f"tokenizer file missing: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise EngineDirError(f"tokenizer file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
        for k, v in data.items()
    ):
        raise EngineDirError(f"tokenizer file {path} is not a JSON object of token -> id")
    return data


def _load_merges(path: Path) -> list[tuple[str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EngineDirError(f"tokenizer file missing: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EngineDirError(f"tokenizer file {path} cannot be read: {e}") from None
    merges: list[tuple[str, str]] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise EngineDirError(f"tokenizer file {path} line {lineno} is not a merge 'a b'")
        merges.append((parts[0], parts[1]))
    if not merges:
        raise EngineDirError(f"tokenizer file {path} holds no merges")
    return merges


class CLIPTokenizer:
    """CLIP byte-level BPE tokenizer giving the ids of transformers 5's `CLIPTokenizer`.

    `encode` returns int32 `[B, max_length]`: BOS (49406), the text tokens, EOS (49407), then
    `pad_token_id` (SD 1.x pads with EOS, the default; SD 2.x pads with 0). Prompts longer than
    `max_length - 2` text tokens are truncated to keep BOS ... EOS, with a `UserWarning`
    saying how many tokens were dropped from which prompt. As in transformers, the text of
    the pad token is a special token too: with `pad_token_id=0` every "!" in a prompt is 0.

    Thread safety: an instance may be shared by threads calling `encode` / `count_tokens`
    concurrently. Its tables are read-only after construction and the per-word BPE cache is
    a `functools.lru_cache`, which is safe to call from several threads (at worst a word is
    merged twice).
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        max_length: int = 77,
        pad_token_id: int | None = None,
        *,
        source: str = "CLIP tokenizer",
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (BOS and EOS), got {max_length}")
        self._encoder: dict[str, int] = dict(vocab)
        self._decoder: dict[int, str] = {i: t for t, i in self._encoder.items()}
        enc = self._encoder
        for tok in (BOS_TOKEN, EOS_TOKEN):
            if tok not in enc:
                raise EngineDirError(f"{source}: {VOCAB_FILE} has no {tok} token")
        missing = [c for c in bytes_to_unicode().values() if c not in enc or c + "</w>" not in enc]
        if missing:
            raise EngineDirError(f"{source}: {VOCAB_FILE} lacks byte tokens (e.g. {missing[0]!r})")
        for a, b in merges:
            if a not in enc or b not in enc or a + b not in enc:
                raise EngineDirError(
                    f"{source}: {MERGES_FILE} merge {_shorten(a, 40)!r} {_shorten(b, 40)!r} "
                    f"uses a token not in {VOCAB_FILE}"
                )
        self._ranks: dict[tuple[str, str], int] = {}
        for rank, pair in enumerate(merges):
            self._ranks.setdefault(pair, rank)
        self.bos_token_id = self._encoder[BOS_TOKEN]
        self.eos_token_id = self._encoder[EOS_TOKEN]
        self.pad_token_id = self.eos_token_id if pad_token_id is None else int(pad_token_id)
        if self.pad_token_id not in self._decoder:
            raise EngineDirError(
                f"{source}: pad_token_id {self.pad_token_id} is not in the vocabulary"
            )
        # transformers registers BOS, EOS and the pad token as special "added tokens": their
        # literal text is split out of the raw prompt (case-sensitive, leftmost-longest) before
        # normalization. So with SD 2.x's pad token "!" (id 0) every "!" in a prompt becomes
        # id 0 rather than a BPE token ("!!!" -> 0 0 0, not 995); diffusers issue #4153.
        self._special: dict[str, int] = {
            BOS_TOKEN: self.bos_token_id,
            EOS_TOKEN: self.eos_token_id,
            self._decoder[self.pad_token_id]: self.pad_token_id,
        }
        self._special_re = regex.compile(
            "|".join(regex.escape(t) for t in sorted(self._special, key=len, reverse=True))
        )
        self.max_length = int(max_length)
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        self._word_ids = functools.lru_cache(maxsize=_BPE_CACHE_SIZE)(self._bpe_ids)

    @classmethod
    def from_dir(
        cls, path: str | Path, max_length: int = 77, pad_token_id: int | None = None
    ) -> CLIPTokenizer:
        """Read `vocab.json` and `merges.txt` from `path` (an engine dir's `tokenizer/`)."""
        path = Path(path)
        if not path.is_dir():
            raise EngineDirError(f"tokenizer folder missing: {path}")
        vocab = _load_vocab(path / VOCAB_FILE)
        merges = _load_merges(path / MERGES_FILE)
        return cls(vocab, merges, max_length, pad_token_id, source=f"tokenizer in {path}")

    @property
    def vocab_size(self) -> int:
        return len(self._encoder)

    @property
    def max_text_tokens(self) -> int:
        """Text tokens that fit between BOS and EOS (`max_length - 2`)."""
        return self.max_length - 2

    # -- BPE -------------------------------------------------------------------------------

    def _bpe_ids(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-tokenized word (already byte-mapped), end-of-word marked.

        Same algorithm as the `tokenizers` BPE model (`Word::merge_all`): a heap of candidate
        merges ordered by (rank, position), symbols in a linked list, stale entries skipped.
        O(n log n) in the word length, so a pathological 10k-character word stays fast.
        """
        syms = list(word[:-1]) + [word[-1] + END_OF_WORD]
        n = len(syms)
        ranks = self._ranks
        if n > 1:
            nxt = list(range(1, n + 1))
            nxt[-1] = -1
            prv = list(range(-1, n - 1))
            alive = [True] * n
            heap: list[tuple[int, int, str]] = []
            for i in range(n - 1):
                r = ranks.get((syms[i], syms[i + 1]))
                if r is not None:
                    heap.append((r, i, syms[i] + syms[i + 1]))
            heapq.heapify(heap)
            while heap:
                _, pos, merged = heapq.heappop(heap)
                j = nxt[pos]
                if not alive[pos] or j < 0:
                    continue
                a, b = syms[pos], syms[j]
                if a + b != merged or (a, b) not in ranks:
                    continue  # stale entry: a neighbour was merged since it was pushed
                syms[pos] = merged
                alive[j] = False
                k = nxt[j]
                nxt[pos] = k
                if k >= 0:
                    prv[k] = pos
                p = prv[pos]
                if p >= 0:
                    r = ranks.get((syms[p], merged))
                    if r is not None:
                        heapq.heappush(heap, (r, p, syms[p] + merged))
                if k >= 0:
                    r = ranks.get((merged, syms[k]))
                    if r is not None:
                        heapq.heappush(heap, (r, pos, merged + syms[k]))
            syms = [s for s, keep in zip(syms, alive, strict=True) if keep]
        enc = self._encoder
        return tuple(enc[s] for s in syms)

    def _text_ids(self, text: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: a str, but not Unicode text
            raise RequestError(
                f"prompt is not valid Unicode text: character {e.start} is the lone surrogate "
                f"{text[e.start]!r}"
            ) from None
        ids: list[int] = []
        start = 0
        for m in self._special_re.finditer(text):
            self._piece_ids(text[start : m.start()], ids)
            ids.append(self._special[m.group()])
            start = m.end()
        self._piece_ids(text[start:], ids)
        return ids

    def _piece_ids(self, piece: str, out: list[int]) -> None:
        if not piece:
            return
        piece = unicodedata.normalize("NFC", piece)
        piece = _lowercase(_WHITESPACE.sub(" ", piece))
        byte_encoder = self._byte_encoder
        for word in _WORD.findall(piece):
            mapped = "".join(byte_encoder[b] for b in word.encode("utf-8"))
            if len(mapped) <= _CACHED_WORD_CHARS:
                out.extend(self._word_ids(mapped))
            else:
                out.extend(self._bpe_ids(mapped))

    def _decode(self, ids: Sequence[int]) -> str:
        text = "".join(self._decoder[i] for i in ids)
        raw = bytes(self._byte_decoder.get(c, 32) for c in text.replace(END_OF_WORD, " "))
        return raw.decode("utf-8", errors="replace").strip()

    # -- public ----------------------------------------------------------------------------

    def text_ids(self, text: str) -> list[int]:
        """Token ids of `text` alone: no BOS/EOS, no truncation (one piece of a prompt)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._text_ids(text)

    def token_id(self, token: str) -> int | None:
        """The id of a vocabulary entry (e.g. ",</w>", the comma A1111 breaks chunks at)."""
        return self._encoder.get(token)

    def count_tokens(self, prompt: str) -> int:
        """Text tokens of `prompt`, without BOS/EOS and before truncation.

        The prompt fits without truncation when this is at most `max_text_tokens`.
        """
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        return len(self._text_ids(prompt))

    def encode(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Token ids, int32 `[B, max_length]` (B = 1 for a single string)."""
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        out = np.full((len(batch), self.max_length), self.pad_token_id, dtype=np.int32)
        keep = self.max_text_tokens
        for row, prompt in enumerate(batch):
            if not isinstance(prompt, str):
                raise TypeError(f"prompts must be str, got {type(prompt).__name__} at {row}")
            ids = self._text_ids(prompt)
            if len(ids) > keep:
                dropped = ids[keep:]
                log.warning(
                    "prompt %d (%r) has %d tokens, more than the %d the text encoder takes: "
                    "dropped the last %d (%r)",
                    row,
                    _shorten(prompt),
                    len(ids),
                    keep,
                    len(dropped),
                    _shorten(self._decode(dropped)),
                )
                ids = ids[:keep]
            out[row, 0] = self.bos_token_id
            out[row, 1 : len(ids) + 1] = ids
            out[row, len(ids) + 1] = self.eos_token_id
        return out
