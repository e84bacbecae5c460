"""Mutations: plain bytes, JSON documents (any leaf, any type), safetensors headers, pickles.

Each structured mutator falls back to byte mutation when its input does not parse, so a
target's corpus may hold anything. Atheris mixes these with its own (coverage-guided)
mutations through a custom mutator; the seeded random driver of the CI smoke uses them alone.
"""

from __future__ import annotations

import io
import json
import math
import pickletools
import random
import struct
import zipfile
from typing import Any

INTERESTING_INTS = [
    0, 1, -1, 2, 3, 7, 8, 64, 77, 255, 256, 65535, 2**31 - 1, 2**31, -(2**31), 2**32,
    2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**12, -(10**12), 10**40,
]  # fmt: skip
INTERESTING_FLOATS = [0.0, -0.0, 0.5, -1.5, 1e-30, 1e30, 1e308, -1e308, math.inf, -math.inf]
INTERESTING_STRINGS = [
    "", "x", "fp16", "fp32", "float16", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3",
    "epsilon", "v_prediction", "sd15", "tiny", "unet", "text_encoder", "vae_decoder",
    "../../etc/passwd", "/", "\x00", "\ud800", "é" * 3, "A" * 5000, "NaN", "1e999", "-1",
    "[]", "{}", "null",
]  # fmt: skip


def mutate_bytes(data: bytes, rng: random.Random, max_size: int = 1 << 20) -> bytes:
    """A few random edits: flips, interesting bytes and numbers, inserts, deletes, copies."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 5))):
        op = rng.randrange(8)
        n = len(buf)
        if n == 0 or op == 0:  # insert random bytes
            pos = rng.randint(0, n)
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 1:  # bit flip
            pos = rng.randrange(n)
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 2:  # random byte
            buf[rng.randrange(n)] = rng.choice((0, 0xFF, 0x7F, 0x80, ord("{"), ord('"'), 0x0A))
        elif op == 3:  # delete a run
            pos = rng.randrange(n)
            del buf[pos : pos + rng.randint(1, 16)]
        elif op == 4:  # copy a run elsewhere
            pos, length = rng.randrange(n), rng.randint(1, 32)
            chunk = buf[pos : pos + length]
            at = rng.randint(0, n)
            buf[at:at] = chunk
        elif op == 5:  # overwrite with a little-endian interesting integer
            value = rng.choice(INTERESTING_INTS) % (1 << 64)
            width = rng.choice((1, 2, 4, 8))
            pos = rng.randrange(n)
            buf[pos : pos + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
        elif op == 6:  # replace an ASCII digit run by an interesting number
            digits = [i for i in range(n) if 48 <= buf[i] <= 57]
            if digits:
                start = end = rng.choice(digits)
                while end < n and 48 <= buf[end] <= 57:
                    end += 1
                buf[start:end] = str(rng.choice(INTERESTING_INTS)).encode()
        else:  # truncate
            del buf[rng.randint(0, n) :]
    return bytes(buf[:max_size])


def random_json_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 2 else 5)
    if kind == 0:
        return rng.choice(INTERESTING_INTS)
    if kind == 1:
        return rng.choice(INTERESTING_FLOATS)
    if kind == 2:
        return rng.choice(INTERESTING_STRINGS)
    if kind == 3:
        return rng.choice((None, True, False))
    if kind == 4:
        return rng.choice(([], {}, [0], [1, 2, 3], [-1, 0, 1]))
    if kind == 5:
        return [random_json_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(INTERESTING_STRINGS[:12]): random_json_value(rng, depth + 1)}


def _nodes(value: Any, path: tuple = ()) -> list[tuple]:
    """Every path into a JSON value (the root is ())."""
    out = [path]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _nodes(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:64]):
            out += _nodes(v, (*path, i))
    return out


def _get(value: Any, path: tuple) -> Any:
    for p in path:
        value = value[p]
    return value


def mutate_json_value(doc: Any, rng: random.Random) -> Any:
    """One structural edit of a JSON value: a leaf replaced (any type, or another node of the
    same document), a key deleted, renamed or added, a list element dropped or duplicated, a
    number nudged; strings that hold JSON (safetensors metadata) are edited inside."""
    paths = _nodes(doc)
    path = rng.choice(paths)
    node = _get(doc, path)
    if isinstance(node, str) and node[:1] in "{[" and rng.random() < 0.7:
        try:
            inner = json.loads(node)
        except ValueError:
            inner = None
        if inner is not None:
            return _replace(doc, path, json.dumps(mutate_json_value(inner, rng)))
    op = rng.randrange(7)
    if op == 0 and path:
        return _delete(doc, path)
    if op == 1 and isinstance(node, dict):
        node = dict(node)
        node[rng.choice([*node, *INTERESTING_STRINGS[:12]])] = random_json_value(rng)
        return _replace(doc, path, node)
    if op == 2 and isinstance(node, list) and node:
        node = list(node)
        i = rng.randrange(len(node))
        node.insert(i, node[i]) if rng.random() < 0.5 else node.pop(i)
        return _replace(doc, path, node)
    if op == 3 and isinstance(node, int | float) and not isinstance(node, bool):
        delta = rng.choice((1, -1, 2, -2, 7, 8, 64, 77))
        value = node + delta if rng.random() < 0.7 else node * rng.choice((-1, 2, 1000, 0))
        return _replace(doc, path, value)
    if op == 4:
        return _replace(doc, path, _get(doc, rng.choice(paths)))  # splice within the doc
    if op == 5 and isinstance(node, str):
        return _replace(doc, path, node + rng.choice(INTERESTING_STRINGS) if node else "x")
    return _replace(doc, path, random_json_value(rng))


def _replace(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    doc = json.loads(json.dumps(doc))  # a copy (documents are small)
    _get(doc, path[:-1])[path[-1]] = value
    return doc


def _delete(doc: Any, path: tuple) -> Any:
    doc = json.loads(json.dumps(doc))
    parent = _get(doc, path[:-1])
    del parent[path[-1]]
    return doc


def mutate_json(data: bytes, rng: random.Random) -> bytes:
    """A JSON document edited structurally (1-3 edits), or bytes-mutated when it is not JSON."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return mutate_bytes(data, rng)
    for _ in range(rng.choice((1, 1, 2, 3))):
        doc = mutate_json_value(doc, rng)
    text = json.dumps(doc, indent=rng.choice((None, 2)))
    return text.encode("utf-8", "surrogatepass")


def mutate_safetensors(data: bytes, rng: random.Random) -> bytes:
    """Edit the JSON header (dtypes, shapes, offsets, metadata), keep or break its length."""
    if len(data) < 8 or rng.random() < 0.15:
        return mutate_bytes(data, rng)
    (n,) = struct.unpack("<Q", data[:8])
    header, body = data[8 : 8 + n], data[8 + n :]
    new = mutate_json(header, rng)
    if rng.random() < 0.1:
        body = body[: rng.randint(0, len(body))]
    length = len(new) if rng.random() < 0.9 else rng.choice(INTERESTING_INTS) % (1 << 64)
    return struct.pack("<Q", length) + new + body


def mutate_pickle(data: bytes, rng: random.Random) -> bytes:
    """Overwrite the integer arguments of pickle opcodes (sizes, offsets, strides, lengths)."""
    try:
        ops = [
            (op.name, pos)
            for op, _arg, pos in pickletools.genops(data)
            if op.name in ("BININT", "BININT1", "BININT2", "LONG1")
        ]
    except Exception:
        return mutate_bytes(data, rng)
    if not ops:
        return mutate_bytes(data, rng)
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3))):
        name, pos = rng.choice(ops)
        value = rng.choice(INTERESTING_INTS)
        if name == "BININT":
            buf[pos + 1 : pos + 5] = struct.pack("<I", value % (1 << 32))
        elif name == "BININT1":
            buf[pos + 1] = value % 256
        elif name == "BININT2":
            buf[pos + 1 : pos + 3] = struct.pack("<H", value % (1 << 16))
        else:  # LONG1: length byte then that many bytes; keep the length
            length = buf[pos + 1]
            if length:
                buf[pos + 2 : pos + 2 + length] = (value % (1 << (8 * length))).to_bytes(
                    length, "little"
                )
    return bytes(buf)


def mutate_torch_zip(data: bytes, rng: random.Random) -> bytes:
    """A torch.save zip with one member edited (data.pkl's integers, or any member's bytes)."""
    if data[:4] != b"PK\x03\x04" or rng.random() < 0.15:
        return mutate_pickle(data, rng) if data[:1] == b"\x80" else mutate_bytes(data, rng)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            members = [(info, zf.read(info)) for info in zf.infolist()]
    except Exception:
        return mutate_bytes(data, rng)
    if not members:
        return mutate_bytes(data, rng)
    pickles = [i for i, (info, _) in enumerate(members) if info.filename.endswith(".pkl")]
    i = rng.choice(pickles) if pickles and rng.random() < 0.7 else rng.randrange(len(members))
    info, content = members[i]
    if info.filename.endswith(".pkl"):
        members[i] = (info, mutate_pickle(content, rng))
    else:
        members[i] = (info, mutate_bytes(content, rng))
    if rng.random() < 0.05:
        members.pop(rng.randrange(len(members)))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for info, content in members:
            zf.writestr(info, content)
    return out.getvalue()


def mutate_text(data: bytes, rng: random.Random, alphabet: str) -> bytes:
    """Text edits: insert characters from `alphabet` (syntax) or any codepoint, delete,
    duplicate; bytes mutation now and then (invalid UTF-8 included)."""
    if rng.random() < 0.15:
        return mutate_bytes(data, rng)
    text = data.decode("utf-8", "surrogateescape")
    for _ in range(rng.choice((1, 2, 3, 6))):
        pos = rng.randint(0, len(text))
        op = rng.randrange(5)
        if op == 0:
            piece = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))
        elif op == 1:
            piece = chr(rng.choice((rng.randrange(0x80), rng.randrange(0x110000))))
        elif op == 2:
            text = text[:pos] + text[pos + rng.randint(1, 10) :]
            continue
        elif op == 3:
            piece = text[pos : pos + rng.randint(1, 40)] * rng.choice((2, 10, 100))
        else:
            piece = rng.choice(INTERESTING_STRINGS[:30])
        text = text[:pos] + piece + text[pos:]
    return text.encode("utf-8", "surrogatepass")[: 1 << 18]
