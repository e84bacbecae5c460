"""The runtime's CLIP tokenizer against transformers' `CLIPTokenizer`.

The reference is built from the vocab.json / merges.txt that `write_clip_tokenizer_files`
writes into a tmp dir (never from the hub). In transformers 5 `CLIPTokenizer` is backed by
the `tokenizers` library (there is no slow CLIP tokenizer and ftfy is not used); it is the
class diffusers' StableDiffusionPipeline loads. With transformers 4 `CLIPTokenizer` is the
slow Python class, which without ftfy splits CJK characters apart and drops control
characters, and with ftfy unescapes HTML entities; the runtime follows the tokenizers-backed
class, so with transformers 4 the reference here is `CLIPTokenizerFast`.

Known, accepted difference: characters assigned after Unicode 14 (Python 3.11's
`unicodedata`) can tokenize differently, because lowercasing/NFC (Python here, Rust std
there) and the letter/number classes (`regex` module here, Oniguruma there) come from tables
of different Unicode versions. The random characters below are drawn from those assigned in
this Python's `unicodedata`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import random
import re
import string
import subprocess
import sys
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from sd_deploy.errors import EngineDirError, ExportError
from sd_deploy.runtime.tokenizer import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    SHIPPED_BPE_GZ,
    CLIPTokenizer,
    write_clip_tokenizer_files,
)

MAX_LEN = 77
SHIPPED_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("clip_tokenizer")
    write_clip_tokenizer_files(d)
    return d


@pytest.fixture(scope="module")
def ours(tok_dir: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_dir(tok_dir)


def _reference_class():  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    cls = transformers.CLIPTokenizer
    if not getattr(cls, "is_fast", False) and hasattr(transformers, "CLIPTokenizerFast"):
        cls = transformers.CLIPTokenizerFast  # transformers 4: see the module docstring
    return cls


@pytest.fixture(scope="module")
def ref(tok_dir: Path):  # type: ignore[no-untyped-def]
    tk = _reference_class().from_pretrained(str(tok_dir), local_files_only=True)
    assert tk.is_fast
    assert len(tk) == 49408
    assert (tk.bos_token_id, tk.eos_token_id, tk.pad_token_id) == (49406, 49407, 49407)
    return tk


def _ref_ids(ref, prompts: list[str], max_length: int = MAX_LEN) -> np.ndarray:  # type: ignore[no-untyped-def]
    out = ref(prompts, padding="max_length", max_length=max_length, truncation=True)
    return np.asarray(out["input_ids"], dtype=np.int64)


def _encode_quiet(tk: CLIPTokenizer, prompts: list[str]) -> np.ndarray:
    return tk.encode(prompts)


def _assert_same(ours_ids: np.ndarray, ref_ids: np.ndarray, prompts: list[str]) -> None:
    assert ours_ids.shape == ref_ids.shape
    bad = [i for i in range(len(prompts)) if not np.array_equal(ours_ids[i], ref_ids[i])]
    assert not bad, "\n".join(
        f"{prompts[i]!r}\n  ours {ours_ids[i].tolist()}\n  ref  {ref_ids[i].tolist()}"
        for i in bad[:5]
    )


# -- prompts -----------------------------------------------------------------------------------

HAND_WRITTEN = [
    "",
    " ",
    "\t\n  \r\n",
    "a photo of an astronaut riding a horse on mars",
    "A Photo Of An ASTRONAUT Riding A HORSE",
    "masterpiece, best quality, (ultra-detailed:1.2), [cat|dog], {forest}",
    "portrait of a woman, 85mm, f/1.8, 4k, 8K UHD, 16:9, 1920x1080, 3.14159, -42, 1e-5",
    "it's the dog's bone; they're here, we've gone, I'm ok, you'll see, he'd go, don't",
    "IT'S THE DOG'S; THEY'RE; WE'VE; I'M; YOU'LL; HE'D; DON'T; O'Neill",
    "'s 't 're 've 'm 'll 'd ''s '''ll 'S 'Ll s' rock'n'roll",
    "curly ’ apostrophes ‘quoted’ “double” „low” «guillemets» ‹single›",
    "!!!??? ... --- ___ *** ### $$$ %%% ^^^ &&& ((())) [[[]]] {{{}}} <<<>>> ~~~ ``` |||",
    "a,b.c;d:e!f?g-h_i/j\\k|l@m#n$o%p^q&r*s(t)u+v=w~x`y'z\"",
    "multiple     spaces\t\ttabs\n\nnewlines\r\ncrlf\x0bvt\x0cff\u00a0nbsp\u3000ideo\u2003em",
    "&amp; &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;apos&#39; &#x27; &nbsp; &copy;",
    "<b>html</b> <br/> <a href='x'>link</a> &amp;amp;",
    "café naïve résumé Ångström façade jalapeño crème brûlée Zoë Øresund straße ÉCOLE",
    "e\u0301 cafe\u0301 n\u0303 A\u030a decomposed accents",
    "東京タワーの夜景、美しい桜 中文提示词 漢字 한국어 프롬프트 ひらがな カタカナ",
    "emoji 🐱 🐶🐶🐶 🚀✨ 👩‍🚀 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷🇯🇵 👍🏽 ❤️ ©️ 1️⃣",
    "RTL: مرحبا بالعالم שלום עולם \u200fmixed\u200e ltr",
    "हिन्दी नमस्ते ภาษาไทย Ελληνικά ΟΔΟΣ ΣΟΦΟΣ Русский ЯЗЫК Ѐ",
    "İstanbul ǅ ǈ ß ẞ ﬁ ﬀ Ⅻ ① ½ ² ³ ٣ ๓ 〇 ℃ ㎏ ＡＢＣ ｶﾀｶﾅ",
    "zero\u200bwidth\u200cjoiner\u200dstuff\ufeffbom\u00adsoft",
    "control \x00 \x01 \x07 \x1b[31m \x7f \x85 \x9f chars",
    "a<|endoftext|>b <|startoftext|> c<|endoftext|><|endoftext|> <|ENDOFTEXT|> <|endof",
    "lowercase <|startoftext|>x and <|EndOfText|>",
    "x" * 300,
    "supercalifragilisticexpialidocious" * 20,
    "1234567890" * 10,
    "word " * 74 + "end",
    "word " * 75,
    "word " * 76,
    "a photo of " + "a very very " * 60 + "cat",
    " ".join(["masterpiece, best quality, highly detailed, intricate, 8k"] * 10),
]


def _assigned_chars(rng: random.Random, lo: int, hi: int, k: int) -> list[str]:
    out: list[str] = []
    while len(out) < k:
        c = rng.randrange(lo, hi)
        if 0xD800 <= c < 0xE000:
            continue
        ch = chr(c)
        if unicodedata.category(ch) not in ("Cn", "Cs"):
            out.append(ch)
    return out


def _generated_prompts(n: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    words = (
        "a photo of the cat dog astronaut horse riding on mars in style by greg rutkowski "
        "trending artstation portrait landscape oil painting watercolor cinematic lighting "
        "highly detailed sharp focus unreal engine octane render bokeh 35mm hdr sunset "
        "cyberpunk city neon rain fantasy castle dragon forest misty morning golden hour"
    ).split()
    pools = {
        "latin1": [chr(c) for c in range(0xC0, 0x100) if c not in (0xD7, 0xF7)],
        "greek": [chr(c) for c in range(0x391, 0x3CA) if unicodedata.category(chr(c)) != "Cn"],
        "cyrillic": [chr(c) for c in range(0x400, 0x460)],
        "cjk": [chr(c) for c in range(0x4E00, 0x4E00 + 400)],
        "kana": [chr(c) for c in range(0x3041, 0x3097)] + [chr(c) for c in range(0x30A1, 0x30FB)],
        "hangul": [chr(c) for c in range(0xAC00, 0xAC00 + 300)],
        "arabic": [chr(c) for c in range(0x621, 0x64B)],
        "hebrew": [chr(c) for c in range(0x5D0, 0x5EB)],
        "devanagari": [chr(c) for c in range(0x905, 0x940)],
        "combining": [chr(c) for c in range(0x300, 0x370)],
        "emoji": [chr(c) for c in range(0x1F300, 0x1F650) if unicodedata.category(chr(c)) != "Cn"],
        "punct": list(string.punctuation) + list("“”‘’«»–—…·•¡¿§¶†‡"),
        "space": [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u2003", "\u3000", " \t \n "],
        "bmp": _assigned_chars(rng, 0xA0, 0x10000, 500),
        "astral": _assigned_chars(rng, 0x10000, 0x30000, 200),
    }
    entities = ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&nbsp;", "&#x1F600;", "&copy;"]
    contractions = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "n't", "'"]

    def piece() -> str:
        kind = rng.random()
        if kind < 0.35:
            w = rng.choice(words)
            case = rng.random()
            return w.upper() if case < 0.15 else w.capitalize() if case < 0.3 else w
        if kind < 0.45:
            return rng.choice(words) + rng.choice(contractions)
        if kind < 0.55:
            return str(rng.choice([rng.randrange(1000), rng.randrange(10**9), rng.random() * 100]))
        if kind < 0.62:
            return "".join(rng.choices(pools["punct"], k=rng.randint(1, 5)))
        if kind < 0.66:
            return rng.choice(entities)
        if kind < 0.68:
            return rng.choice(["<|endoftext|>", "<|startoftext|>"])
        pool = pools[rng.choice([k for k in pools if k not in ("punct", "space")])]
        return "".join(rng.choices(pool, k=rng.randint(1, 6)))

    prompts: list[str] = []
    while len(prompts) < n:
        i = len(prompts)
        length = rng.choice([1, 2, 3, 5, 8, 12, 20, 30, 50, 90]) if i % 10 else rng.randint(60, 200)
        parts = []
        for _ in range(length):
            parts.append(piece())
            parts.append(rng.choice(pools["space"]) if rng.random() < 0.85 else "")
        prompt = "".join(parts)
        if prompt not in prompts:
            prompts.append(prompt)
    return prompts


# -- equivalence with transformers -------------------------------------------------------------


def test_hand_written_prompts_match_transformers(ours: CLIPTokenizer, ref) -> None:  # type: ignore[no-untyped-def]
    _assert_same(_encode_quiet(ours, HAND_WRITTEN), _ref_ids(ref, HAND_WRITTEN), HAND_WRITTEN)


def test_generated_prompts_match_transformers(ours: CLIPTokenizer, ref) -> None:  # type: ignore[no-untyped-def]
    prompts = _generated_prompts(400)
    assert len(set(prompts)) == len(prompts)
    _assert_same(_encode_quiet(ours, prompts), _ref_ids(ref, prompts), prompts)


def test_count_tokens_matches_transformers(ours: CLIPTokenizer, ref) -> None:  # type: ignore[no-untyped-def]
    prompts = HAND_WRITTEN + _generated_prompts(100, seed=7)
    expected = [len(ids) for ids in ref(prompts, add_special_tokens=False)["input_ids"]]
    assert [ours.count_tokens(p) for p in prompts] == expected


def test_other_max_length_matches_transformers(tok_dir: Path, ref) -> None:  # type: ignore[no-untyped-def]
    tk = CLIPTokenizer.from_dir(tok_dir, max_length=16)
    prompts = HAND_WRITTEN[:12]
    _assert_same(_encode_quiet(tk, prompts), _ref_ids(ref, prompts, max_length=16), prompts)


def test_pad_zero_matches_sd2_tokenizer(tok_dir: Path) -> None:
    # SD 2.x's tokenizer_config has pad_token "!" (id 0); SD 1.x pads with <|endoftext|>.
    ref0 = _reference_class().from_pretrained(str(tok_dir), local_files_only=True, pad_token="!")
    assert ref0.pad_token_id == 0
    tk = CLIPTokenizer.from_dir(tok_dir, pad_token_id=0)
    prompts = ["a cat", "", "!!! a dog !!!", "wow! ! !! !!! ?!", "word " * 80]
    _assert_same(_encode_quiet(tk, prompts), _ref_ids(ref0, prompts), prompts)


def test_very_long_word_matches_transformers(ours: CLIPTokenizer, ref) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(3)
    word = "a" * 5000 + "".join(rng.choices(string.ascii_lowercase, k=15000))
    assert ours.count_tokens(word) == len(ref(word, add_special_tokens=False)["input_ids"])
    _assert_same(_encode_quiet(ours, [word]), _ref_ids(ref, [word]), [word])


# -- layout, padding, truncation ---------------------------------------------------------------


def test_encode_layout_and_padding(tok_dir: Path, ours: CLIPTokenizer) -> None:
    ids = ours.encode("a photo of a cat")
    assert ids.dtype == np.int32 and ids.shape == (1, MAX_LEN)
    assert ours.encode("! !! !!!")[0, :5].tolist() == [BOS_TOKEN_ID, 256, 748, 995, EOS_TOKEN_ID]
    assert ids[0, :7].tolist() == [BOS_TOKEN_ID, 320, 1125, 539, 320, 2368, EOS_TOKEN_ID]
    assert (ids[0, 7:] == EOS_TOKEN_ID).all()
    pad0 = CLIPTokenizer.from_dir(tok_dir, pad_token_id=0)
    zero = pad0.encode(["a photo of a cat", ""])
    assert zero[0, :7].tolist() == ids[0, :7].tolist() and (zero[0, 7:] == 0).all()
    assert zero[1, :2].tolist() == [BOS_TOKEN_ID, EOS_TOKEN_ID] and (zero[1, 2:] == 0).all()
    # "!" is the pad token there, split out like transformers does (diffusers issue #4153)
    assert pad0.encode("! !! !!!")[0, :8].tolist() == [BOS_TOKEN_ID] + [0] * 6 + [EOS_TOKEN_ID]
    assert pad0.count_tokens("wow!!") == 3
    batch = ours.encode(["a cat", "a dog", "a cat"])
    assert batch.shape == (3, MAX_LEN)
    np.testing.assert_array_equal(batch[0], ours.encode("a cat")[0])
    np.testing.assert_array_equal(batch[0], batch[2])
    assert ours.encode([]).shape == (0, MAX_LEN)
    assert ours.encode(("a", "b")).shape == (2, MAX_LEN)


def test_truncation_warns_with_dropped_count(ours: CLIPTokenizer, caplog) -> None:
    prompt = "a " * 100  # 100 tokens; 75 fit between BOS and EOS
    assert ours.count_tokens(prompt) == 100
    with caplog.at_level(logging.WARNING, logger="sd_deploy"):
        ids = ours.encode(["short", prompt])
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert re.search(r"100 tokens.*dropped the last 25", message)
    assert "prompt 1" in message and "'a a a" in message and "..." in message
    assert len(message) < 300 and "\n" not in message
    assert ids[1, 0] == BOS_TOKEN_ID and ids[1, -1] == EOS_TOKEN_ID
    assert (ids[1, 1:-1] == 320).all()  # "a</w>"


def test_exactly_full_prompt_does_not_warn(ours: CLIPTokenizer, caplog) -> None:
    prompt = "a " * ours.max_text_tokens
    with caplog.at_level(logging.WARNING, logger="sd_deploy"):
        ids = ours.encode(prompt)
    assert not caplog.records
    assert ids[0, -1] == EOS_TOKEN_ID and ids[0, -2] == 320
    with caplog.at_level(logging.WARNING, logger="sd_deploy"):
        ours.encode(prompt + "b")
    assert "dropped the last 1 " in caplog.records[-1].getMessage()


def test_count_tokens(ours: CLIPTokenizer) -> None:
    assert ours.count_tokens("") == 0
    assert ours.count_tokens("   \n") == 0
    assert ours.count_tokens("a photo of a cat") == 5
    assert ours.count_tokens("a<|endoftext|>b") == 3
    assert ours.max_text_tokens == 75


def test_rejects_non_strings(ours: CLIPTokenizer) -> None:
    with pytest.raises(TypeError):
        ours.encode(["a", 3])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        ours.count_tokens(None)  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_concurrent_encode_is_consistent(tok_dir: Path) -> None:
    tk = CLIPTokenizer.from_dir(tok_dir)  # fresh, so the threads race on an empty cache
    prompts = _generated_prompts(200, seed=99)
    expected = _encode_quiet(CLIPTokenizer.from_dir(tok_dir), prompts)
    chunks = [prompts[i::8] for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(tk.encode, chunks))
    for i, res in enumerate(results):
        np.testing.assert_array_equal(res, expected[i::8])


# -- files -------------------------------------------------------------------------------------


def test_written_files(tok_dir: Path) -> None:
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    assert sorted(vocab.values()) == list(range(49408))
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["a</w>"] == 320
    lines = (tok_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    assert len(lines) == 1 + 48894
    assert lines[1] == "i n" and all(len(x.split(" ")) == 2 for x in lines[1:])
    with gzip.open(SHIPPED_BPE_GZ, "rt", encoding="utf-8") as f:
        src = f.read().split("\n")
    assert lines[1:] == src[1 : 49152 - 256 - 2 + 1]
    assert vocab["".join(lines[-1].split(" "))] == 49405


def test_shipped_vocab_and_licence() -> None:
    assert hashlib.sha256(SHIPPED_BPE_GZ.read_bytes()).hexdigest() == SHIPPED_SHA256
    licence = (SHIPPED_BPE_GZ.parent / "LICENSE").read_text(encoding="utf-8")
    assert "MIT" in licence and "Permission is hereby granted" in licence
    assert "open_clip" in licence and "OpenAI" in licence


def test_write_from_bad_source(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt.gz"
    with pytest.raises(ExportError, match="nope.txt.gz"):
        write_clip_tokenizer_files(tmp_path / "out", missing)
    not_gz = tmp_path / "plain.txt.gz"
    not_gz.write_text("hello")
    with pytest.raises(ExportError, match="plain.txt.gz"):
        write_clip_tokenizer_files(tmp_path / "out", not_gz)
    short = tmp_path / "short.txt.gz"
    with gzip.open(short, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\ni n\nt h\n")
    with pytest.raises(ExportError, match="short.txt.gz"):
        write_clip_tokenizer_files(tmp_path / "out", short)


def _copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("vocab.json", None),
        ("merges.txt", None),
        ("vocab.json", "{not json"),
        ("vocab.json", "[1, 2, 3]"),
        ("vocab.json", '{"a": "b"}'),
        ("vocab.json", b"\xff\xfe\x00garbage"),
        ("merges.txt", "#version: 0.2\n"),
        ("merges.txt", "#version: 0.2\ni n\nthree part line\n"),
        ("merges.txt", "#version: 0.2\ni n\n\u4e00 \u4e01\n"),
        ("merges.txt", b"#version: 0.2\n\xff\xfe\n"),
    ],
)
def test_bad_files_raise_engine_dir_error(
    tok_dir: Path, tmp_path: Path, name: str, damage: str | bytes | None
) -> None:
    d = _copy_dir(tok_dir, tmp_path / "tok")
    if damage is None:
        (d / name).unlink()
    elif isinstance(damage, bytes):
        (d / name).write_bytes(damage)
    else:
        (d / name).write_text(damage, encoding="utf-8")
    with pytest.raises(EngineDirError) as exc:
        CLIPTokenizer.from_dir(d)
    message = str(exc.value)
    assert "\n" not in message
    assert name in message


def test_vocab_without_special_tokens(tok_dir: Path, tmp_path: Path) -> None:
    d = _copy_dir(tok_dir, tmp_path / "tok")
    vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
    del vocab["<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(EngineDirError, match="endoftext"):
        CLIPTokenizer.from_dir(d)


def test_missing_folder_and_bad_arguments(tok_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineDirError, match="missing"):
        CLIPTokenizer.from_dir(tmp_path / "absent")
    with pytest.raises(ValueError):
        CLIPTokenizer.from_dir(tok_dir, max_length=1)
    with pytest.raises(EngineDirError, match="pad_token_id 49408"):  # the manifest's pad id
        CLIPTokenizer.from_dir(tok_dir, pad_token_id=49408)


def test_runtime_import_needs_no_torch_or_transformers() -> None:
    code = (
        "import sys, sd_deploy.runtime.tokenizer\n"
        "heavy = {'torch', 'transformers', 'tokenizers', 'ftfy'}\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
