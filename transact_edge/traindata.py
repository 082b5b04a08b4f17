"""Recovery-training data that scales: streamed sources, weighted mixtures, a held-apart validation slice.

`--train-data SPEC` names one source or a mixture, `wiki@1,generated@3` (weights are relative
shares of windows). A source is what `--calib` accepts — `wiki` (the shipped pages), a `.txt` file,
a `.jsonl` file with a "text" field, a `datasets.save_to_disk` directory — or `generated`: text
sampled from the teacher (generate.py), stored as a token file. Files are read as they are needed,
a batch of documents at a time from a byte offset (or row index), so a multi-GB `.jsonl` is never
held whole; windows are shuffled within blocks of about a million tokens (a small corpus is
reshuffled whole every epoch); when a source runs out it starts again (an epoch), and the epochs
each source was read are counted as it streams. Each stream's state (block position, place in it,
epoch) is small JSON, so a run resumes exactly where it stopped, across shots and inside one.

The validation slice is the first windows of the first source: they are read before training starts
and skipped on every later epoch, so they are held apart from the training data (and, being from
the training split, from the evaluation pages).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from transact_edge import corpus
from transact_edge.errors import UserError

GENERATED = "generated"
DOC_BATCH = 64              # documents tokenized at once
BLOCK_TOKENS = 1 << 20      # windows are shuffled within blocks of about this many tokens
TXT_CHUNK = 1 << 12         # a .txt file is read in chunks of about 4 KiB, cut at a line end


@dataclass(frozen=True)
class Source:
    name: str        # 'wiki', 'generated' or a path
    weight: float


def parse(spec: str) -> list[Source]:
    """`a@w,b@w` -> sources with weights (1 when omitted); every failure is one line."""
    sources = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(.+?)@([0-9.eE+-]+)", part)
        name, weight = (m.group(1), m.group(2)) if m else (part, "1")
        try:
            w = float(weight)
        except ValueError:
            raise UserError(f"--train-data {spec!r}: weight {weight!r} of {name!r} is not a number") from None
        if not name:
            raise UserError(f"--train-data {spec!r}: empty source name (expected e.g. wiki@1,generated@3)")
        if not w > 0:
            raise UserError(f"--train-data {spec!r}: weight of {name!r} must be positive, got {weight}")
        if name not in (corpus.DEFAULT, GENERATED) and not Path(name).exists():
            raise UserError(f"--train-data: {name}: no such file or directory (sources: wiki, generated, "
                            ".txt, .jsonl or a saved dataset directory)")
        if name in [s.name for s in sources]:
            raise UserError(f"--train-data {spec!r}: {name!r} is named twice")
        sources.append(Source(name, w))
    return sources


class Documents(Protocol):
    """Documents from a position; an empty list at the end of the source."""
    def read(self, pos: int, n: int) -> tuple[list[str], int]: ...


class ShippedDocs:
    def __init__(self):
        self.texts = corpus.default_texts("train")

    def read(self, pos: int, n: int) -> tuple[list[str], int]:
        return self.texts[pos:pos + n], min(pos + n, len(self.texts))


class FileDocs:
    """Documents of a file, read from a byte offset; subclasses say where one ends and what it holds."""
    def __init__(self, path: Path):
        self.path = path

    def read(self, pos: int, n: int) -> tuple[list[str], int]:
        texts = []
        with self.path.open("rb") as f:
            f.seek(pos)
            while len(texts) < n:
                raw = self.next_raw(f)
                if not raw:
                    break
                text = self.parse(raw, pos)
                pos += len(raw)
                if text and text.strip():
                    texts.append(text)
        return texts, pos

    def next_raw(self, f) -> bytes:
        raise NotImplementedError

    def parse(self, raw: bytes, at: int) -> str | None:
        raise NotImplementedError


class JsonlDocs(FileDocs):
    """One JSON object with a "text" field per line."""
    def next_raw(self, f) -> bytes:
        return f.readline()

    def parse(self, raw: bytes, at: int) -> str | None:
        if not raw.strip():
            return None
        try:
            text = json.loads(raw)["text"]
        except (ValueError, KeyError, TypeError, RecursionError):
            raise UserError(f"{self.path}: line at byte {at} is not a JSON object with a \"text\" field") from None
        return corpus.json_text(text, f"{self.path}: line at byte {at}")


class TextDocs(FileDocs):
    """Plain UTF-8 text in chunks of about TXT_CHUNK bytes, cut at line ends."""
    def next_raw(self, f) -> bytes:
        chunk = f.read(TXT_CHUNK)
        return chunk + f.readline() if chunk else chunk  # finish the line

    def parse(self, raw: bytes, at: int) -> str | None:
        if b"\x00" in raw:
            raise UserError(f"{self.path}: looks binary; expected UTF-8 text")
        return raw.decode("utf-8", errors="replace")


class DatasetDocs:
    """A `datasets.save_to_disk` directory (memory-mapped Arrow); the position is a row index."""
    def __init__(self, path: Path):
        self.ds = corpus.open_dataset_dir(path)

    def read(self, pos: int, n: int) -> tuple[list[str], int]:
        end = min(pos + n, len(self.ds))
        return [t for t in self.ds[pos:end]["text"] if t and t.strip()], end


def documents(name: str) -> Documents:
    if name == corpus.DEFAULT:
        return ShippedDocs()
    path = Path(name)
    if path.is_dir():
        return DatasetDocs(path)
    return JsonlDocs(path) if path.suffix == ".jsonl" else TextDocs(path)


class TokenStream:
    """Windows of `seq_len` tokens from one source, endlessly (epoch after epoch), shuffled.

    The source is read a block at a time (documents until BLOCK_TOKENS tokens, or its end) and cut
    into windows; a block's windows are served in an order drawn from (seed, epoch, block position).
    A corpus smaller than a block is reshuffled whole every epoch; a larger one is shuffled within
    blocks and never held whole. A block is rebuilt from its position, so the state is a few numbers.
    """

    def __init__(self, name: str, seq_len: int, tokenizer=None, tokens: Path | np.ndarray | None = None,
                 seed: int = 0):
        """Text sources are tokenized with `tokenizer` as they stream; `tokens` (a .npy file, memory-mapped,
        or an array) are read as they are."""
        self.name, self.seq_len, self.seed = name, seq_len, seed
        self.tokenizer = tokenizer
        self.docs = None if tokens is not None else documents(name)
        self.tokens = np.load(tokens, mmap_mode="r") if isinstance(tokens, Path) else tokens
        self.eos = [] if tokenizer is None or tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        self.state = {"block": 0, "i": 0, "start": 0, "epoch": 0, "tokens": 0, "epoch_tokens": 0,
                      "source_tokens": None}
        self._cached: tuple | None = None  # ((block, epoch), windows, next block)

    def _read(self, pos: int, need: int, docs: int) -> tuple[np.ndarray, int]:
        """At least `need` tokens from `pos` on (fewer at the end of the source) and the position after them."""
        if self.tokens is not None:
            end = min(pos + need, len(self.tokens))
            return np.asarray(self.tokens[pos:end], dtype=np.int64), end
        parts, got = [], 0
        while got < need:
            texts, nxt = self.docs.read(pos, docs)
            if nxt == pos:
                break
            pos = nxt
            for doc in self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []:
                parts.append(np.asarray(doc + self.eos, dtype=np.int64))
                got += len(parts[-1])
        return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)), pos

    def _windows(self, ids: np.ndarray) -> torch.Tensor:
        n = len(ids) // self.seq_len
        return torch.from_numpy(ids[: n * self.seq_len].copy()).view(n, self.seq_len)

    def _block(self) -> tuple[torch.Tensor, int]:
        st = self.state
        key = (st["block"], st["epoch"])
        if self._cached is None or self._cached[0] != key:
            ids, nxt = self._read(st["block"], BLOCK_TOKENS, DOC_BATCH)
            windows = self._windows(ids)
            digest = hashlib.sha256(f"{self.seed}/{st['epoch']}/{st['block']}".encode()).digest()
            order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(int.from_bytes(digest[:7], "little")))
            self._cached = (key, windows[order], nxt)
        return self._cached[1], self._cached[2]

    def take(self, n: int) -> torch.Tensor:
        """The next n windows (n, seq_len)."""
        st, parts, left, wrapped = self.state, [], n, False
        while left:
            windows, nxt = self._block()
            if len(windows) == 0:  # the end of the source: the next epoch starts
                if wrapped:
                    raise UserError(f"--train-data {self.name}: fewer than {self.seq_len} tokens after the "
                                    "validation slice (give more text, or --val-windows 0)")
                if st["source_tokens"] is None:
                    st["source_tokens"] = st["epoch_tokens"]
                st.update(epoch=st["epoch"] + 1, block=st["start"], i=0, epoch_tokens=0)
                wrapped = True
                continue
            k = min(left, len(windows) - st["i"])
            parts.append(windows[st["i"]:st["i"] + k])
            st["i"] += k
            st["tokens"] += k * self.seq_len
            left -= k
            wrapped = False
            if st["i"] == len(windows):
                st.update(block=nxt, i=0, epoch_tokens=st["epoch_tokens"] + windows.numel())
        return torch.cat(parts)

    def hold_apart(self, n: int) -> torch.Tensor:
        """The first n windows, in order, never trained on: every epoch starts after the documents they came from."""
        ids, pos = self._read(0, n * self.seq_len, docs=1)
        windows = self._windows(ids)[:n]
        if len(windows) < n:
            raise UserError(f"--train-data {self.name}: fewer than {n} windows of {self.seq_len} tokens for "
                            "--val-windows")
        self.state.update(start=pos, block=pos, i=0)
        return windows

    def report(self) -> dict:
        st = self.state
        epochs = st["tokens"] / st["source_tokens"] if st["source_tokens"] else None
        return {"source": self.name, "tokens_read": st["tokens"], "epochs": epochs, "wraps": st["epoch"],
                "source_tokens": st["source_tokens"]}


class Mixture:
    """Windows from weighted sources, interleaved by a seeded golden-ratio sequence: every stretch of
    windows holds each source's share (to within one window), and window i's source is a pure
    function of i, so resuming needs no generator state."""

    def __init__(self, streams: list[TokenStream], weights: list[float], seed: int):
        self.streams, self.seed = streams, seed
        self.p = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.drawn = 0
        self.seq_len = streams[0].seq_len

    def _sources(self, start: int, n: int) -> np.ndarray:
        idx = np.arange(start, start + n, dtype=np.uint64)
        u = (np.random.Generator(np.random.PCG64(self.seed)).random() + idx * 0.6180339887498949) % 1.0
        return np.searchsorted(np.cumsum(self.p), u, side="right").clip(max=len(self.p) - 1)

    def take(self, n: int) -> torch.Tensor:
        src = self._sources(self.drawn, n)
        self.drawn += n
        out = torch.empty(n, self.streams[0].seq_len, dtype=torch.long)
        for i, stream in enumerate(self.streams):
            rows = np.flatnonzero(src == i)
            if rows.size:
                out[torch.from_numpy(rows)] = stream.take(rows.size)
        return out

    def state(self) -> dict:
        return {"drawn": self.drawn, "streams": [dict(s.state) for s in self.streams]}

    def restore(self, state: dict) -> None:
        self.drawn = state["drawn"]
        for s, st in zip(self.streams, state["streams"]):
            s.state = dict(st)

    def report(self) -> list[dict]:
        return [s.report() | {"weight": float(p)} for s, p in zip(self.streams, self.p)]


def from_windows(windows: torch.Tensor, name: str = "windows") -> Mixture:
    """A mixture of one in-memory source: the rows of `windows` (N, T), shuffled, epoch after epoch."""
    return Mixture([TokenStream(name, windows.shape[1], tokens=windows.reshape(-1).numpy())], [1.0], seed=0)
