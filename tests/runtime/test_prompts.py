"""Emphasis parsing, A1111 chunking and weighting (sd_deploy.runtime.prompts).

The reference parser below is written from A1111's documented rules as a character scanner,
not from its regex, so the two implementations share no code."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from sd_deploy.errors import RequestError
from sd_deploy.runtime.prompts import (
    BREAK,
    CHUNK_LENGTH,
    PromptChunks,
    apply_weights,
    chunk_prompt,
    empty_chunk,
    encode_chunks,
    pad_chunks,
    parse_emphasis,
)

BOS, EOS = 49406, 49407

# -- A1111's own doctest cases (modules/prompt_parser.py) -----------------------------------

A1111_DOCTESTS = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize("text, expected", A1111_DOCTESTS)
def test_a1111_doctests(text, expected):
    assert parse_emphasis(text) == expected


def test_documented_rules():
    assert parse_emphasis("") == [("", 1.0)]
    assert parse_emphasis("()") == [("", 1.0)]
    assert parse_emphasis("[a]") == [("a", 1 / 1.1)]
    assert parse_emphasis("(a : 1.3 )") == [("a ", 1.3)]
    assert parse_emphasis("(a:-1)") == [("a", -1.0)]
    assert parse_emphasis("a:1.2) b)") == [("a:1.2) b)", 1.0)]  # nothing open: plain text
    assert parse_emphasis("a \\\\ b") == [("a \\ b", 1.0)]
    assert parse_emphasis("a \\b") == [("a b", 1.0)]  # a lone backslash is dropped
    assert parse_emphasis("a BREAK b") == [("a", 1.0), BREAK, ("b", 1.0)]
    assert parse_emphasis("aBREAK b") == [("aBREAK b", 1.0)]
    assert parse_emphasis("(a BREAK b)") == [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]
    assert parse_emphasis("[(a]") == [("a", 1.0 * (1 / 1.1) * 1.1)]  # ] closes [, ( at the end
    with pytest.raises(RequestError, match="1.2.3"):
        parse_emphasis("(a:1.2.3)")


# -- independent reference ------------------------------------------------------------------


def _is_word(c: str) -> bool:
    return c.isalnum() or c == "_"


def _split_breaks(text: str) -> list[str]:
    """Split at each stand-alone BREAK, eating the whitespace on both sides."""
    parts, start, i = [], 0, 0
    while True:
        i = text.find("BREAK", i)
        if i < 0:
            break
        end = i + 5
        if (i > 0 and _is_word(text[i - 1])) or (end < len(text) and _is_word(text[end])):
            i += 1
            continue
        left = i
        while left > start and text[left - 1].isspace():
            left -= 1
        while end < len(text) and text[end].isspace():
            end += 1
        parts.append(text[start:left])
        start = i = end
    parts.append(text[start:])
    return parts


def _read_weight(text: str, i: int) -> tuple[str, int] | None:
    """At a ':' at i: (number text, index after the ')') if ':' ws number ws ')' follows."""
    j = i + 1
    while j < len(text) and text[j].isspace():
        j += 1
    k = j
    if k < len(text) and text[k] in "+-":
        k += 1
    m = k
    while m < len(text) and (text[m] == "." or text[m].isdecimal()):
        m += 1
    if m == k:
        return None
    number = text[j:m]
    while m < len(text) and text[m].isspace():
        m += 1
    if m < len(text) and text[m] == ")":
        return number, m + 1
    return None


def reference_parse(text: str) -> list[tuple[str, float]]:
    segments: list[list] = []  # [text, [factors in the order they were applied]]
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for seg in segments[start:]:
            seg[1].append(factor)

    def plain(run: str) -> None:
        for n, part in enumerate(_split_breaks(run)):
            if n:
                segments.append(["BREAK", [], True])
            segments.append([part, []])

    i, run = 0, ""
    while i < len(text):
        c = text[i]
        if c not in "\\()[]:":
            run += c
            i += 1
            continue
        if run:
            plain(run)
            run = ""
        if c == "\\":
            nxt = text[i + 1] if i + 1 < len(text) else ""
            if nxt and nxt in "()[]\\":
                segments.append([nxt, []])
                i += 2
            else:
                segments.append(["", []])
                i += 1
        elif c == "(":
            rounds.append(len(segments))
            i += 1
        elif c == "[":
            squares.append(len(segments))
            i += 1
        elif c == ":":
            found = _read_weight(text, i)
            if found is not None and rounds:
                scale(rounds.pop(), float(found[0]))
                i = found[1]
            elif found is not None:
                plain(text[i : found[1]])
                i = found[1]
            else:
                plain(":")
                i += 1
        elif c == ")" and rounds:
            scale(rounds.pop(), 1.1)
            i += 1
        elif c == "]" and squares:
            scale(squares.pop(), 1 / 1.1)
            i += 1
        else:
            plain(c)
            i += 1
    if run:
        plain(run)
    for start in rounds:
        scale(start, 1.1)
    for start in squares:
        scale(start, 1 / 1.1)
    pairs: list[list] = []
    for seg in segments:
        w = -1.0 if len(seg) == 3 else 1.0
        for f in seg[1]:
            w *= f
        pairs.append([seg[0], w])
    if not pairs:
        return [("", 1.0)]
    out = [pairs[0]]
    for t, w in pairs[1:]:
        if w == out[-1][1]:
            out[-1][0] += t
        else:
            out.append([t, w])
    return [(t, w) for t, w in out]


PIECES = [
    "a", "red", "cat", "sky", "masterpiece", " ", "  ", ", ", ",", ".", "\n", "\t",
    "(", "(", ")", ")", "[", "]", "((", "))", ":", ": ", ":1.3)", ": 0.5 )", ":-1)", ":+.5)",
    ":2)", ":0)", ":1.)", ":\u0663)", ":1.2.3)", ":.)", ":x)", "\\(", "\\)", "\\[", "\\]",
    "\\\\", "\\", "\\a", "BREAK", " BREAK ", "BREAKs", "xBREAK", "_BREAK", "BREAK_", "é",
    "BREAK\n", "break", "1", "-", "+",
]  # fmt: skip


def _generated_prompts(n: int, seed: int = 17) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randint(0, 24))) for _ in range(n)]


def test_reference_agrees_on_doctests():
    for text, expected in A1111_DOCTESTS:
        assert reference_parse(text) == expected


@pytest.mark.parametrize("chunk", range(4))
def test_generated_prompts_match_reference(chunk):
    prompts = _generated_prompts(400)[chunk * 100 : (chunk + 1) * 100]
    checked = 0
    for text in prompts:
        try:
            expected = reference_parse(text)
        except ValueError:
            with pytest.raises(RequestError):
                parse_emphasis(text)
            continue
        assert parse_emphasis(text) == expected, text
        checked += 1
    assert checked >= 60  # most generated prompts have valid weights


def test_generated_prompts_cover_the_rules():
    pairs, invalid = [], 0
    for text in _generated_prompts(400):
        try:
            pairs += reference_parse(text)
        except ValueError:
            invalid += 1
    assert invalid > 0
    assert any(p == BREAK for p in pairs)
    assert any(w not in (1.0, -1.0) and w > 1.2 for _, w in pairs)  # nesting
    assert any(0 < w < 1 for _, w in pairs)
    assert any(w < 0 and p != "BREAK" for p, w in pairs)


# -- chunking --------------------------------------------------------------------------------

COMMA = 267


def _words(n: int, start: int = 1000) -> str:
    return " ".join(f"w{start + i}" for i in range(n))


def _fake_tokenize(text: str) -> list[int]:
    """'wN' -> N, ',' -> COMMA; everything else is no token."""
    return [COMMA if w == "," else int(w[1:]) for w in re.findall(r"w\d+|,", text)]


def _chunks(text: str, pad: int = EOS, emphasis: bool = True) -> PromptChunks:
    parsed = parse_emphasis(text) if emphasis else [(text, 1.0)]
    return chunk_prompt(parsed, _fake_tokenize, bos_id=BOS, eos_id=EOS, pad_id=pad, comma_id=COMMA)


def _text_tokens(chunk_ids: np.ndarray) -> list[int]:
    ids = list(chunk_ids[1:-1])
    while ids and ids[-1] in (EOS, 0):
        ids.pop()
    return ids


def test_short_prompt_is_one_chunk():
    c = _chunks(_words(5))
    assert c.ids.shape == (1, 77) and c.weights.shape == (1, 77)
    assert c.ids.dtype == np.int32 and c.weights.dtype == np.float32
    assert list(c.ids[0, :7]) == [BOS, 1000, 1001, 1002, 1003, 1004, EOS]
    assert (c.ids[0, 6:] == EOS).all() and (c.weights == 1).all()
    assert c.token_count == 5


def test_empty_prompt_is_one_padding_chunk():
    c = _chunks("")
    assert list(c.ids[0]) == [BOS] + [EOS] * 76
    assert np.array_equal(c.ids, empty_chunk(BOS, EOS, EOS).ids)


def test_150_tokens_make_two_full_chunks():
    c = _chunks(_words(150))
    assert c.num_chunks == 2 and c.token_count == 150
    assert _text_tokens(c.ids[0]) == list(range(1000, 1075))
    assert _text_tokens(c.ids[1]) == list(range(1075, 1150))
    assert c.ids[0, 0] == BOS and c.ids[0, 76] == EOS


@pytest.mark.parametrize(
    "comma_at, first_len",
    [(55, 56), (60, 61), (74, 75), (54, 75)],  # 75 - 55 = 20 is within reach, 21 is not
)
def test_comma_backtrack(comma_at, first_len):
    tokens = [f"w{1000 + i}" for i in range(90)]
    tokens[comma_at] = ","
    c = _chunks(" ".join(tokens))
    first = _text_tokens(c.ids[0])
    assert len(first) == first_len
    assert first + _text_tokens(c.ids[1]) == _fake_tokenize(" ".join(tokens))


def test_comma_arriving_at_a_full_chunk_starts_the_next():
    c = _chunks(_words(75) + " , " + _words(3, 5000))
    assert len(_text_tokens(c.ids[0])) == 75
    assert _text_tokens(c.ids[1]) == [COMMA, 5000, 5001, 5002]


def test_break_starts_a_chunk():
    c = _chunks("w1 w2 BREAK w3")
    assert c.num_chunks == 2
    assert _text_tokens(c.ids[0]) == [1, 2] and _text_tokens(c.ids[1]) == [3]
    assert _chunks("w1 BREAK").num_chunks == 1  # nothing after it: no empty chunk
    assert _chunks("w1 BREAK w2", emphasis=False).num_chunks == 1  # --no-emphasis: a word


def test_weights_follow_their_tokens():
    c = _chunks("w1 (w2 w3:1.5) [w4]")
    assert list(c.ids[0, :6]) == [BOS, 1, 2, 3, 4, EOS]
    np.testing.assert_array_equal(c.weights[0, :6], np.float32([1, 1, 1.5, 1.5, 1 / 1.1, 1]))
    assert (c.weights[0, 6:] == 1).all()


def test_sd2_padding_after_the_first_eos():
    c = _chunks("w1 w2", pad=0)
    assert list(c.ids[0, :5]) == [BOS, 1, 2, EOS, 0] and (c.ids[0, 4:] == 0).all()
    assert list(empty_chunk(BOS, EOS, 0).ids[0, :3]) == [BOS, EOS, 0]


def test_chunking_invariants_on_generated_prompts():
    rng = random.Random(3)
    for _ in range(200):
        words = [
            rng.choice([",", f"w{rng.randint(1, 900)}", "BREAK", "(w7", "w8)"])
            for _ in range(rng.randint(0, 260))
        ]
        text = " ".join(words)
        parsed = parse_emphasis(text)
        c = chunk_prompt(parsed, _fake_tokenize, bos_id=BOS, eos_id=EOS, pad_id=EOS, comma_id=COMMA)
        stream = [t for p, w in parsed if (p, w) != BREAK for t in _fake_tokenize(p)]
        got = [t for row in c.ids for t in _text_tokens(row)]
        assert got == stream  # nothing lost, nothing reordered
        assert c.ids.shape[1] == CHUNK_LENGTH + 2
        assert (c.ids[:, 0] == BOS).all() and (c.ids[:, -1] == EOS).all()
        for row in c.ids[:-1]:
            n = len(_text_tokens(row))
            # a chunk ends full, after a comma within the last 20, or at a BREAK
            assert (
                n == CHUNK_LENGTH or (n > 0 and _text_tokens(row)[-1] == COMMA) or ("BREAK" in text)
            )
            assert n >= CHUNK_LENGTH - 20 or "BREAK" in text


def test_real_tokenizer_long_prompt(tmp_path):
    from sd_deploy.runtime.tokenizer import CLIPTokenizer, write_clip_tokenizer_files

    write_clip_tokenizer_files(tmp_path)
    tok = CLIPTokenizer.from_dir(tmp_path)
    comma = tok._encoder[",</w>"]
    assert comma == COMMA
    text = ", ".join(["a red circle on a blue square"] * 20)  # 7 words + comma each: 159 tokens
    c = chunk_prompt(
        parse_emphasis(text), tok._text_ids, bos_id=BOS, eos_id=EOS, pad_id=EOS, comma_id=comma
    )
    assert c.num_chunks == 3
    # breaks fall after a comma: the first chunk ends with one
    assert _text_tokens(c.ids[0])[-1] == comma
    assert sum(len(_text_tokens(r)) for r in c.ids) == tok.count_tokens(text)


# -- weighting and encoding ------------------------------------------------------------------


def test_apply_weights_keeps_each_rows_mean():
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((2, 77, 16)).astype(np.float32) + 0.3
    weights = np.ones((2, 77), np.float32)
    weights[0, 3:6] = 1.3
    out = apply_weights(hidden, weights)
    np.testing.assert_allclose(out[0].mean(), hidden[0].mean(), rtol=1e-5)
    np.testing.assert_array_equal(out[1], hidden[1])  # all-ones row untouched
    scale = hidden[0].mean() / (hidden[0] * weights[0][:, None]).mean()
    np.testing.assert_allclose(out[0], hidden[0] * weights[0][:, None] * scale, rtol=1e-5)
    assert out.dtype == np.float32


def test_encode_chunks_concatenates_along_the_sequence():
    calls = []

    def encode(ids):
        calls.append(ids.shape)
        return np.repeat(ids[:, :, None].astype(np.float32), 4, axis=2)

    pos = _chunks(_words(150))
    neg = pad_chunks(_chunks("w1"), pos.num_chunks, empty_chunk(BOS, EOS, EOS))
    assert neg.num_chunks == 2 and list(neg.ids[1]) == [BOS] + [EOS] * 76
    context = encode_chunks([neg, pos], encode)
    assert context.shape == (2, 154, 4)
    assert calls == [(2, 77), (2, 77)]
    np.testing.assert_array_equal(context[1, 77:, 0], pos.ids[1])
    with pytest.raises(ValueError, match="chunk counts"):
        encode_chunks([_chunks("w1"), pos], encode)


def test_truncated_keeps_leading_chunks():
    c = _chunks(_words(300))
    assert c.num_chunks == 4
    t = c.truncated(3)
    assert t.num_chunks == 3 and t.token_count == 225
    assert c.truncated(5) is c


# -- PromptEncoder ---------------------------------------------------------------------------


def _encoder(**kw):
    from sd_deploy.runtime.prompts import PromptEncoder

    return PromptEncoder(_fake_tokenize, bos_id=BOS, eos_id=EOS, pad_id=EOS, comma_id=COMMA, **kw)


def _fake_text_encoder(ids: np.ndarray) -> np.ndarray:
    return np.stack([ids.astype(np.float32) / 1000.0 + k for k in range(4)], axis=2)


def test_prompt_encoder_long_prompt_context():
    enc = _encoder(max_chunks=3)
    context = enc.context([_words(150)], _fake_text_encoder, negative_prompts=["w1"])
    assert context.shape == (2, 154, 4)
    # the negative's second chunk is the empty prompt's
    np.testing.assert_array_equal(context[0, 77:, 0] * 1000.0, [BOS] + [EOS] * 76)
    assert enc.num_chunks([_words(150), "w1"]) == 2


def test_prompt_encoder_truncates_to_max_chunks(caplog):
    enc = _encoder(max_chunks=1)
    with caplog.at_level("WARNING", logger="sd_deploy"):
        context = enc.context([_words(150)], _fake_text_encoder)
    assert context.shape == (1, 77, 4)
    assert "needs 2 chunks" in caplog.text and "prompt 0" in caplog.text


def test_prompt_encoder_emphasis_switch():
    weighted = _encoder().context(["w1 (w2:1.5) w3"], _fake_text_encoder)
    plain = _encoder(emphasis=False).context(["w1 (w2:1.5) w3"], _fake_text_encoder)
    reference = _encoder().context(["w1 w2 w3"], _fake_text_encoder)
    np.testing.assert_array_equal(plain, reference)  # brackets are no tokens to the fake
    assert not np.array_equal(weighted, reference)
    np.testing.assert_allclose(weighted.mean(), reference.mean(), rtol=1e-5)
