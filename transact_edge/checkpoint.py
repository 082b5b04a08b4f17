"""Outputs written atomically, the one way every writer here uses: build a temporary sibling (a
directory or a file), fsync it, give it the mode a plain mkdir/open would (0755/0644 under the usual
umask, not mkdtemp's 0700 or mkstemp's 0600, which a server running as another user cannot read) while
keeping the execute bits its writer set (a compiled tool stays 0755), then rename it into place. On any error, or an interrupt, the temporary sibling is removed.

A pruned checkpoint is what `save_pretrained` writes (safetensors, config.json, tokenizer files)
plus `transact.json`, the record of what was done (record.py).
"""
from __future__ import annotations

import errno
import fnmatch
import os
import re
import resource
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from transact_edge.errors import UserError

HOLD = "TRANSACT_EDGE_HOLD_PUBLISH"  # a glob of final paths: stop (SIGSTOP) with the temporary written, before the rename


def check_output(final: Path, force: bool) -> None:
    """Refuse an existing output unless --force; refuse a parent that does not exist."""
    if final.exists() and not force:
        raise UserError(f"{final}: already exists (use --force to replace it)")
    if not final.parent.is_dir():
        raise UserError(f"{final.parent}: output's parent directory does not exist")


FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def require_space(directory: Path, need: int, what: str) -> None:
    """Refuse before the work when `directory` cannot hold `need` bytes (what the job will write there)."""
    free = shutil.disk_usage(directory).free
    if free < need:
        raise UserError(f"{directory}: {what} needs about {need / 2**30:.2f} GiB free, {free / 2**30:.2f} GiB available")


def _errno(e: BaseException) -> int | None:
    """The errno of a failed write: an OSError's, or the one Rust writers (safetensors) put in the message."""
    if isinstance(e, OSError):
        return e.errno
    found = re.search(r"\(os error (\d+)\)", str(e))
    return int(found.group(1)) if found else None


def refused_write(e: BaseException, tmp: Path) -> bool:
    """A write of ours that the place refused (not, say, an unreadable input met inside the block).
    numpy's tofile reports a short write as an OSError without an errno."""
    short = isinstance(e, OSError) and e.errno is None and "written" in str(e)
    ours = getattr(e, "filename", None) is None or str(e.filename).startswith(str(tmp))
    return (_errno(e) in FULL or short) and ours


def unwritable(final: Path, e: BaseException) -> UserError:
    """A write that failed part-way (disk full, file too large, read-only): one line naming the output."""
    code = _errno(e)
    if code is not None:
        why = os.strerror(code)
    else:  # a short write: say which limit it most likely met
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        why = (f"file too large for the file-size limit of {limit} bytes (ulimit -f)"
               if limit != resource.RLIM_INFINITY else "short write: the disk is probably full")
    return UserError(f"{final}: cannot write it ({why}); nothing was left under that name")


@contextmanager
def atomic_dir(final: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; on success it replaces `final`, on error it is removed."""
    check_output(final, force)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as e:
        raise unwritable(final, e) from None
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        hold(final)
        for f in tmp.rglob("*"):  # writers inside may use mkstemp too (transformers' safetensors does)
            if f.is_file():
                fsync(f)
            f.chmod(published_mode(f))
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if refused_write(e, tmp):
            raise unwritable(final, e) from None
        raise
    if final.exists():  # --force: move the old one aside first so `final` is never half-written
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, trash / "old")
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync(final.parent)  # the rename itself survives a crash


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final` to write; on success it replaces `final`, else it is removed."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    except OSError as e:
        raise unwritable(final, e) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        hold(final)
        fsync(tmp)
        os.chmod(tmp, published_mode(tmp))
        os.replace(tmp, final)
        fsync(final.parent)
    except Exception as e:
        if refused_write(e, tmp):
            raise unwritable(final, e) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def hold(final: Path) -> None:
    """Stop this process inside the publish when $TRANSACT_EDGE_HOLD_PUBLISH matches `final`, so a test can
    signal or kill it at that exact moment (waitpid(WUNTRACED) sees it stopped) instead of racing a poll.
    Called before the fsyncs: CPython runs a signal's handler at the next Python-level call (fsync), so a
    signal sent while held unwinds the publish; one called just before os.replace would run after it."""
    pattern = os.environ.get(HOLD)
    if pattern and fnmatch.fnmatch(str(final), pattern):
        os.kill(os.getpid(), signal.SIGSTOP)


def published_mode(path: Path) -> int:
    """What a plain mkdir/open gives under the umask, plus the execute bits the writer set: directories
    0755, data 0644, an executable (a linker's output, a copied tool) 0755."""
    if path.is_dir():
        return 0o777 & ~_umask()
    executable = path.stat().st_mode & 0o111
    return (0o666 | (0o111 if executable else 0)) & ~_umask()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync(path: Path) -> None:
    """Data on disk before the rename that publishes it (a crash then never shows an empty file); for a
    directory, its entries (the rename)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(directory: Path, model, tokenizer) -> None:
    """save_pretrained (safetensors) of model and tokenizer."""
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
