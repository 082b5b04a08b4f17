"""One writer per output. A run holds an exclusive lock on `.NAME.lock` beside the output NAME it will
publish, from before its first write to after the rename; a second run aimed at the same output
exits at once (or, for shared caches such as build-llama's, waits its turn).

The lock is the kernel's (flock): it dies with its process, even under kill -9, so it is never stale
and never guessed from a pid. Whoever holds it knows that any temporary sibling of that output (from
atomic_dir / atomic_file, or a partial run's own temporaries) was left by a dead run, and sweeps them.
A child that writes those temporaries (a compiler) gets the lock's descriptor (`held()`): the lock
then lives until the last of them exits, so a killed run's orphaned child never races the next
run's sweep.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from transact_edge.errors import UserError


def lock_path(final: Path) -> Path:
    return final.parent / f".{final.name}.lock"


def _acquire(path: Path, final: Path, wait: bool) -> int:
    """An fd holding the lock on `path`; the file is re-opened if its last holder removed it meanwhile."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise UserError(f"{path}: cannot create the output's lock ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            if not wait:
                os.close(fd)
                raise UserError(f"{final}: another run (pid {holder}) is writing it; wait for it to finish "
                                f"or choose another output") from None
            print(f"transact-edge: waiting for pid {holder}, which is writing {final}", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # we locked a file its holder had just removed: take the one there now


_HELD: set[int] = set()  # descriptors of the locks this process holds


def held() -> tuple[int, ...]:
    """The held locks' descriptors, for a child's `pass_fds`."""
    return tuple(_HELD)


# atomic_dir / atomic_file names: .NAME.tmp-XXXXXXXX, .NAME.old-XXXXXXXX (and files staged as .NAME.tmp-XXXXXXXX.EXT)
_TEMPORARY = r"\.{}\.(tmp|old)-[a-z0-9_]{{8}}(\.[a-z0-9]+)?"


def sweep(final: Path) -> list[Path]:
    """Remove what dead runs left for `final`: its temporaries and those inside its partial run."""
    own = re.compile(_TEMPORARY.format(re.escape(final.name)))
    left = [p for p in final.parent.iterdir() if own.fullmatch(p.name)]
    partial = final.parent / f".{final.name}.partial"
    if partial.is_dir():  # everything there belongs to this output
        any_name = re.compile(_TEMPORARY.format(".+"))
        left += [p for p in partial.iterdir() if any_name.fullmatch(p.name)]
    for p in left:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return left


@contextmanager
def claim(final: Path, wait: bool = False) -> Iterator[None]:
    """Hold `final`'s lock (refuse, or wait, if another process holds it) and sweep what dead runs left."""
    final = Path(final).absolute()
    if not final.parent.is_dir():
        raise UserError(f"{final.parent}: output's parent directory does not exist")
    path = lock_path(final)
    fd = _acquire(path, final, wait)
    _HELD.add(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        sweep(final)
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding it: a waiter then sees the inode gone and retries
        _HELD.discard(fd)
        os.close(fd)
