"""Outputs written atomically, the one way every writer here uses: build a temporary sibling (a
directory or a file), fsync it, give it the mode a plain mkdir/open would (0755/0644 under the usual
umask, not mkdtemp's 0700 or mkstemp's 0600, which a server running as another user cannot read),
then rename it into place. On any error, or an interrupt, the temporary sibling is removed.

A pruned checkpoint is what `save_pretrained` writes (safetensors, config.json, tokenizer files)
plus `transact.json`, the record of what was done.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from transact_edge.errors import UserError

REPORT = "transact.json"
REPORT_FORMAT = "transact-edge/2"  # 2: what is kept as a replayable `plan` (plan.Plan); 1 had `kept`, still read


def check_output(final: Path, force: bool) -> None:
    """Refuse an existing output unless --force; refuse a parent that does not exist."""
    if final.exists() and not force:
        raise UserError(f"{final}: already exists (use --force to replace it)")
    if not final.parent.is_dir():
        raise UserError(f"{final.parent}: output's parent directory does not exist")


@contextmanager
def atomic_dir(final: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; on success it replaces `final`, on error it is removed."""
    check_output(final, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        for f in tmp.rglob("*"):  # writers inside may use mkstemp too (transformers' safetensors does)
            if f.is_file():
                _fsync(f)
            f.chmod((0o666 if f.is_file() else 0o777) & ~_umask())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # --force: move the old one aside first so `final` is never half-written
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, trash / "old")
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final` to write; on success it replaces `final`, else it is removed."""
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save(directory: Path, model, tokenizer, report: dict | None = None) -> None:
    """save_pretrained (safetensors) of model and tokenizer, plus transact.json."""
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    if report is not None:
        (directory / REPORT).write_text(json.dumps(report, indent=1))


def read_report(directory: Path) -> dict | None:
    path = directory / REPORT
    return json.loads(path.read_text()) if path.is_file() else None
