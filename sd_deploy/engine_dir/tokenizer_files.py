"""The tokenizer files of an engine dir (`tokenizer/vocab.json` + `merges.txt`, CLIP BPE).

The exporter writes them, from a model's own tokenizer folder or from the CLIP BPE table
shipped in the package; the runtime's tokenizer reads them. Their format and the special
tokens are part of the contract, so both sides take them from here.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

from sd_deploy.errors import ExportError

SHIPPED_BPE_GZ = (
    Path(__file__).resolve().parent.parent / "data" / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"
)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
VOCAB_SIZE = 49408
N_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894: lines [1 : 49152 - 256 - 2 + 1] of the gz file
END_OF_WORD = "</w>"

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP map from each byte to a printable unicode character."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def read_bpe_gz(source_gz: Path) -> list[str]:
    try:
        with gzip.open(source_gz, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ExportError(f"cannot read CLIP BPE vocabulary {source_gz}: {e}") from e
    merges = lines[1 : N_MERGES + 1]
    if len(merges) != N_MERGES or any(len(m.split(" ")) != 2 for m in merges):
        raise ExportError(
            f"CLIP BPE vocabulary {source_gz} is not bpe_simple_vocab_16e6.txt "
            f"(expected {N_MERGES} merge lines of two tokens after the header)"
        )
    return merges


def write_clip_tokenizer_files(dest_dir: Path, source_gz: Path | None = None) -> None:
    """Write `vocab.json` and `merges.txt` of the CLIP tokenizer into `dest_dir`.

    They are derived from the shipped `bpe_simple_vocab_16e6.txt.gz` (or `source_gz`) the way
    OpenAI's CLIP builds its vocabulary: the 256 byte characters, the same with `</w>`, the
    48894 merges joined, then `<|startoftext|>` (49406) and `<|endoftext|>` (49407); 49408
    entries. `merges.txt` starts with a `#version: 0.2` line, as transformers expects.
    `dest_dir` is created if needed; existing files are overwritten.
    """
    source = SHIPPED_BPE_GZ if source_gz is None else Path(source_gz)
    merges = read_bpe_gz(source)
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + END_OF_WORD for c in byte_chars]
    tokens += ["".join(m.split(" ")) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ExportError(f"CLIP BPE vocabulary {source} gives {len(vocab)} distinct tokens")
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / VOCAB_FILE).write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (dest / MERGES_FILE).write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
