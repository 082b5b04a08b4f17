"""Text for calibration, recovery training and evaluation, cut into fixed-length token windows.

The default corpus ships in transact_edge/data (a cleaned Wikipedia excerpt, CC BY-SA; see
data/ATTRIBUTION.md), split by page into a calibration/training part and a held-out part.
`--calib PATH` takes a .txt file, a .jsonl file with a "text" field, or a directory saved with
`datasets.Dataset.save_to_disk` (when the datasets package is installed).
"""
from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

import torch

from transact_edge.errors import UserError

DEFAULT = "wiki"  # the shipped corpus


def default_texts(split: str) -> list[str]:
    """Pages of the shipped corpus: split 'train' (calibration + recovery) or 'eval' (held out)."""
    with resources.files("transact_edge").joinpath(f"data/wiki_{split}.jsonl.gz").open("rb") as raw:
        with gzip.open(raw, "rt", encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f]


def _read_text_file(path: Path) -> list[str]:
    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        raise UserError(f"{path}: looks binary; expected UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError, RecursionError):
                raise UserError(f"{path}:{n}: expected a JSON object with a \"text\" field") from None
            texts.append(json_text(doc, f"{path}:{n}"))
        return texts
    return [text]


def json_text(value, where: str) -> str:
    """A JSON "text" field as a document: a string ('' for null or other types, which are skipped);
    a lone surrogate escape (no UTF-8 text holds one) is refused."""
    if not isinstance(value, str):
        return ""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{where}: \"text\" holds an unpaired surrogate escape, not UTF-8 text") from None
    return value


def open_dataset_dir(path: Path):
    """A `datasets.save_to_disk` directory with a 'text' column (memory-mapped, not read whole)."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"{path}: reading a saved dataset directory needs the datasets package") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise UserError(f"{path}: not a dataset saved with save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if "text" not in ds.column_names:
        raise UserError(f"{path}: dataset has no 'text' column (columns: {', '.join(ds.column_names)})")
    return ds


def read_texts(spec: str, split: str = "train") -> list[str]:
    """Documents named by a --calib value: 'wiki' (shipped) or a path."""
    if spec == DEFAULT:
        return default_texts(split)
    path = Path(spec)
    if not path.exists():
        raise UserError(f"{spec}: no such calibration file or directory")
    texts = list(open_dataset_dir(path)["text"]) if path.is_dir() else _read_text_file(path)
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise UserError(f"{spec}: no text in calibration data")
    return texts


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents tokenized in batches and joined by EOS: a 1-D LongTensor.

    Batches of 16 documents go through the (Rust) tokenizer at once; each batch becomes a tensor
    right away, so no Python list of the whole corpus's token ids is ever held.
    """
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    parts = []
    for i in range(0, len(texts), 16):
        ids = tokenizer(texts[i:i + 16], add_special_tokens=False)["input_ids"]
        parts += [torch.tensor(doc + eos, dtype=torch.long) for doc in ids]
    return torch.cat(parts)


def stream(tokenizer, spec: str = DEFAULT, split: str = "train") -> torch.Tensor:
    """Token stream of a corpus: documents of `spec` (see read_texts) tokenized and joined."""
    return token_stream(tokenizer, read_texts(spec, split))


def windows(ids: torch.Tensor, seq_len: int, n: int | None = None, seed: int | None = None) -> torch.Tensor:
    """(n, seq_len) non-overlapping windows; the first n in order, or n drawn with `seed`."""
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {seq_len}")
    total = ids.numel() // seq_len
    if total == 0:
        raise UserError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    all_windows = ids[: total * seq_len].view(total, seq_len)  # (total, seq_len)
    if n is None:
        return all_windows
    if seed is None:
        return all_windows[:n] if n <= total else all_windows[torch.arange(n) % total]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(total, generator=g)
    idx = idx[torch.arange(n) % total]  # wraps around (repeats windows) only when n > total
    return all_windows[idx]
