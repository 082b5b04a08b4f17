"""The mutations tests/fuzzing.py hands to the readers: of GGUF headers (every field of a valid file's
header located first, then counts, lengths, value types, tensor shapes, types and offsets changed, bytes
flipped, spliced or cut), safetensors files, JSON documents and texts. Each returns the mutated bytes and
the operations done (to name a finding's case). Also the GGUF holding a key of every value type.
"""
from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType

def broken_json(doc, rng: random.Random) -> tuple[bytearray, int]:
    """`doc` as JSON with one byte changed or the text cut there; the bytes and the position."""
    raw = bytearray(json.dumps(doc).encode())
    at = rng.randrange(len(raw))
    if rng.random() < 0.5:
        raw[at] = rng.randrange(256)
    else:
        del raw[at:]
    return raw, at


def kitchen_sink(path: Path) -> Path:
    """A GGUF holding a key of every value type, arrays of each, and tensors of three types."""
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    scalars = {gguf.GGUFValueType.UINT8: 7, gguf.GGUFValueType.INT8: -7, gguf.GGUFValueType.UINT16: 700,
               gguf.GGUFValueType.INT16: -700, gguf.GGUFValueType.UINT32: 70000, gguf.GGUFValueType.INT32: -70000,
               gguf.GGUFValueType.FLOAT32: 0.5, gguf.GGUFValueType.BOOL: True, gguf.GGUFValueType.UINT64: 2**40,
               gguf.GGUFValueType.INT64: -(2**40), gguf.GGUFValueType.FLOAT64: 0.25, gguf.GGUFValueType.STRING: "value"}
    for vtype, value in scalars.items():
        w.add_key_value(f"fuzz.{vtype.name.lower()}", value, vtype)
        sub = [value] * 3 if vtype != gguf.GGUFValueType.STRING else ["a", "bc", "def"]
        w.add_key_value(f"fuzz.{vtype.name.lower()}s", sub, gguf.GGUFValueType.ARRAY, vtype)
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.standard_normal((4, 32), dtype=np.float32))
    w.add_tensor("b.weight", rng.standard_normal((2, 32), dtype=np.float32).astype(np.float16))
    q = gguf.quants.quantize(rng.standard_normal((2, 64), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("c.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------- GGUF mutations

_SIZES = {vtype: np.dtype(t).itemsize for vtype, t in GGUFReader.gguf_scalar_to_np.items()}  # bytes of a number


def gguf_fields(data: bytes) -> tuple[list[tuple[int, int, str]], int]:
    """(offset, width, kind) of the fields of a valid GGUF header, and where its tensor infos end."""
    fields = [(4, 4, "version"), (8, 8, "count"), (16, 8, "count")]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def u(fmt: str, kind: str) -> int:
        nonlocal pos
        fields.append((pos, struct.calcsize(fmt), kind))
        pos += struct.calcsize(fmt)
        return struct.unpack_from(fmt, data, pos - struct.calcsize(fmt))[0]

    def string() -> None:
        nonlocal pos
        n = u("<Q", "length")
        pos += n

    for _ in range(n_kv):
        string()
        vtype = u("<I", "type")
        if vtype == GGUFValueType.ARRAY:
            sub, n = u("<I", "type"), u("<Q", "count")
            for i in range(n):
                if sub == GGUFValueType.STRING:
                    string()
                elif i < 3:
                    fields.append((pos, _SIZES[sub], "number"))
                    pos += _SIZES[sub]
                else:
                    pos += _SIZES[sub]
        elif vtype == GGUFValueType.STRING:
            string()
        else:
            fields.append((pos, _SIZES[vtype], "number"))
            pos += _SIZES[vtype]
    for _ in range(n_tensors):
        string()
        for _ in range(u("<I", "ndims")):
            u("<Q", "dim")
        u("<I", "ttype")
        u("<Q", "offset")
    return fields, pos


def _interesting(rng: random.Random, old: int, width: int, size: int) -> int:
    bits = 8 * width
    pick = rng.choice([0, 1, 2, 3, 4, 8, 255, 256, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**60,
                       2**63 - 1, 2**63, 2**64 - 1, old + 1, old - 1, old * 2, old // 2, size, rng.getrandbits(bits),
                       rng.randrange(64)])
    return pick % (1 << bits)


def mutate_gguf(data: bytes, rng: random.Random, data_bias: float = 0.3) -> tuple[bytes, list[str]]:
    """1-3 mutations of a valid GGUF: header fields, bytes, splices, and a cut (in the data or header)."""
    fields, header_end = gguf_fields(data)
    kinds = sorted({k for _, _, k in fields})
    buf, ops = bytearray(data), []
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
        op = rng.choices(["field", "flip", "splice", "cut", "magic", "nan"], [60, 12, 6, 18, 1, 3])[0]
        if op == "field":
            kind = rng.choices(kinds, [1 if k == "version" else 10 for k in kinds])[0]
            off, width, _ = rng.choice([f for f in fields if f[2] == kind])
            if off + width > len(buf):
                continue
            old = int.from_bytes(buf[off:off + width], "little")
            if kind == "type":
                new = rng.choice([*range(14), 2**31, 2**32 - 1])
            elif kind == "ttype":
                new = rng.choice([*range(42), 2**32 - 1])
            else:
                new = _interesting(rng, old, width, len(data))
            buf[off:off + width] = (new % (1 << 8 * width)).to_bytes(width, "little")
            ops.append(f"{kind}@{off}:{old}->{new}")
        elif op == "flip":
            at = rng.randrange(8, max(9, min(header_end, len(buf))))
            if at >= len(buf):
                continue
            buf[at] ^= rng.randrange(1, 256)
            ops.append(f"flip@{at}")
        elif op == "splice":
            a = rng.randrange(8, max(9, min(header_end, len(buf))))
            n = rng.randrange(1, 64)
            if rng.random() < 0.5:
                del buf[a:a + n]
                ops.append(f"delete@{a}+{n}")
            else:
                buf[a:a] = buf[a:a + n]
                ops.append(f"repeat@{a}+{n}")
        elif op == "cut":
            he = min(header_end, len(buf))
            at = rng.randrange(he, len(buf)) if rng.random() < data_bias and len(buf) > he else rng.randrange(0, he)
            del buf[at:]
            ops.append(f"cut@{at}")
        elif op == "magic":
            buf[rng.randrange(8)] ^= rng.randrange(1, 256)
            ops.append("magic")
        elif op == "nan" and len(buf) > header_end + 4:
            at = rng.randrange(header_end, len(buf) - 4) // 4 * 4
            buf[at:at + 4] = struct.pack("<f", rng.choice([float("nan"), float("inf"), -float("inf")]))
            ops.append(f"nan@{at}")
    return bytes(buf), ops


# ---------------------------------------------------------------- safetensors, JSON and text mutations

WEIRD = [None, 0, -1, 1, 2**31, 2**62, 2**64, 10**30, 1.5, -0.5, float("inf"), "", "64", "x" * 300, [], [1, 2],
         {}, {"a": 1}, True, False]


def mutate_safetensors(data: bytes, rng: random.Random) -> tuple[bytes, list[str]]:
    """A safetensors file with its header length, an entry (dtype, shape, offsets, name), its metadata,
    its JSON bytes or its data mutated."""
    n = struct.unpack_from("<Q", data)[0]
    header, body = json.loads(data[8:8 + n]), bytearray(data[8 + n:])
    names = sorted(k for k in header if k != "__metadata__")
    ops, raw_len, raw = [], None, None
    for _ in range(rng.choice([1, 1, 2, 3])):
        op = rng.choices(["entry", "drop", "rename", "alias", "meta", "hlen", "json", "cut", "nan"],
                         [40, 6, 6, 5, 6, 10, 5, 12, 5])[0]
        name = rng.choice(names)
        entry = header.get(name)
        if op == "entry" and isinstance(entry, dict):
            field = rng.choice(["dtype", "shape", "data_offsets"])
            offsets, shape = entry.get("data_offsets"), entry.get("shape")
            a, b = offsets if isinstance(offsets, list) and len(offsets) == 2 and all(
                type(x) is int for x in offsets) else (0, 0)
            shape = shape if isinstance(shape, list) and shape and all(type(x) is int for x in shape) else [1]
            typed = {"dtype": ["F16", "BF16", "F64", "I8", "U8", "BOOL", "I64", "F8_E4M3", "F32", "XYZ"],
                     "shape": [[], [0], [2**62, 2**62], [2**63, 2], shape + [1], shape[::-1], [shape[0] * 2, *shape[1:]],
                               [shape[0] // 2, *shape[1:]], [1] * 9, [2**31, 2**31, 2**31], [shape[0], 0]],
                     "data_offsets": [[b, a], [a, a], [a, 2**63], [a, b + 1], [max(a - 1, 0), b], [0, len(body)],
                                      [a + 2**40, b + 2**40], [a, b + len(body)], [a + 4, b + 4]]}[field]
            untyped = [None, "x", 1.5, [-1], [a], {"a": 1}]  # the wrong JSON types (a fifth of the cases)
            entry[field] = rng.choice(untyped) if rng.random() < 0.2 else rng.choice(typed)
            ops.append(f"{field}:{name}={str(entry[field])[:40]}")
        elif op == "drop":
            header.pop(name, None)
            ops.append(f"drop:{name}")
        elif op == "rename":
            header[rng.choice(["model.layers.7.mlp.up_proj.weight", "x", "", "model.norm.weight"])] = header.pop(
                name, {})
            ops.append(f"rename:{name}")
        elif op == "alias":
            header[f"{name}.copy"] = dict(entry) if isinstance(entry, dict) else entry
            ops.append(f"alias:{name}")
        elif op == "meta":
            header["__metadata__"] = rng.choice([{"format": 1}, [], "x", {"a": {"b": 1}}, None, {"format": "tf"}])
            ops.append("meta")
        elif op == "hlen":
            raw_len = rng.choice([0, 1, 7, n - 1, n + 1, 2**63, 2**64 - 1, len(data), len(data) - 7, 100_000_001,
                                  rng.getrandbits(64)])
            ops.append(f"hlen={raw_len}")
        elif op == "json":
            raw, at = broken_json(header, rng)
            ops.append(f"json@{at}")
        elif op == "cut":
            at = rng.randrange(len(body))
            del body[at:]
            ops.append(f"cut@{at}")
        elif op == "nan" and len(body) >= 4:
            at = rng.randrange(len(body) - 4) // 4 * 4
            body[at:at + 4] = struct.pack("<f", float("nan"))
            ops.append(f"nan@{at}")
    text = bytes(raw) if raw is not None else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", (raw_len if raw_len is not None else len(text)) % 2**64) + text + bytes(body), ops


def _walk(node, rng: random.Random, depth: int = 0):
    """A random (container, key) inside a JSON tree."""
    if isinstance(node, dict) and node:
        key = rng.choice(list(node))
    elif isinstance(node, list) and node:
        key = rng.randrange(len(node))
    else:
        return None
    if isinstance(node[key], (dict, list)) and node[key] and rng.random() < 0.7 and depth < 8:
        return _walk(node[key], rng, depth + 1) or (node, key)
    return node, key


def mutate_json(text: str, rng: random.Random, keys: list[str] | None = None) -> tuple[bytes, list[str]]:
    """A JSON document with values of wrong types or sizes, keys gone, or its syntax broken.
    `keys`: top-level keys to prefer (config sizes), each scaled or replaced."""
    doc, ops = json.loads(text), []
    for _ in range(rng.choice([1, 1, 2, 3])):
        op = rng.choices(["key", "walk", "delete", "syntax", "top", "deep", "nan"], [45 if keys else 0, 30, 8, 8, 3, 2, 4])[0]
        if op == "key" and isinstance(doc, dict):
            key = rng.choice(keys)
            old = doc.get(key)
            scaled = [old * 2, old + 1, old - 1, old // 2, -old] if isinstance(old, int) and not isinstance(old, bool) else []
            doc[key] = rng.choice(WEIRD + scaled * 4)
            ops.append(f"{key}={str(doc[key])[:40]}")
        elif op == "walk":
            spot = _walk(doc, rng)
            if spot:
                spot[0][spot[1]] = rng.choice(WEIRD)
                ops.append(f"walk:{spot[1]}={str(spot[0][spot[1]])[:40]}")
        elif op == "delete":
            spot = _walk(doc, rng)
            if spot and isinstance(spot[0], dict):
                del spot[0][spot[1]]
                ops.append(f"delete:{spot[1]}")
        elif op == "top":
            doc = rng.choice([[], "x", None, 1, [doc]])
            ops.append("top")
        elif op == "deep":
            return b"[" * 100_000 + b"]" * 100_000, ["deep"]
        elif op == "nan":
            return json.dumps(doc).replace("32", "NaN", 1).encode(), ["NaN"]
        elif op == "syntax":
            raw, at = broken_json(doc, rng)
            return bytes(raw), [*ops, f"syntax@{at}"]
    return json.dumps(doc).encode(), ops


def mutate_text(data: bytes, rng: random.Random, jsonl: bool) -> tuple[bytes, list[str]]:
    """Calibration or training text: binary, empty, one token, huge lines, bad UTF-8, broken JSON lines."""
    op = rng.choices(["empty", "space", "binary", "nul", "utf8", "one", "huge", "repeat", "cut", "utf16", "bom",
                      "line"], [5, 5, 8, 6, 8, 8, 4, 5, 15, 4, 4, 26 if jsonl else 8])[0]
    if op == "empty":
        return b"", [op]
    if op == "space":
        return b" \n\t\r\n" * rng.randrange(1, 100), [op]
    if op == "binary":
        return rng.randbytes(rng.randrange(1, 70_000)), [op]
    if op == "nul":
        at = rng.randrange(len(data))
        return data[:at] + b"\x00" + data[at:], [op]
    if op == "utf8":
        at = rng.randrange(len(data))
        return data[:at] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]) + data[at:], [op]
    if op == "one":
        return (json.dumps({"text": "a"}) + "\n").encode() if jsonl else b"a", [op]
    if op == "huge":
        line = ("word " * rng.randrange(100_000, 400_000)).strip()  # a line of 0.5-2 MB
        return (json.dumps({"text": line}) + "\n").encode() if jsonl else line.encode(), [op]
    if op == "repeat":
        return data * rng.randrange(2, 20), [op]
    if op == "cut":
        return data[:rng.randrange(len(data))], [op]
    if op == "utf16":
        return data.decode("utf-8").encode("utf-16"), [op]
    if op == "bom":
        return b"\xef\xbb\xbf" + data, [op]
    lines = data.splitlines(keepends=True)
    i = rng.randrange(len(lines))
    lines[i] = rng.choice([b"{\n", b"[1, 2]\n", b'"text"\n', b'{"text": 5}\n', b'{"text": null}\n', b"null\n",
                           b'{"txt": "x"}\n', b'{"text": ["a"]}\n', b'{"text": "' + b"x" * 70_000 + b'"}\n',
                           b"[" * 50_000 + b"]" * 50_000 + b"\n", b'{"text": "\\ud800"}\n'])
    return b"".join(lines), [f"line{i}"]
