"""Where a prune run stands on disk, so that --resume continues it: each finished shot in a hidden
sibling of the output (`.NAME.partial/shot-K`), and the recovery state inside a shot (`live`),
written every --checkpoint-minutes. A checkpoint is used only if the run that wrote it had the same
options (their fingerprint); process 0 writes while the others wait.
"""
from __future__ import annotations

import json
from pathlib import Path

from transact_edge import distributed
from transact_edge.checkpoint import atomic_dir, save
from transact_edge.errors import UserError

LIVE = "live"  # the training state inside a shot, in the partial directory


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def last_shot(partial: Path, fingerprint: dict) -> tuple[int, dict] | None:
    """The last finished shot in `partial` and its state, if it belongs to the same run."""
    done = sorted((int(p.name.split("-")[1]), p) for p in partial.glob("shot-*") if (p / "state.json").is_file())
    if not done:
        return None
    shot, path = done[-1]
    return shot, same_run(json.loads((path / "state.json").read_text()), partial, fingerprint)


def same_run(state: dict, partial: Path, fingerprint: dict) -> dict:
    """`state`, if the checkpoint it came from was written by a run with these options."""
    if state["options"] != fingerprint:
        raise UserError(f"{partial}: checkpoints of a run with other options; drop --resume to start over")
    return state


def live(partial: Path, fingerprint: dict) -> tuple[int, dict] | None:
    """(shot, state) of a recovery that was stopped inside a shot, if it belongs to this run."""
    path = partial / LIVE / "state.json"
    if not path.is_file():
        return None
    state = same_run(json.loads(path.read_text()), partial, fingerprint)
    return state["shot"] - 1, state


def live_saver(partial: Path, model, tok, state: dict, group: distributed.Group | None):
    """The callback through which recovery hands over its training state; `state` (shot, options,
    plan, report, record) is written beside it, as it is when the callback runs."""
    config = model.config

    def save_live(write) -> None:
        if group is None or group.main:
            partial.mkdir(exist_ok=True)
            with atomic_dir(partial / LIVE, force=True) as tmp:
                write(tmp)
                config.save_pretrained(tmp)
                tok.save_pretrained(tmp)
                (tmp / "state.json").write_text(json.dumps(state))
        wait(group)
    return save_live


def wait(group: distributed.Group | None) -> None:
    """The other processes wait while process 0 writes."""
    if group is not None:
        group.barrier()


def checkpoint(partial: Path, shot: int, model, tok, state: dict) -> None:
    """Shot `shot` finished: its model and the run's state."""
    partial.mkdir(exist_ok=True)
    with atomic_dir(partial / f"shot-{shot}", force=True) as tmp:
        save(tmp, model, tok)
        (tmp / "state.json").write_text(json.dumps(state))
